"""The FAISS backend of ``evaluate_retrieval`` (the ``faiss`` extra). Private.

An exact inner-product index (``faiss.IndexFlatIP``) over the kept references, searched in
query chunks. For ``protocol="cvusa"`` only the top ``k_max + 1`` of each query are kept
(memory O(chunk x k_max)): a query whose true reference is not among them has rank >= k_max,
a miss at every reported k, whatever the tie rule. The one extra neighbour settles ties at the
cut: under the pessimistic rule a true reference tied with the (k_max + 1)-th is a miss; under
the optimistic rule a query whose true reference is absent while the k_max-th and
(k_max + 1)-th scores are equal may still be a hit, and only those queries are searched again
over the whole ranking. For University-1652 the AP needs every true match's position, so each
chunk is searched for the whole ranking and the scores go through the same exact counting as
the built-in backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._optional import require
from .streaming import Positions, auto_chunk_size, positions_from_scores

_COUNT_BY_COMPARISON = 16


def _as_numpy(x: Tensor):
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def faiss_positions(
    query: Tensor,
    reference: Tensor,
    true_index: Tensor,
    kept: Tensor,
    *,
    chunk_size: int | None,
    full: bool,
    k_max: int,
    need_top1: bool,
    ties: str = "pessimistic",
) -> Positions:
    faiss = require("faiss", "faiss")
    device = query.device
    kept_index = kept.nonzero().flatten().cpu()
    num_kept, r_count = len(kept_index), reference.shape[0]
    index = faiss.IndexFlatIP(reference.shape[1])
    step = max(1, 2**24 // reference.shape[1])
    for start in range(0, num_kept, step):  # float32 copies slice by slice
        index.add(_as_numpy(reference[kept_index[start : start + step].to(reference.device)]))

    true_index = true_index.cpu()
    q_count, t = query.shape[0], true_index.shape[1]
    first = torch.full((q_count,), num_kept, dtype=torch.long)
    true = torch.full((q_count, t), -1, dtype=torch.long) if full else None
    top1 = torch.empty(q_count, dtype=torch.long) if need_top1 else None
    tied = torch.zeros(q_count, dtype=torch.bool)
    k = num_kept if full else min(k_max + 1, num_kept)
    chunk = chunk_size or auto_chunk_size(k, query.shape[1], sort=True)
    for start in range(0, q_count, chunk):
        stop = min(start + chunk, q_count)
        scores_np, ids_np = index.search(_as_numpy(query[start:stop]), k)
        scores, ids = torch.from_numpy(scores_np), kept_index[torch.from_numpy(ids_np)]
        if top1 is not None:
            top1[start:stop] = ids[:, 0]
        if t == 0:
            continue
        chunk_true = true_index[start:stop]
        if full:
            dense = _dense(scores, ids, r_count)
            positions, counts, tied[start:stop] = positions_from_scores(
                dense, chunk_true, sort=t > _COUNT_BY_COMPARISON, ties=ties
            )
            true[start:stop] = positions
            first[start:stop] = torch.where(counts > 0, positions[:, 0], num_kept)
        else:  # one true reference per query: its rank from the top k, if it is there
            first[start:stop], tied[start:stop] = _rank_in_top(scores, ids, chunk_true[:, 0], ties)
            if ties == "optimistic" and k < num_kept:
                # absent, but tied with the k_max-th: search the whole ranking of those queries
                again = (first[start:stop] >= k) & (scores[:, k - 2] == scores[:, k - 1])
                rows = again.nonzero().flatten()
                if len(rows):
                    s_all, i_all = index.search(_as_numpy(query[start:stop][rows]), num_kept)
                    dense = _dense(torch.from_numpy(s_all), kept_index[torch.from_numpy(i_all)],
                                   r_count)  # fmt: skip
                    rank, _, tied[start + rows] = positions_from_scores(
                        dense, chunk_true[rows, :1], sort=False, ties=ties
                    )
                    first[start + rows] = rank[:, 0]
    return Positions(
        first=first.to(device),
        true=None if true is None else true.to(device),
        top1=None if top1 is None else top1.to(device),
        tied=tied.to(device),
    )


def _dense(scores: Tensor, ids: Tensor, r_count: int) -> Tensor:
    """(C, R) scores with -inf for the references that the search did not return."""
    dense = torch.full((scores.shape[0], r_count), float("-inf"))
    return dense.scatter_(1, ids, scores)


def _rank_in_top(scores: Tensor, ids: Tensor, true: Tensor, ties: str) -> tuple[Tensor, Tensor]:
    """(C,) rank of each query's true reference from its top k (``k`` when it is absent), and
    (C,) whether a wrong reference of the top k scores exactly as high as it. The rank is
    the number of wrong references of the top k that score at least as high (``"pessimistic"``)
    or higher (``"optimistic"``). Rows are sorted descending, so when the true reference is
    present the top k holds every reference scoring higher, and under the pessimistic rule a
    reference tied with it may be missing only when the k-th is tied too: the rank is then
    k - 1 or more, and k - 1 >= k_max is a miss at every reported k."""
    k = scores.shape[1]
    found = ids == true.unsqueeze(1)
    in_top = found.any(1)
    true_score = torch.where(found, scores, torch.zeros_like(scores)).sum(1, keepdim=True)
    if ties == "pessimistic":
        rank = ((scores >= true_score) & ~found).sum(1)
    else:
        rank = (scores > true_score).sum(1)
    tied = ((scores == true_score) & ~found).any(1) & in_top
    return torch.where(in_top, rank, torch.full_like(rank, k)), tied
