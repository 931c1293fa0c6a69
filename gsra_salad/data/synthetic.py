"""Synthetic cross-view datasets written in the exact on-disk layouts of CVUSA, CVACT and
University-1652, for demos and tests (no download needed).

Every location is a procedurally generated aerial tile: field patches (a Voronoi partition),
roads, rotated building footprints and trees. The views share the tile's geometry:

- the satellite view is the tile;
- the ground view is its polar transform (a north-aligned panorama, see
  :func:`~gsra_salad.data.polar_transform`);
- drone views are rotated, scaled and perspective-warped crops of the tile.

Appearance is deliberately uninformative: all locations draw their colours from a few shared
palettes, and every view gets its own photometric change (brightness, contrast, a season-like
channel mix, noise). Matching by colour statistics alone therefore fails
(:func:`colour_histogram_descriptors` is that baseline): a model has to use the geometry.

Everything is seeded: the same arguments write the same files.

:func:`write_region` draws one large map instead, cuts it into overlapping tiles on a grid with
known planar positions and takes panoramas at random points (a VIGOR-like region, for
localisation in metres).

Example:
    >>> import tempfile
    >>> from gsra_salad.data import CVUSA
    >>> root = write_cvusa(tempfile.mkdtemp(), num_train=4, num_val=2, tile_size=64)
    >>> len(CVUSA(root, "train")), len(CVUSA(root, "val"))
    (4, 2)
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._base import require
from .geometry import polar_transform

__all__ = [
    "HardSetting",
    "colour_histogram_descriptors",
    "write_cvact",
    "write_cvusa",
    "write_region",
    "write_university1652",
]

# A few shared palettes (fields x4, road, roofs x3, trees): locations are not told apart by colour.
_PALETTES = np.array(
    [
        [[92, 128, 60], [140, 150, 80], [170, 160, 110], [110, 100, 70], [120, 120, 120],
         [170, 80, 60], [200, 200, 200], [90, 90, 100], [40, 80, 40]],
        [[180, 170, 120], [150, 140, 90], [200, 190, 150], [130, 120, 80], [100, 100, 105],
         [150, 60, 50], [210, 210, 200], [80, 80, 90], [70, 90, 50]],
        [[70, 110, 70], [90, 140, 90], [120, 150, 100], [60, 90, 60], [130, 130, 130],
         [190, 100, 70], [180, 180, 190], [100, 100, 110], [30, 70, 35]],
        [[200, 200, 205], [185, 190, 195], [215, 215, 220], [170, 175, 180], [90, 90, 95],
         [140, 70, 60], [230, 230, 235], [70, 70, 80], [60, 75, 65]],
    ],
    dtype=np.float64,
)  # fmt: skip


def _rotated_rectangle(centre: np.ndarray, half: np.ndarray, theta: float) -> np.ndarray:
    """The (4, 2) corners of a rectangle of half-sizes ``half`` turned by ``theta`` about
    ``centre`` (buildings in the synthetic aerial images)."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half @ rot.T + centre


def aerial_tile(rng: np.random.Generator, size: int) -> np.ndarray:
    """One location's aerial tile, (size, size, 3) uint8, from a random layout and palette."""
    image_module = require("PIL.Image")
    draw_module = require("PIL.ImageDraw")
    palette = _PALETTES[rng.integers(len(_PALETTES))]
    # fields: Voronoi cells, each a field colour with its own brightness and stripe texture
    n_cells = int(rng.integers(4, 9))
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cell = np.argmin((xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2, -1)
    colours = palette[rng.integers(0, 4, n_cells)] * rng.uniform(0.85, 1.15, (n_cells, 1))
    angle = rng.uniform(0, np.pi, n_cells)[cell]
    period = rng.uniform(4, 12, n_cells)[cell]
    stripes = 1 + 0.08 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image = colours[cell] * stripes[..., None]
    canvas = image_module.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = draw_module.Draw(canvas)
    road = tuple(int(c) for c in palette[4])
    for _ in range(int(rng.integers(1, 4))):
        a, b = rng.uniform(-0.2 * size, 1.2 * size, (2, 2))
        mid = (a + b) / 2 + rng.normal(0, size / 8, 2)
        width = int(rng.integers(max(2, size // 40), max(3, size // 16)))
        draw.line([tuple(a), tuple(mid), tuple(b)], fill=road, width=width, joint="curve")
    for _ in range(int(rng.integers(4, 13))):
        centre = rng.uniform(0.1 * size, 0.9 * size, 2)
        half = rng.uniform(size / 40, size / 10, 2)
        theta = rng.uniform(0, np.pi)
        corners = _rotated_rectangle(centre, half, theta)
        roof = tuple(int(c) for c in palette[5 + rng.integers(0, 3)])
        draw.polygon([tuple(p) for p in corners], fill=roof)
    tree = tuple(int(c) for c in palette[8])
    for _ in range(int(rng.integers(5, 21))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(size / 60, size / 25)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tree)
    return np.array(canvas)


def photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """An independent appearance change: brightness, contrast, season-like channel mix, noise."""
    x = image.astype(np.float64)
    mix = np.eye(3) + rng.normal(0, 0.08, (3, 3))
    x = x @ mix.T * rng.uniform(0.8, 1.2, 3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
    x += rng.normal(0, rng.uniform(2, 8), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def ground_view(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The north-aligned panorama (H, W, 3) of a tile: its polar transform."""
    t = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)
    return polar_transform(t, size).permute(1, 2, 0).numpy()


def drone_view(rng: np.random.Generator, tile: np.ndarray, size: int) -> np.ndarray:
    """A rotated, scaled, perspective-warped crop of a tile, (size, size, 3)."""
    image_module = require("PIL.Image")
    s = tile.shape[0]
    image = image_module.fromarray(tile).rotate(
        float(rng.uniform(0, 360)), resample=image_module.Resampling.BILINEAR
    )
    scale = rng.uniform(0.55, 0.85)
    half = s * scale / 2
    cx, cy = s / 2 + rng.normal(0, s * 0.03, 2)
    # a quadrilateral around the centre, its top edge shortened: an oblique view
    squeeze = rng.uniform(0.0, 0.15) * half
    quad = np.array(
        [
            [cx - half + squeeze, cy - half],
            [cx - half, cy + half],
            [cx + half, cy + half],
            [cx + half - squeeze, cy - half],
        ]
    )
    warped = image.transform(
        (size, size),
        image_module.Transform.QUAD,
        tuple(quad.reshape(-1)),
        resample=image_module.Resampling.BILINEAR,
    )
    return np.asarray(warped)


def _save(array: np.ndarray, path: Path) -> None:
    image_module = require("PIL.Image")
    path.parent.mkdir(parents=True, exist_ok=True)
    image_module.fromarray(array).save(path, quality=92)


# The writers run their per-location work in forked worker processes (one per core, at most
# _MAX_WORKERS) once there are _PARALLEL_MIN locations: every location has its own seeded
# generator and its own files, so the files are the same as with one process.
_PARALLEL_MIN = 64
_MAX_WORKERS = 4
_TASK: Callable[[int], None] | None = None


def _run_task(index: int) -> None:
    assert _TASK is not None
    _TASK(index)


def _worker_init() -> None:
    torch.set_num_threads(1)  # as DataLoader workers: no OpenMP pool inherited across fork


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parallel(task: Callable[[int], None], count: int) -> None:
    """Runs ``task(i)`` for ``i`` in ``range(count)``, in forked processes where that pays."""
    global _TASK
    workers = min(_cores(), _MAX_WORKERS, count)
    if (
        count < _PARALLEL_MIN
        or workers < 2
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        for i in range(count):
            task(i)
        return
    _TASK = task  # the forked workers inherit it; closures need no pickling
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(_run_task, range(count), chunksize=16):
                pass
    finally:
        _TASK = None


@dataclass
class _Views:
    tile_size: int
    pano_size: tuple[int, int]
    drone_size: int

    def satellite(self, rng, tile):
        return photometric(rng, tile)

    def ground(self, rng, tile):
        return photometric(rng, ground_view(tile, self.pano_size))

    def drone(self, rng, tile):
        return photometric(rng, drone_view(rng, tile, self.drone_size))


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def write_cvusa(
    root: str | os.PathLike,
    num_train: int = 200,
    num_val: int = 100,
    *,
    tile_size: int = 128,
    pano_size: tuple[int, int] = (64, 256),
    seed: int = 0,
    hard: HardSetting | None = None,
    locations: bool = False,
) -> Path:
    """Writes a synthetic CVUSA: ``splits/{train,val}-19zl.csv``, ``bingmap/19/<id>.jpg``,
    ``streetview/panos/<id>.jpg``. Returns ``root``.

    ``locations=True`` also writes ``split_locations/all.csv`` (the full release's positions:
    ``sat_lat, sat_lon, ground_lat, ground_lon, 0`` per id, on a jittered grid about 25 m
    apart), which :class:`~gsra_salad.data.CVUSA` reads into ``positions``.

    ``hard=HardSetting(...)`` writes the hard setting instead (docs/synthetic-benchmark.md): ground
    views covering ``fov_degrees`` of the horizon at an unknown heading (cut from a ``pano_size``
    panorama), objects present in one view only, and ``<root>/hard_setting.json`` (parameters
    and headings); the files are read by :class:`~gsra_salad.data.CVUSA` as usual.
    """
    if hard is not None:
        return _write_cvusa_hard(
            root, num_train, num_val, tile_size=tile_size, pano_size=pano_size, seed=seed,
            setting=hard,
        )  # fmt: skip
    root = Path(root)
    views = _Views(tile_size, pano_size, tile_size)
    rngs = _rngs(seed, num_train + num_val)
    rows = [
        [f"bingmap/19/{i}.jpg", f"streetview/panos/{i}.jpg", f"streetview/annotations/{i}.png"]
        for i in (f"{j:07d}" for j in range(1, len(rngs) + 1))
    ]

    def location(index: int) -> None:
        rng, (sat, ground, _) = rngs[index], rows[index]
        tile = aerial_tile(rng, tile_size)
        _save(views.satellite(rng, tile), root / sat)
        _save(views.ground(rng, tile), root / ground)

    _parallel(location, len(rngs))
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:num_train]), ("val", rows[num_train:])):
        with (root / "splits" / f"{name}-19zl.csv").open("w", newline="") as f:
            csv.writer(f).writerows(part)
    if locations:
        n = len(rows)
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack(np.divmod(np.arange(n), side), axis=1).astype(np.float64)
        jitter = np.random.default_rng([seed, 1]).normal(0, 0.1, (n, 2))
        lat_lon = np.array([40.0, -100.0]) + (grid + jitter) * 0.000225  # ~25 m
        (root / "split_locations").mkdir(parents=True, exist_ok=True)
        with (root / "split_locations" / "all.csv").open("w", newline="") as f:
            csv.writer(f).writerows(
                [f"{lat:.7f}", f"{lon:.7f}", f"{lat:.7f}", f"{lon:.7f}", 0] for lat, lon in lat_lon
            )
    return root


def write_cvact(
    root: str | os.PathLike,
    num_train: int = 200,
    num_val: int = 100,
    num_test: int = 100,
    *,
    tile_size: int = 128,
    pano_size: tuple[int, int] = (64, 256),
    missing: int = 0,
    seed: int = 0,
) -> Path:
    """Writes a synthetic CVACT: ``ACT_data.mat`` (``panoIds``, ``utm``, ``trainSet``,
    ``valSet``), train/val images under ``ANU_data_small/`` and test images under
    ``ANU_data_test/``. ``missing`` drops that many train panoramas (to exercise skipping).
    Locations lie on a jittered grid 25 m apart in UTM metres. Returns ``root``."""
    sio = require("scipy.io")
    root = Path(root)
    n = num_train + num_val + num_test
    views = _Views(tile_size, pano_size, tile_size)
    rngs = _rngs(seed, n + 1)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1).astype(np.float64) * 25.0
    utm = grid + rngs[-1].normal(0, 3.0, (n, 2)) + np.array([4_000_000.0, 600_000.0])
    ids = np.array([f"synthetic_{i:06d}" for i in range(n)])

    def location(i: int) -> None:
        pid, rng = ids[i], rngs[i]
        folder = root / ("ANU_data_test" if i >= num_train + num_val else "ANU_data_small")
        tile = aerial_tile(rng, tile_size)
        _save(views.satellite(rng, tile), folder / "satview_polish" / f"{pid}_satView_polish.jpg")
        if i < missing:
            return
        _save(views.ground(rng, tile), folder / "streetview" / f"{pid}_grdView.jpg")

    _parallel(location, n)
    train = np.arange(1, num_train + 1, dtype=np.float64).reshape(-1, 1)
    val = np.arange(num_train + 1, num_train + num_val + 1, dtype=np.float64).reshape(-1, 1)
    sio.savemat(
        str(root / "ACT_data.mat"),
        {
            "panoIds": ids,
            "utm": utm,
            "trainSet": {"trainNum": float(num_train), "trainInd": train},
            "valSet": {"valNum": float(num_val), "valInd": val},
        },
    )
    return root


def write_university1652(
    root: str | os.PathLike,
    num_train: int = 50,
    num_test: int = 50,
    *,
    num_distractors: int = 10,
    drones_per_building: int = 4,
    tile_size: int = 128,
    drone_size: int = 128,
    seed: int = 0,
) -> Path:
    """Writes a synthetic University-1652: ``train/{satellite,drone}/<id>/`` and
    ``test/{query_drone,gallery_satellite,query_satellite,gallery_drone}/<id>/``, with
    ``num_distractors`` extra buildings in ``gallery_satellite`` only. Returns ``root``."""
    root = Path(root)
    views = _Views(tile_size, (tile_size // 2, tile_size * 2), drone_size)
    n = num_train + num_test + num_distractors
    rngs = _rngs(seed, n)

    def location(i: int) -> None:
        rng, bid = rngs[i], f"{i:04d}"
        tile = aerial_tile(rng, tile_size)
        if i < num_train:
            sat_dirs, drone_dirs = ["train/satellite"], ["train/drone"]
        elif i < num_train + num_test:
            sat_dirs = ["test/gallery_satellite", "test/query_satellite"]
            drone_dirs = ["test/query_drone", "test/gallery_drone"]
        else:
            sat_dirs, drone_dirs = ["test/gallery_satellite"], []
        for d in sat_dirs:
            _save(views.satellite(rng, tile), root / d / bid / f"{bid}.jpg")
        for d in drone_dirs:
            for k in range(1, drones_per_building + 1):
                _save(views.drone(rng, tile), root / d / bid / f"image-{k:02d}.jpeg")

    _parallel(location, n)
    return root


def colour_histogram_descriptors(images: Tensor, bins: int = 8) -> Tensor:
    """The appearance-only baseline: joint RGB histograms, L2-normalised.

    Args:
        images: (N, 3, H, W) uint8 (or floats in [0, 1]).
        bins: bins per channel.

    Returns:
        (N, bins**3) descriptors; cosine similarity compares two images' colour statistics.
    """
    x = images if not images.is_floating_point() else (images.clamp(0, 1) * 255).round()
    q = torch.div(x.long().clamp(0, 255) * bins, 256, rounding_mode="floor")  # (N, 3, H, W)
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = torch.zeros(images.shape[0], bins**3, dtype=torch.float64)
    hist.scatter_add_(1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=torch.float64))
    return torch.nn.functional.normalize(hist, dim=1)


from ._synthetic_hard import HardSetting  # noqa: E402  (uses this module's helpers)
from ._synthetic_hard import write_cvusa_hard as _write_cvusa_hard  # noqa: E402
from ._synthetic_region import write_region  # noqa: E402  (one map, tiles, panoramas anywhere)
