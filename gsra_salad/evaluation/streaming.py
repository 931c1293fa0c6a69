"""Streaming similarity search: exact ranks without the full query x reference matrix.

Queries are processed in chunks of C rows; each chunk's similarities to every reference form a
(C, R) float32 block (memory O(C R)), from which the positions of the true matches are counted
exactly and the block is dropped. Descriptors stored in float16/bfloat16 are converted to
float32 block by block, so no float32 copy of the gallery is ever made.

Public: :func:`search` (the top-k references of every query, also
``gsra_salad.evaluation.search``) and :func:`similarity_block` (one chunk's scores, what the
gallery index of :mod:`gsra_salad.localization` streams with). The rest serves
:func:`~gsra_salad.evaluation.evaluate_retrieval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["search", "similarity_block"]

# elements of one (C, R) similarity block when the chunk size is automatic (128 MiB float32)
_BLOCK_ELEMENTS = 2**25
# elements of one float32 copy of a slice of low-precision references (64 MiB)
_CONVERT_ELEMENTS = 2**24
# elements of the comparison masks counted at once
_COUNT_ELEMENTS = 2**22
# up to this many true matches per query, count by comparison passes; beyond, sort the block
_COUNT_BY_COMPARISON = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def similarity_block(query_chunk: Tensor, reference: Tensor) -> Tensor:
    """(C, R) inner products of a chunk of queries (C, D) and references (R, D), in float32
    (float64 for float64 inputs); low-precision references are converted slice by slice.

    Example:
        >>> similarity_block(torch.eye(2), torch.eye(2, dtype=torch.float16)).dtype
        torch.float32
    """
    dtype = _compute_dtype(torch.promote_types(query_chunk.dtype, reference.dtype))
    q = query_chunk.to(dtype)
    if reference.dtype == dtype:
        return q @ reference.T
    out = torch.empty(q.shape[0], reference.shape[0], dtype=dtype, device=q.device)
    step = max(1, _CONVERT_ELEMENTS // max(1, reference.shape[1]))
    for start in range(0, reference.shape[0], step):
        out[:, start : start + step] = q @ reference[start : start + step].to(dtype).T
    return out


def auto_chunk_size(num_references: int, dim: int = 1, *, sort: bool = False) -> int:
    """Queries per chunk so that one similarity block holds about 2**25 elements (a sort needs
    values and int64 indices too: a third of that) and the chunk's float32 copy (for
    low-precision storage) about 2**24."""
    budget = _BLOCK_ELEMENTS // (3 if sort else 1)
    return max(1, min(budget // max(1, num_references), _CONVERT_ELEMENTS // max(1, dim)))


@dataclass
class Positions:
    """Per-query results of the streaming pass (private).

    first: (Q,) position of the first true match; ``num_kept`` when the query has none.
    true: (Q, T) ascending positions of all true matches, padded with -1 (or None).
    top1: (Q,) index (into the full reference set) of the most similar kept reference (or None).
    tied: (Q,) bool, the first true match scores exactly as high as a wrong reference (the
        tie rule decides its position). False for queries without a true match.
    """

    first: Tensor
    true: Tensor | None
    top1: Tensor | None
    tied: Tensor


def true_match_indices(
    query_labels: Tensor, reference_labels: Tensor, kept: Tensor
) -> tuple[Tensor, Tensor]:
    """For each query, the indices of the kept references sharing its label.

    Returns ``(indices (Q, T), counts (Q,))`` with T the largest count; rows are padded with
    -1. Sorting the gallery's labels once makes this O((Q + R) log R), never O(Q R).
    """
    kept_index = kept.nonzero().flatten()
    labels = reference_labels[kept_index]
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    lo = torch.searchsorted(sorted_labels, query_labels, right=False)
    hi = torch.searchsorted(sorted_labels, query_labels, right=True)
    counts = hi - lo
    t = int(counts.max()) if counts.numel() else 0
    offsets = torch.arange(t, device=query_labels.device)
    valid = offsets < counts.unsqueeze(1)
    where = (lo.unsqueeze(1) + offsets).clamp(max=max(0, len(order) - 1))
    if len(order) == 0:
        return torch.full((len(query_labels), 0), -1, dtype=torch.long), counts
    indices = kept_index[order[where]].masked_fill(~valid, -1)
    return indices, counts


def _count_above(scores: Tensor, vals: Tensor, *, inclusive: bool) -> Tensor:
    """(C, T) counts of ``scores[c] > vals[c, t]`` (``>=`` when ``inclusive``), over row
    slices: a comparison's bool mask and the integer copy that ``sum`` makes of it stay at
    ~2**22 elements each."""
    compare = torch.ge if inclusive else torch.gt
    out = torch.empty(vals.shape, dtype=torch.long, device=scores.device)
    rows = max(1, _COUNT_ELEMENTS // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], rows):
        block = scores[start : start + rows]
        for i in range(vals.shape[1]):
            mask = compare(block, vals[start : start + rows, i : i + 1])
            out[start : start + rows, i] = mask.sum(1)
    return out


def positions_from_scores(
    scores: Tensor, true_index: Tensor, *, sort: bool, ties: str = "pessimistic"
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact positions of the true matches in each row's ranking.

    ``scores`` (C, R) has junk set to -inf; ``true_index`` (C, T) holds the true matches'
    columns (-1 = padding). Ties are exactly equal scores as computed. With
    ``ties="pessimistic"`` the i-th best true match (scores descending) sits at position
    ``#{non-true j: s_j >= s_(i)} + i``: every wrong reference as similar as a true match is
    ranked before it. With ``ties="optimistic"`` (Sample4Geo's rule) it sits at
    ``#{non-true j: s_j > s_(i)} + i``: ties do not hurt the query. Returns
    ``(positions (C, T) padded with -1, counts (C,), tied (C,))``, ``tied`` telling whether
    the best true match scores exactly as high as a wrong reference.
    """
    t = true_index.shape[1]
    inclusive = ties == "pessimistic"
    valid = true_index >= 0
    vals = scores.gather(1, true_index.clamp(min=0)).masked_fill(~valid, float("-inf"))
    vals = vals.sort(dim=1, descending=True).values  # valid ones first
    # true matches counted with the i-th one: they are among the counted references. Valid
    # scores are finite, so the -inf padding is never counted
    if inclusive:
        true_above = (vals.unsqueeze(1) >= vals.unsqueeze(2)).sum(-1)
    else:
        true_above = (vals.unsqueeze(1) > vals.unsqueeze(2)).sum(-1)
    if not sort:
        above = _count_above(scores, vals, inclusive=inclusive)
    else:  # references below the i-th true match's score (or at it, for the optimistic rule)
        ranked = scores.sort(dim=1).values
        below = torch.searchsorted(ranked, vals.contiguous(), right=not inclusive)
        above = scores.shape[1] - below
    counts = valid.sum(1)
    i = torch.arange(t, device=scores.device)
    positions = above - true_above + i
    positions = positions.masked_fill(i >= counts.unsqueeze(1), -1)
    # wrong references exactly as similar as the best true match (-inf = junk never counts)
    best = vals[:, :1]
    true_equal = (vals == best).sum(1)
    if not sort:
        equal = _count_equal(scores, best)
    else:
        equal = (
            torch.searchsorted(ranked, best.contiguous(), right=True)[:, 0]
            - (torch.searchsorted(ranked, best.contiguous(), right=False)[:, 0])
        )
    tied = (equal > true_equal) & (counts > 0)
    return positions, counts, tied


def _count_equal(scores: Tensor, vals: Tensor) -> Tensor:
    """(C,) counts of ``scores[c] == vals[c, 0]``, over row slices like :func:`_count_above`."""
    out = torch.empty(vals.shape[0], dtype=torch.long, device=scores.device)
    rows = max(1, _COUNT_ELEMENTS // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], rows):
        block = scores[start : start + rows]
        out[start : start + rows] = (block == vals[start : start + rows]).sum(1)
    return out


def streaming_positions(
    query: Tensor,
    reference: Tensor,
    true_index: Tensor,
    kept: Tensor,
    *,
    chunk_size: int | None,
    need_true: bool,
    need_top1: bool,
    ties: str = "pessimistic",
) -> Positions:
    """The built-in backend: one pass over query chunks (private)."""
    q_count, r_count = query.shape[0], reference.shape[0]
    t = true_index.shape[1]
    sort = t > _COUNT_BY_COMPARISON
    chunk = chunk_size or auto_chunk_size(r_count, query.shape[1], sort=sort)
    num_kept = int(kept.sum())
    junk = None if bool(kept.all()) else ~kept.unsqueeze(0)
    first = torch.full((q_count,), num_kept, dtype=torch.long, device=query.device)
    true = (
        torch.full((q_count, t), -1, dtype=torch.long, device=query.device) if need_true else None
    )
    top1 = torch.empty(q_count, dtype=torch.long, device=query.device) if need_top1 else None
    tied = torch.zeros(q_count, dtype=torch.bool, device=query.device)
    for start in range(0, q_count, chunk):
        stop = min(start + chunk, q_count)
        scores = similarity_block(query[start:stop], reference)
        if junk is not None:
            scores.masked_fill_(junk, float("-inf"))
        if top1 is not None:
            top1[start:stop] = scores.argmax(dim=1)
        if t == 0:
            continue
        positions, counts, tied[start:stop] = positions_from_scores(
            scores, true_index[start:stop], sort=sort, ties=ties
        )
        first[start:stop] = torch.where(counts > 0, positions[:, 0], num_kept)
        if true is not None:
            true[start:stop] = positions
        del scores
    return Positions(first=first, true=true, top1=top1, tied=tied)


def search(
    query_descriptors: Tensor,
    reference_descriptors: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar references of every query (inner product), streamed.

    Memory O(chunk_size x R); descriptors may be float16/bfloat16 (compared in float32). The
    order of references with equal scores is unspecified.

    Args:
        query_descriptors: (Q, D).
        reference_descriptors: (R, D), on the same device.
        k: number of references per query, 1 <= k <= R.
        chunk_size: queries per similarity block; default: about 2**25 block elements.

    Returns:
        ``(scores (Q, k) float32, indices (Q, k) int64)``, most similar first.

    Example:
        >>> r = torch.eye(4)
        >>> scores, indices = search(torch.tensor([[0.1, 0.9, 0.3, 0.0]]), r, k=2)
        >>> indices
        tensor([[1, 2]])
    """
    from .retrieval import _check_descriptors

    _check_descriptors(query_descriptors, reference_descriptors, owner="search")
    r_count = reference_descriptors.shape[0]
    if not isinstance(k, int) or not 1 <= k <= r_count:
        raise ValueError(f"search: k must be an int in [1, {r_count}] (the gallery size), got {k}")
    chunk = chunk_size or auto_chunk_size(r_count, query_descriptors.shape[1])
    scores, indices = [], []
    for start in range(0, query_descriptors.shape[0], chunk):
        block = similarity_block(query_descriptors[start : start + chunk], reference_descriptors)
        s, i = block.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)
