"""Cross-view geometry: the polar transform of aerial images, the paired rotation, distances."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["haversine_m", "nearest_neighbours", "polar_transform", "rotate_pair"]

EARTH_RADIUS_M = 6_371_008.8


def polar_transform(aerial: Tensor, size: tuple[int, int]) -> Tensor:
    """Resamples an aerial image centred on the camera into panorama geometry (SAFA-style).

    Panorama column ``j`` looks along the azimuth ``2 pi (j + 0.5) / W``, clockwise from north
    (image up); row ``i`` samples the radius ``R (H - i - 0.5) / H`` (top row far, bottom row
    at the centre), with ``R`` half the aerial image's shorter side. Bilinear, vectorised over
    the batch with ``grid_sample``. With these pixel-centre conventions a 90-degree rotation of
    the aerial image is exactly a roll of the panorama by W / 4 (see :func:`rotate_pair`) and a
    horizontal flip of both views keeps them consistent.

    Args:
        aerial: (C, S, S) or (B, C, S, S) image; any dtype (integers are returned rounded).
        size: (H, W) of the panorama.

    Returns:
        (C, H, W) or (B, C, H, W) panorama, in the input's dtype.

    Example:
        >>> polar_transform(torch.rand(3, 64, 64), (16, 64)).shape
        torch.Size([3, 16, 64])
    """
    if aerial.dim() not in (3, 4):
        raise ValueError(f"aerial must be (C, S, S) or (B, C, S, S), got {tuple(aerial.shape)}")
    h, w = size
    batched = aerial.dim() == 4
    x = aerial if batched else aerial.unsqueeze(0)
    dtype = x.dtype
    xf = x.float() if not x.is_floating_point() else x
    rows = (h - torch.arange(h, dtype=torch.float64, device=x.device) - 0.5) / h  # radius / R
    theta = 2 * math.pi * (torch.arange(w, dtype=torch.float64, device=x.device) + 0.5) / w
    sh, sw = x.shape[-2:]
    radius = min(sh, sw) / 2
    # grid_sample coordinates in [-1, 1] with align_corners=False: pixel p -> (2p + 1) / n - 1
    gx = rows[:, None] * torch.sin(theta)[None, :] * (2 * radius / sw)
    gy = -rows[:, None] * torch.cos(theta)[None, :] * (2 * radius / sh)
    grid = torch.stack([gx, gy], dim=-1).to(xf.dtype).expand(x.shape[0], h, w, 2)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not dtype.is_floating_point:
        out = out.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    return out if batched else out.squeeze(0)


def rotate_pair(aerial: Tensor, panorama: Tensor, quarter_turns: int) -> tuple[Tensor, Tensor]:
    """Rotates the aerial view by ``quarter_turns`` x 90 degrees counter-clockwise and rolls the
    panorama to match (by ``-quarter_turns * W / 4`` columns), so the pair stays consistent.

    Args:
        aerial: (..., S, S).
        panorama: (..., H, W) with W divisible by 4.
        quarter_turns: any integer.

    Returns:
        The rotated aerial image and the rolled panorama.
    """
    w = panorama.shape[-1]
    if w % 4:
        raise ValueError(f"panorama width must be divisible by 4 to roll by quarter turns, got {w}")
    k = quarter_turns % 4
    return torch.rot90(aerial, k, dims=(-2, -1)), torch.roll(panorama, -k * w // 4, dims=-1)


def haversine_m(lat_lon_a: np.ndarray, lat_lon_b: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between (..., 2) arrays of (latitude, longitude) degrees.

    Example:
        >>> round(float(haversine_m(np.array([0.0, 0.0]), np.array([0.0, 1.0]))))
        111195
    """
    a = np.radians(np.asarray(lat_lon_a, dtype=np.float64))
    b = np.radians(np.asarray(lat_lon_b, dtype=np.float64))
    dlat = b[..., 0] - a[..., 0]
    dlon = b[..., 1] - a[..., 1]
    h = np.sin(dlat / 2) ** 2 + np.cos(a[..., 0]) * np.cos(b[..., 0]) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def _check_finite_rows(points: np.ndarray | Tensor, name: str) -> None:
    """Raises a ValueError naming the rows of ``points`` (N, D) that hold NaN or inf. Private."""
    x = torch.as_tensor(np.asarray(points) if not isinstance(points, Tensor) else points)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
    if x.is_floating_point():
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name} holds NaN or infinite values in {len(bad)} of {x.shape[0]} rows "
                f"(indices {bad[:10]}{' ...' if len(bad) > 10 else ''}); neighbours of an "
                "unknown position are undefined: leave those samples out (e.g. "
                "torch.utils.data.Subset of the other indices, with their labels and positions)"
            )


def nearest_neighbours(
    points: np.ndarray | Tensor, k: int, metric: str = "euclidean", chunk: int = 1024
) -> np.ndarray:
    """Indices (N, k) of each point's k nearest other points, computed in row chunks.

    Args:
        points: (N, 2) positions, or (N, D) embeddings.
        k: neighbours per point (at most N - 1).
        metric: ``"haversine"`` ((latitude, longitude) degrees, metres), ``"euclidean"`` (e.g.
            UTM metres) or ``"cosine"`` (embeddings; nearest = most similar).
        chunk: rows per block; memory is O(chunk N).

    Raises:
        ValueError: for an unknown metric, a k outside [1, N - 1], or points that are not
            (N, D) or hold NaN / infinite values (the error names the first such rows).

    Example:
        >>> nearest_neighbours(np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 5.0]]), 1).tolist()
        [[1], [0], [1]]
    """
    if metric not in ("haversine", "euclidean", "cosine"):
        raise ValueError(f"metric must be 'haversine', 'euclidean' or 'cosine', got {metric!r}")
    x = torch.as_tensor(np.asarray(points) if not isinstance(points, Tensor) else points)
    x = x.detach().to(torch.float64).cpu()
    _check_finite_rows(x, "points")
    n = x.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be between 1 and N - 1 = {n - 1}, got {k}")
    if metric == "haversine":
        lat, lon = torch.deg2rad(x[:, 0]), torch.deg2rad(x[:, 1])
    elif metric == "cosine":
        x = F.normalize(x, dim=1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        if metric == "haversine":
            dlat = lat[None, :] - lat[rows, None]
            dlon = lon[None, :] - lon[rows, None]
            h = torch.sin(dlat / 2) ** 2 + torch.cos(lat[rows, None]) * torch.cos(lat[None, :]) * (
                torch.sin(dlon / 2) ** 2
            )
            dist = h  # monotone in the great-circle distance
        elif metric == "euclidean":
            dist = torch.cdist(x[rows], x)
        else:
            dist = -(x[rows] @ x.T)
        dist[torch.arange(dist.shape[0]), torch.arange(rows.start, rows.stop)] = math.inf
        out[rows] = torch.topk(dist, k, dim=1, largest=False).indices.numpy()
    return out
