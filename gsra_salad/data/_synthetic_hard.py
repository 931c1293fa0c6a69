"""The hard synthetic CVUSA setting: limited field of view, unknown heading, one-view objects.

Private plumbing of :func:`gsra_salad.data.synthetic.write_cvusa` (``hard=HardSetting(...)``).
Each location's views are built from one aerial tile:

1. **Scene changes between the two capture times.** ``ground_only_objects`` buildings and trees
   are drawn onto the tile the ground view sees and ``satellite_only_objects`` onto the tile
   the satellite sees (demolished / new buildings, felled / planted trees), in the location's
   own palette, so they look like the rest of the scene.
2. **Satellite view**: the satellite's tile plus transient objects seen from above only (cars,
   a cloud shadow), then the usual photometric change.
3. **Ground view**: the full north-aligned panorama (the polar transform of the ground's tile)
   rolled by the heading and cropped to ``fov_degrees``: ``crop = roll(pano, -shift)[:, :w]``
   with ``shift = heading / 360 * W`` columns and ``w = round(fov / 360 * W)``. The heading is
   drawn uniformly among the W column positions (unknown to the model). Then occluders seen from
   the street only (vehicles near the camera, poles, pedestrians) and the photometric change.

The headings are written to ``<root>/hard_setting.json`` with the parameters, so a user can
check orientation estimates; the reader (:class:`~gsra_salad.data.CVUSA`) ignores that file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import synthetic as _synthetic
from ._base import require

__all__ = ["HardSetting", "HardViews", "hard_views", "limited_fov", "write_cvusa_hard"]


@dataclass(frozen=True)
class HardSetting:
    """Parameters of the hard synthetic CVUSA (see :func:`~gsra_salad.data.synthetic.write_cvusa`).

    Args:
        fov_degrees: horizontal field of view of the ground view, in (0, 360]; the written
            ground image is ``(H, round(fov / 360 * W))`` for a panorama size ``(H, W)``. The
            default, 180, is the benchmark's (docs/synthetic-benchmark.md); 90 is harder.
        random_heading: draw the heading uniformly (unknown to the model); ``False`` keeps every
            ground view starting at north (azimuth 0).
        ground_only_objects: (min, max) buildings / trees present in the ground view's scene only.
        satellite_only_objects: (min, max) buildings / trees present in the satellite's scene only.
        occluders: (min, max) street-level occluders (vehicles, poles, pedestrians) drawn onto the
            ground view.
        transients: (min, max) cars seen in the satellite view only.
        cloud_shadow_p: probability of a cloud shadow (a darkened ellipse) on the satellite view.

    Example:
        >>> HardSetting(fov_degrees=180).ground_width(256)
        128
    """

    fov_degrees: float = 180.0
    random_heading: bool = True
    ground_only_objects: tuple[int, int] = (2, 5)
    satellite_only_objects: tuple[int, int] = (2, 5)
    occluders: tuple[int, int] = (1, 4)
    transients: tuple[int, int] = (3, 10)
    cloud_shadow_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.fov_degrees <= 360:
            raise ValueError(
                f"HardSetting: fov_degrees must be in (0, 360], got {self.fov_degrees} "
                "(e.g. 90 or 180 for a limited field of view, 360 for the full panorama)"
            )
        for name in ("ground_only_objects", "satellite_only_objects", "occluders", "transients"):
            lo_hi = getattr(self, name)
            if (
                len(lo_hi) != 2
                or not all(isinstance(v, (int, np.integer)) for v in lo_hi)
                or not 0 <= lo_hi[0] <= lo_hi[1]
            ):
                raise ValueError(
                    f"HardSetting: {name} must be a (min, max) pair of integers with "
                    f"0 <= min <= max, got {lo_hi!r}"
                )
        if not 0.0 <= self.cloud_shadow_p <= 1.0:
            raise ValueError(
                f"HardSetting: cloud_shadow_p must be in [0, 1], got {self.cloud_shadow_p}"
            )

    def ground_width(self, pano_width: int) -> int:
        """Width in pixels of the ground view cut from a panorama ``pano_width`` wide."""
        return max(1, min(pano_width, round(self.fov_degrees / 360 * pano_width)))


class HardViews(NamedTuple):
    """One location's views and the intermediates the tests check (all (H, W, 3) uint8)."""

    satellite: np.ndarray
    ground: np.ndarray
    heading_degrees: float
    panorama: np.ndarray  # the ground scene's full north-aligned panorama
    ground_clean: np.ndarray  # the crop, before occluders and photometric change


def limited_fov(panorama: np.ndarray, fov_degrees: float, heading_degrees: float) -> np.ndarray:
    """The part of a north-aligned panorama seen with a field of view starting at a heading.

    Column ``j`` of the panorama looks along azimuth ``360 (j + 0.5) / W`` (clockwise from
    north), so the view is ``roll(panorama, -round(heading / 360 * W))[:, :w]``.

    Args:
        panorama: (H, W, C) array.
        fov_degrees: field of view in (0, 360].
        heading_degrees: azimuth of the view's left edge, clockwise from north.

    Returns:
        (H, round(fov / 360 * W), C) array.

    Example:
        >>> limited_fov(np.arange(8).reshape(1, 8, 1), 90, 270)[..., 0]
        array([[6, 7]])
    """
    w = panorama.shape[1]
    width = HardSetting(fov_degrees=fov_degrees).ground_width(w)
    shift = round(heading_degrees / 360 * w) % w
    return np.roll(panorama, -shift, axis=1)[:, :width]


def _count(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _scene_objects(rng: np.random.Generator, tile: np.ndarray, count: int) -> np.ndarray:
    """Buildings and trees in the tile's own colours (sampled from its pixels): a scene change."""
    image_module = require("PIL.Image")
    draw_module = require("PIL.ImageDraw")
    size = tile.shape[0]
    canvas = image_module.fromarray(tile)
    draw = draw_module.Draw(canvas)
    for _ in range(count):
        # a colour taken from the tile itself, so the change does not stand out by colour
        y, x = rng.integers(0, size, 2)
        colour = tuple(int(c) for c in tile[y, x])
        centre = rng.uniform(0.1 * size, 0.9 * size, 2)
        if rng.random() < 0.6:
            half = rng.uniform(size / 30, size / 9, 2)
            theta = rng.uniform(0, np.pi)
            corners = _synthetic._rotated_rectangle(centre, half, theta)
            draw.polygon([tuple(p) for p in corners], fill=colour)
        else:
            r = rng.uniform(size / 40, size / 16)
            draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=colour)
    return np.array(canvas)


def _satellite_transients(rng: np.random.Generator, tile: np.ndarray, setting: HardSetting):
    """Cars (small bright or dark rectangles) and an optional cloud shadow, from above only."""
    image_module = require("PIL.Image")
    draw_module = require("PIL.ImageDraw")
    size = tile.shape[0]
    canvas = image_module.fromarray(tile)
    draw = draw_module.Draw(canvas)
    for _ in range(_count(rng, setting.transients)):
        centre = rng.uniform(0, size, 2)
        half = np.array([size / 50, size / 110]) * rng.uniform(0.8, 1.3)
        theta = rng.uniform(0, np.pi)
        corners = _synthetic._rotated_rectangle(centre, half, theta)
        grey = int(rng.choice([rng.integers(20, 60), rng.integers(190, 250)]))
        draw.polygon([tuple(p) for p in corners], fill=(grey, grey, grey))
    out = np.asarray(canvas).astype(np.float64)
    if rng.random() < setting.cloud_shadow_p:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 6, size / 2.5, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        out[inside] *= rng.uniform(0.45, 0.7)
    return np.clip(out, 0, 255).astype(np.uint8)


def _street_occluders(rng: np.random.Generator, view: np.ndarray, setting: HardSetting):
    """Vehicles (near the camera, bottom rows), poles (full height) and pedestrians."""
    image_module = require("PIL.Image")
    draw_module = require("PIL.ImageDraw")
    h, w = view.shape[:2]
    canvas = image_module.fromarray(np.ascontiguousarray(view))
    draw = draw_module.Draw(canvas)
    for _ in range(_count(rng, setting.occluders)):
        colour = tuple(int(c) for c in rng.integers(20, 236, 3))
        kind = rng.integers(3)
        x = rng.uniform(0, w)
        if kind == 0:  # a vehicle: a wide box on the lower part of the view
            width = rng.uniform(0.15, 0.4) * w
            top = rng.uniform(0.45, 0.7) * h
            draw.rectangle([x - width / 2, top, x + width / 2, h], fill=colour)
        elif kind == 1:  # a pole
            width = max(1.0, rng.uniform(0.01, 0.04) * w)
            draw.rectangle([x, 0, x + width, h], fill=colour)
        else:  # a pedestrian
            width = rng.uniform(0.03, 0.08) * w
            top = rng.uniform(0.3, 0.6) * h
            draw.ellipse([x - width / 2, top, x + width / 2, h], fill=colour)
    return np.array(canvas)


def hard_views(
    rng: np.random.Generator, tile: np.ndarray, pano_size: tuple[int, int], setting: HardSetting
) -> HardViews:
    """Builds one location's satellite and limited-field-of-view ground views from its tile.

    Args:
        rng: the location's generator (consumed in a fixed order: deterministic by seed).
        tile: (S, S, 3) uint8 aerial tile.
        pano_size: (H, W) of the full panorama the ground view is cut from.
        setting: the hard setting's parameters.

    Returns:
        :class:`HardViews`: satellite (S, S, 3), ground (H, w, 3) with
        ``w = setting.ground_width(W)``, the heading in degrees, and the intermediates.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> tile = _synthetic.aerial_tile(rng, 64)
        >>> views = hard_views(rng, tile, (32, 128), HardSetting(fov_degrees=90))
        >>> views.satellite.shape, views.ground.shape
        ((64, 64, 3), (32, 32, 3))
    """
    ground_tile = _scene_objects(rng, tile, _count(rng, setting.ground_only_objects))
    satellite_tile = _scene_objects(rng, tile, _count(rng, setting.satellite_only_objects))
    satellite = _synthetic.photometric(rng, _satellite_transients(rng, satellite_tile, setting))
    panorama = _synthetic.ground_view(ground_tile, pano_size)
    w = pano_size[1]
    shift = int(rng.integers(w)) if setting.random_heading else 0
    heading = 360.0 * shift / w
    crop = limited_fov(panorama, setting.fov_degrees, heading)
    ground = _synthetic.photometric(rng, _street_occluders(rng, crop, setting))
    return HardViews(satellite, ground, heading, panorama, crop)


def write_cvusa_hard(
    root: Path,
    num_train: int,
    num_val: int,
    *,
    tile_size: int,
    pano_size: tuple[int, int],
    seed: int,
    setting: HardSetting,
) -> Path:
    """The hard CVUSA layout (same files as the normal writer) plus ``hard_setting.json``."""
    if not isinstance(setting, HardSetting):
        raise TypeError(
            f"write_cvusa: hard must be a HardSetting or None, got {type(setting).__name__}; "
            "e.g. hard=HardSetting(fov_degrees=90)"
        )
    root = Path(root)
    rows, headings = [], {}
    for i, rng in enumerate(_synthetic._rngs(seed, num_train + num_val), start=1):
        views = hard_views(rng, _synthetic.aerial_tile(rng, tile_size), pano_size, setting)
        sat = f"bingmap/19/{i:07d}.jpg"
        ground = f"streetview/panos/{i:07d}.jpg"
        _synthetic._save(views.satellite, root / sat)
        _synthetic._save(views.ground, root / ground)
        rows.append([sat, ground, f"streetview/annotations/{i:07d}.png"])
        headings[i] = views.heading_degrees
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:num_train]), ("val", rows[num_train:])):
        with (root / "splits" / f"{name}-19zl.csv").open("w", newline="") as f:
            csv.writer(f).writerows(part)
    meta = {
        "setting": asdict(setting),
        "tile_size": tile_size,
        "pano_size": list(pano_size),
        "seed": seed,
        "ground_size": [pano_size[0], setting.ground_width(pano_size[1])],
        "heading_degrees": {str(k): v for k, v in headings.items()},
    }
    (root / "hard_setting.json").write_text(json.dumps(meta, indent=1))
    return root
