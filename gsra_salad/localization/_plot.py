"""A map of localisation results drawn with Pillow (no matplotlib). Private."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._optional import require
from .localize import Localization

PANEL = 360
MARGIN = 24
FOOTPRINT = (200, 200, 200)
TOP_K = (30, 90, 220)
ESTIMATE = (220, 0, 0)
TRUTH = (0, 170, 0)
_FOOTPRINT_POINTS = 20_000


def _xy(positions: np.ndarray, metric: str) -> np.ndarray:
    """Plot coordinates (east, north): (lon, lat) for degrees, (x, y) for metres."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    return p[:, ::-1] if metric == "haversine" else p


def save_map(
    path: str | Path,
    results: Sequence[Localization],
    gallery_positions: np.ndarray,
    metric: str,
    truths: Sequence[tuple[float, float] | None] | None = None,
) -> Path:
    """One panel per result, side by side (four a row): the gallery's tiles in grey, the top-k
    tiles in blue (larger = better ranked), the estimate as a red cross and the true position,
    where known, as a green circle, north up. Returns ``path``."""
    image_module = require("PIL.Image", "data")
    draw_module = require("PIL.ImageDraw", "data")
    rng = np.random.default_rng(0)
    gallery = _xy(gallery_positions, metric)
    if len(gallery) > _FOOTPRINT_POINTS:
        gallery = gallery[rng.choice(len(gallery), _FOOTPRINT_POINTS, replace=False)]
    lo, hi = gallery.min(0), gallery.max(0)
    span = float(max(hi - lo)) or 1.0
    centre = (lo + hi) / 2
    scale = (PANEL - 2 * MARGIN) / span

    def to_pixels(p: np.ndarray) -> np.ndarray:
        q = (p - centre) * scale
        return np.stack([PANEL / 2 + q[:, 0], PANEL / 2 - q[:, 1]], axis=1)

    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    canvas = image_module.new("RGB", (cols * PANEL, rows * PANEL), (255, 255, 255))
    draw = draw_module.Draw(canvas)
    footprint = to_pixels(gallery)
    for i, result in enumerate(results):
        ox, oy = (i % cols) * PANEL, (i // cols) * PANEL
        draw.rectangle([ox, oy, ox + PANEL - 1, oy + PANEL - 1], outline=(0, 0, 0))
        for x, y in footprint:
            draw.point((ox + x, oy + y), fill=FOOTPRINT)
        top = to_pixels(_xy(np.array([t.position for t in result.top]), metric))
        for rank, (x, y) in reversed(list(enumerate(top))):
            r = max(2, 7 - rank)
            draw.ellipse([ox + x - r, oy + y - r, ox + x + r, oy + y + r], fill=TOP_K)
        truth = truths[i] if truths is not None else None
        if truth is not None:
            (x, y) = to_pixels(_xy(np.array(truth), metric))[0]
            draw.ellipse([ox + x - 6, oy + y - 6, ox + x + 6, oy + y + 6], outline=TRUTH, width=2)
        (x, y) = to_pixels(_xy(np.array(result.position), metric))[0]
        draw.line([ox + x - 6, oy + y - 6, ox + x + 6, oy + y + 6], fill=ESTIMATE, width=2)
        draw.line([ox + x - 6, oy + y + 6, ox + x + 6, oy + y - 6], fill=ESTIMATE, width=2)
        label = (result.photo or f"photo {i}")[-40:]
        error = result.extra.get("error_m")
        if error is not None:
            label += f"  error {error:.1f} m"
        draw.text((ox + 4, oy + 4), label, fill=(0, 0, 0))
    path = Path(path)
    canvas.save(path, format="PNG")
    return path
