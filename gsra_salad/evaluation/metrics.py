"""Retrieval metrics as pure functions of the true matches' positions in each ranking.

A *position* is 0-based: position 0 is the top of the ranking (junk already removed). The
functions take positions, not similarities, so the search that produces them (streaming,
FAISS, a per-query loop) is interchangeable and each metric is a few lines of arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "EARTH_RADIUS_M",
    "average_precision",
    "geodesic_distance",
    "recall_at_k",
]

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), as in gsra_salad.data.haversine_m


def recall_at_k(first_positions: Tensor, k: int) -> float:
    """Percentage of queries whose first true match is ranked in the top ``k``.

    A query hits iff its first true match's position is ``< k`` (CMC[k - 1] of the
    University-1652 evaluation; ``rank < k`` of the CVUSA/CVACT one). Queries without any true
    match carry a position of at least the gallery size (they count as misses).

    Args:
        first_positions: (Q,) integer positions, 0 = top of the ranking.
        k: cut-off, >= 1.

    Returns:
        Recall@k in percent.

    Example:
        >>> recall_at_k(torch.tensor([0, 3, 1, 12]), k=2)
        50.0
    """
    if k < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {k}")
    if first_positions.numel() == 0:
        raise ValueError("recall_at_k: first_positions is empty (no queries)")
    hits = (first_positions < k).sum().item()
    return 100.0 * hits / first_positions.numel()


def average_precision(true_positions: Tensor) -> Tensor:
    """The official University-1652 average precision of each query.

    With the query's n true matches at ascending positions ``r_0 < r_1 < ...`` (junk removed),
    ``AP = sum_i (1/n) ((i / r_i if r_i > 0 else 1) + (i + 1) / (r_i + 1)) / 2`` (the trapezoid
    rule of ``compute_mAP`` in the University1652-Baseline code). A query without true matches
    has AP 0.

    Args:
        true_positions: (Q, T) integer positions of each query's true matches, ascending, padded
            with -1 at the end of rows with fewer than T matches.

    Returns:
        (Q,) float64 AP in [0, 1].

    Example:
        >>> average_precision(torch.tensor([[0, 2], [1, -1]]))
        tensor([0.7917, 0.2500], dtype=torch.float64)
    """
    if true_positions.dim() != 2:
        raise ValueError(
            f"average_precision: true_positions must have shape (Q, T), "
            f"got {tuple(true_positions.shape)}"
        )
    valid = true_positions >= 0
    r = true_positions.to(torch.float64).clamp(min=0)
    i = torch.arange(true_positions.shape[1], dtype=torch.float64, device=r.device)
    old_precision = torch.where(r > 0, i / r.clamp(min=1), torch.ones_like(r))
    precision = (i + 1) / (r + 1)
    n = valid.sum(1)
    terms = ((old_precision + precision) / 2).masked_fill(~valid, 0.0).sum(1)
    return torch.where(n > 0, terms / n.clamp(min=1), torch.zeros_like(terms))


def geodesic_distance(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Distance in metres between positions, per row.

    Args:
        a: (N, 2) positions.
        b: (N, 2) positions.
        metric: ``"euclidean"`` for planar coordinates in metres (e.g. UTM easting, northing;
            CVACT's ``utm``) or ``"haversine"`` for (latitude, longitude) in degrees on a sphere
            of radius :data:`EARTH_RADIUS_M`.

    Returns:
        (N,) float64 distances in metres.

    Example:
        >>> geodesic_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), "euclidean")
        tensor([5.], dtype=torch.float64)
        >>> geodesic_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]), "haversine")
        tensor([111195.0802], dtype=torch.float64)
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    if metric == "euclidean":
        return (a - b).norm(dim=1)
    if metric == "haversine":
        a, b = torch.deg2rad(a), torch.deg2rad(b)
        dlat, dlon = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
        h = (
            torch.sin(dlat / 2) ** 2
            + torch.cos(a[:, 0]) * torch.cos(b[:, 0]) * torch.sin(dlon / 2) ** 2
        )
        return 2 * EARTH_RADIUS_M * torch.asin(h.clamp(0.0, 1.0).sqrt())
    raise ValueError(
        f"geodesic_distance: metric must be 'euclidean' (metres) or 'haversine' (degrees), "
        f"got {metric!r}"
    )


def _median(x: Tensor) -> float:
    """The median as numpy computes it (mean of the two middle values for an even count)."""
    s = x.sort().values
    n = s.numel()
    mid = n // 2
    return float(s[mid]) if n % 2 else float((s[mid - 1] + s[mid]) / 2)


def localisation_summary(errors_m: Tensor) -> dict[str, float]:
    """Median error (metres) and the share within 25 m and 1 km (percent). Private helper."""
    n = errors_m.numel()
    return {
        "median_error_m": _median(errors_m),
        "within_25m": 100.0 * (errors_m <= 25.0).sum().item() / n,
        "within_1km": 100.0 * (errors_m <= 1000.0).sum().item() / n,
    }
