"""The FAISS backend of ``evaluate_retrieval`` (the ``faiss`` extra). Private.

An exact inner-product index (``faiss.IndexFlatIP``) over the kept references, searched in
query chunks. For ``protocol="cvusa"`` only the top ``k_max`` of each query is kept (memory
O(chunk x k_max)); a query whose true reference is not among them has rank >= k_max, a miss
at every reported k. For University-1652 the AP needs every true match's position, so each
chunk is searched for the whole ranking and the scores go through the same exact counting as
the built-in backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._optional import require
from ._search import Positions, auto_chunk_size, positions_from_scores

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
    k = num_kept if full else min(k_max, num_kept)
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
            dense = torch.full((stop - start, r_count), float("-inf"))
            dense.scatter_(1, ids, scores)
            positions, counts = positions_from_scores(
                dense, chunk_true, sort=t > _COUNT_BY_COMPARISON
            )
            true[start:stop] = positions
            first[start:stop] = torch.where(counts > 0, positions[:, 0], num_kept)
        else:  # one true reference per query: its rank from the top k, if it is there
            found = ids == chunk_true[:, :1]
            in_top = found.any(1)
            true_score = torch.where(found, scores, torch.zeros_like(scores)).sum(1)
            rank = (scores > true_score.unsqueeze(1)).sum(1)
            first[start:stop] = torch.where(in_top, rank, torch.full_like(rank, k))
    return Positions(
        first=first.to(device),
        true=None if true is None else true.to(device),
        top1=None if top1 is None else top1.to(device),
    )
