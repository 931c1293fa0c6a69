"""A synthetic region (VIGOR-like): one aerial map, overlapping tiles, panoramas anywhere. Private.

Exposed as :func:`gsra_salad.data.synthetic.write_region`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from ._base import require
from .synthetic import _PALETTES, _rngs, _rotated_rectangle, _save, ground_view, photometric


def nearest_seed(
    seeds: np.ndarray, height: int, width: int, *, band: int | None = None
) -> np.ndarray:
    """(height, width) int64: for each pixel (x = column, y = row), the index of the nearest
    of ``seeds`` (n, 2) as (x, y). A k-d tree (SciPy), ``band`` rows at a time (default: about
    a million pixels): O(H W log n) time and O(W x band) memory, where a loop over the seeds is
    O(H W n)."""
    spatial = require("scipy.spatial")
    tree = spatial.cKDTree(seeds)
    cell = np.empty((height, width), dtype=np.int64)
    band = band or max(1, 2**20 // max(1, width))
    xs = np.arange(width, dtype=np.float64)
    for top in range(0, height, band):
        rows = np.arange(top, min(height, top + band), dtype=np.float64)
        points = np.stack(np.meshgrid(xs, rows), -1).reshape(-1, 2)
        cell[top : top + len(rows)] = tree.query(points)[1].reshape(len(rows), width)
    return cell


def aerial_map(rng: np.random.Generator, height: int, width: int, unit: int) -> np.ndarray:
    """A (height, width, 3) uint8 aerial map drawn at the scale of ``unit``-pixel tiles: fields,
    roads, buildings and trees as dense as in :func:`~gsra_salad.data.synthetic.aerial_tile`,
    so a ``unit`` x ``unit`` crop looks like one synthetic tile."""
    image_module = require("PIL.Image")
    draw_module = require("PIL.ImageDraw")
    palette = _PALETTES[rng.integers(len(_PALETTES))]
    per_tile = height * width / unit**2  # how many tiles' worth of content
    n_cells = max(4, int(6 * per_tile))
    seeds = rng.uniform(0, 1, (n_cells, 2)) * (width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cell = nearest_seed(seeds, height, width)
    colours = palette[rng.integers(0, 4, n_cells)] * rng.uniform(0.85, 1.15, (n_cells, 1))
    angle = rng.uniform(0, np.pi, n_cells)[cell]
    period = rng.uniform(4, 12, n_cells)[cell] * unit / 128
    stripes = 1 + 0.08 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    canvas = image_module.fromarray(
        np.clip(colours[cell] * stripes[..., None], 0, 255).astype(np.uint8)
    )
    draw = draw_module.Draw(canvas)
    size = np.array([width, height], dtype=np.float64)
    road = tuple(int(c) for c in palette[4])
    for _ in range(max(1, int(2 * np.sqrt(per_tile)))):
        a, b = rng.uniform(-0.1, 1.1, (2, 2)) * size
        mid = (a + b) / 2 + rng.normal(0, unit / 8, 2)
        w = int(rng.integers(max(2, unit // 40), max(3, unit // 16)))
        draw.line([tuple(a), tuple(mid), tuple(b)], fill=road, width=w, joint="curve")
    for _ in range(int(8 * per_tile)):
        centre = rng.uniform(0, 1, 2) * size
        half = rng.uniform(unit / 40, unit / 10, 2)
        theta = rng.uniform(0, np.pi)
        corners = _rotated_rectangle(centre, half, theta)
        roof = tuple(int(c) for c in palette[5 + rng.integers(0, 3)])
        draw.polygon([tuple(p) for p in corners], fill=roof)
    tree = tuple(int(c) for c in palette[8])
    for _ in range(int(12 * per_tile)):
        x, y = rng.uniform(0, 1, 2) * size
        r = rng.uniform(unit / 60, unit / 25)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tree)
    return np.array(canvas)


def write_region(
    root: str | os.PathLike,
    grid: tuple[int, int] = (8, 8),
    num_queries: int = 32,
    *,
    tile_size: int = 64,
    stride: int = 32,
    pano_size: tuple[int, int] = (32, 128),
    metres_per_pixel: float = 1.0,
    num_train: int = 0,
    num_val: int = 0,
    pair_offset: int | None = None,
    seed: int = 0,
) -> Path:
    """Writes a synthetic region: one aerial map cut into overlapping tiles on a grid, and
    ground panoramas taken at random points of it (not at tile centres); optionally, a
    training split of the same map in CVUSA's layout.

    The map is ``(rows - 1) * stride + tile_size`` pixels high (likewise wide), drawn at the
    scale of ``tile_size``-pixel tiles. Tile ``(r, c)`` is the crop whose top-left corner is
    ``(r * stride, c * stride)``; each panorama is the polar transform of the
    ``tile_size`` crop centred on its point, as :func:`write_cvusa` makes them; every image
    gets its own photometric change. Positions are planar metres (``metric="euclidean"``):
    ``x`` east (column x ``metres_per_pixel``), ``y`` north (rows counted up from the map's
    bottom edge), so north is image up in the tiles and the panoramas alike.

    Files: ``tiles/r<row>_c<col>.jpg``, ``tiles.csv`` (``path,x,y``: the tiles' centres),
    ``queries/q<i>.jpg``, ``queries.csv`` (``path,x,y``: the true positions), ``region.json``
    (the parameters); paths in the CSVs are relative to ``root``.

    With ``num_train`` / ``num_val`` > 0, also a training and a validation split in CVUSA's
    layout (read by :class:`~gsra_salad.data.CVUSA`, so a recipe trains on it): panoramas at
    further uniform random points of the same map, each paired with a ``tile_size`` satellite
    tile centred up to ``pair_offset`` pixels away in x and in y (uniform; by default
    ``stride // 2``, as far as a photo lies from its nearest grid tile), each image with its
    own photometric change:
    ``bingmap/19/<id>.jpg``, ``streetview/panos/<id>.jpg``, ``splits/{train,val}-19zl.csv``
    and ``positions.csv`` (``path,x,y``: each satellite tile's centre). This is VIGOR's
    *same-area* setting: the model sees the region's map during training, never the query
    panoramas nor the grid's tiles.

    Args:
        root: output directory.
        grid: (rows, cols) of tiles.
        num_queries: panoramas, at uniform random points at least ``tile_size / 2`` pixels
            from the map's edges.
        tile_size: side of a tile (and of the crop a panorama sees), in pixels.
        stride: pixels between neighbouring tiles' centres (< tile_size: overlapping tiles).
        pano_size: (H, W) of the panoramas.
        metres_per_pixel: ground sampling distance.
        num_train: training pairs in CVUSA's layout (0: none).
        num_val: validation pairs in CVUSA's layout (what a recipe evaluates on while
            training; > 0 whenever ``num_train`` is).
        pair_offset: the largest offset, in pixels along each axis, of a pair's tile centre
            from its panorama's point (0: centred, as in CVUSA); default ``stride // 2``.
        seed: everything is seeded: the same arguments write the same files.

    Returns:
        ``root``.

    Example:
        >>> import tempfile
        >>> root = write_region(tempfile.mkdtemp(), grid=(3, 3), num_queries=2, tile_size=32,
        ...                     stride=16, pano_size=(16, 64))
        >>> sorted(p.name for p in root.iterdir())
        ['queries', 'queries.csv', 'region.json', 'tiles', 'tiles.csv']
        >>> root = write_region(tempfile.mkdtemp(), grid=(3, 3), num_queries=2, tile_size=32,
        ...                     stride=16, pano_size=(16, 64), num_train=4, num_val=2)
        >>> from gsra_salad.data import CVUSA
        >>> len(CVUSA(root, "train")), len(CVUSA(root, "val"))
        (4, 2)
    """
    rows, cols = grid
    if rows < 1 or cols < 1 or not 0 < stride or tile_size < 8 or num_queries < 0:
        raise ValueError(
            f"write_region: need grid >= (1, 1), stride > 0, tile_size >= 8 and num_queries >= "
            f"0, got grid={grid}, stride={stride}, tile_size={tile_size}, num_queries={num_queries}"
        )
    if num_train < 0 or num_val < 0 or (num_train > 0) != (num_val > 0):
        raise ValueError(
            "write_region: num_train and num_val are both 0 (no training split) or both > 0 (a "
            f"recipe trains on one and evaluates on the other), got num_train={num_train}, "
            f"num_val={num_val}"
        )
    if pair_offset is not None and pair_offset < 0:
        raise ValueError(f"write_region: pair_offset must be >= 0, got {pair_offset}")
    root = Path(root)
    height, width = (rows - 1) * stride + tile_size, (cols - 1) * stride + tile_size
    map_rng, query_rng, *tile_rngs, pair_rng = _rngs(seed, 3 + rows * cols)
    region = aerial_map(map_rng, height, width, tile_size)

    def position(row_px: float, col_px: float) -> tuple[float, float]:
        return col_px * metres_per_pixel, (height - row_px) * metres_per_pixel

    tile_rows = []
    for i, rng in enumerate(tile_rngs):
        r, c = divmod(i, cols)
        crop = region[r * stride : r * stride + tile_size, c * stride : c * stride + tile_size]
        name = f"tiles/r{r:03d}_c{c:03d}.jpg"
        _save(photometric(rng, crop), root / name)
        tile_rows.append([name, *position(r * stride + tile_size / 2, c * stride + tile_size / 2)])

    half = tile_size / 2
    query_rows = []
    for i in range(num_queries):
        cy = query_rng.uniform(half, height - half)
        cx = query_rng.uniform(half, width - half)
        top, left = round(cy - half), round(cx - half)
        crop = region[top : top + tile_size, left : left + tile_size]
        name = f"queries/q{i:04d}.jpg"
        _save(photometric(query_rng, ground_view(crop, pano_size)), root / name)
        query_rows.append([name, *position(top + half, left + half)])

    tables = [("tiles.csv", tile_rows), ("queries.csv", query_rows)]
    offset = stride // 2 if pair_offset is None else pair_offset
    if num_train:
        pairs = (num_train, num_val, offset, tile_size, pano_size)
        tables.append(("positions.csv", _write_pairs(root, region, pair_rng, pairs, position)))
    for name, table in tables:
        with (root / name).open("w", newline="") as f:
            csv.writer(f).writerows([["path", "x", "y"], *table])
    parameters = {
        "grid": [rows, cols], "num_queries": num_queries, "tile_size": tile_size,
        "stride": stride, "pano_size": list(pano_size), "metres_per_pixel": metres_per_pixel,
        "num_train": num_train, "num_val": num_val,
        "pair_offset": offset,
        "seed": seed, "map_size": [height, width], "metric": "euclidean",
    }  # fmt: skip
    (root / "region.json").write_text(json.dumps(parameters, indent=2))
    return root


def _write_pairs(root: Path, region: np.ndarray, rng: np.random.Generator, pairs, position):
    """The training and validation splits in CVUSA's layout; returns positions.csv's rows."""
    num_train, num_val, offset, tile_size, pano_size = pairs
    height, width = region.shape[:2]
    half = tile_size / 2
    pair_rows, positions = [], []
    for i in range(1, num_train + num_val + 1):  # CVUSA's ids: 0000001, 0000002, ...
        cy, cx = rng.uniform(half, height - half), rng.uniform(half, width - half)
        top, left = round(cy - half), round(cx - half)
        ground_crop = region[top : top + tile_size, left : left + tile_size]
        dy, dx = np.rint(rng.uniform(-offset, offset, 2)).astype(int)
        top = int(np.clip(top + dy, 0, height - tile_size))
        left = int(np.clip(left + dx, 0, width - tile_size))
        crop = region[top : top + tile_size, left : left + tile_size]
        sat, ground = f"bingmap/19/{i:07d}.jpg", f"streetview/panos/{i:07d}.jpg"
        _save(photometric(rng, crop), root / sat)
        _save(photometric(rng, ground_view(ground_crop, pano_size)), root / ground)
        pair_rows.append([sat, ground, f"streetview/annotations/{i:07d}.png"])
        positions.append([sat, *position(top + half, left + half)])
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", pair_rows[:num_train]), ("val", pair_rows[num_train:])):
        with (root / "splits" / f"{split}-19zl.csv").open("w", newline="") as f:
            csv.writer(f).writerows(part)
    return positions
