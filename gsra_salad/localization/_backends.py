"""Search backends of :class:`~gsra_salad.localization.GalleryIndex`. Private.

- ``exact``: the gallery is read block by block (memory-mapped storage stays on disk) and each
  block's (Q, rows) similarities are merged into a running top-k: memory O(Q x (rows + k)),
  exact, any gallery size.
- ``faiss-exact``: ``faiss.IndexFlatIP`` over a float32 copy of the gallery (4 N D bytes of RAM).
- ``faiss-ivf``: approximate. A PCA to ``pca_dim`` (trained on a sample of the gallery), an
  inverted file of ``nlist`` k-means cells on the projected descriptors (L2, which ranks unit
  vectors as the inner product does), encoded as ``flat`` (float32), ``sq8`` (one byte a
  dimension) or ``pq`` (``pca_dim / 8`` bytes); ``nprobe`` cells are visited per query. The
  candidates' scores are recomputed exactly from the stored descriptors and re-ordered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._optional import require
from ..evaluation.streaming import similarity_block

# elements of one gallery block read at a time (32 MiB of float16)
_BLOCK_ELEMENTS = 2**24
# elements of one (queries, rows) similarity block
_SCORE_ELEMENTS = 2**25

ENCODINGS = ("flat", "sq8", "pq")


def iter_blocks(parts: Sequence[np.ndarray], rows: int):
    """Yields ``(offset, block)`` over the stacked parts, ``rows`` rows at a time (copies)."""
    offset = 0
    for part in parts:
        for start in range(0, len(part), rows):
            yield offset + start, np.array(part[start : start + rows])
        offset += len(part)


def block_rows(dim: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, dim))


def exact_search(parts: Sequence[np.ndarray], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k inner products of ``queries`` (Q, D) against the stacked parts, streamed."""
    rows = block_rows(queries.shape[1])
    q_chunk = max(1, _SCORE_ELEMENTS // rows)
    scores, indices = [], []
    for q_start in range(0, len(queries), q_chunk):
        chunk = queries[q_start : q_start + q_chunk]
        best_s = torch.empty(len(chunk), 0)
        best_i = torch.empty(len(chunk), 0, dtype=torch.long)
        for offset, block in iter_blocks(parts, rows):
            s = similarity_block(chunk, torch.from_numpy(block))
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            best_s = torch.cat([best_s, top_s], 1)
            best_i = torch.cat([best_i, top_i + offset], 1)
            if best_s.shape[1] > k:
                best_s, order = best_s.topk(k, dim=1)
                best_i = best_i.gather(1, order)
        scores.append(best_s)
        indices.append(best_i)
    return torch.cat(scores), torch.cat(indices)


def gather_rows(parts: Sequence[np.ndarray], indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` (any shape) of the stacked parts, as float32 (..., D)."""
    flat = indices.reshape(-1)
    out = np.empty((len(flat), parts[0].shape[1]), dtype=np.float32)
    offset = 0
    for part in parts:
        mine = (flat >= offset) & (flat < offset + len(part))
        if mine.any():
            local = flat[mine] - offset
            order = np.argsort(local)  # sorted reads are kinder to a memory-mapped file
            rows = np.empty((len(local), part.shape[1]), dtype=np.float32)
            rows[order] = part[local[order]]
            out[mine] = rows
        offset += len(part)
    return out.reshape(*indices.shape, -1)


def flat_index(parts: Sequence[np.ndarray], dim: int) -> Any:
    faiss = require("faiss", "faiss")
    index = faiss.IndexFlatIP(dim)
    for _, block in iter_blocks(parts, block_rows(dim)):
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def faiss_search(index: Any, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    scores, ids = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))


def approximate_parameters(num_tiles: int, dim: int) -> dict[str, int]:
    """The default parameters of the ``faiss-ivf`` backend for a gallery of ``num_tiles``.

    - ``pca_dim = min(dim, 256)``;
    - ``nlist``: the power of two nearest ``sqrt(N)``, at most ``N / 39`` (FAISS wants 39
      training points a cell), at least 1;
    - ``nprobe = max(32, nlist // 16)``, at most nlist (a trained model's descriptors need more
      lists than clustered ones: ``docs/localization.md``);
    - ``train_size = min(N, max(64 nlist, 20000))`` tiles train the k-means, and
      ``min(N, 16384)`` of them the PCA.
    """
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_tiles))))
    nlist = int(max(1, min(nlist, num_tiles // 39)))
    return {
        "pca_dim": int(min(dim, 256)),
        "nlist": nlist,
        "nprobe": int(min(nlist, max(32, nlist // 16))),
        "train_size": int(min(num_tiles, max(64 * nlist, 20000))),
    }


@dataclass
class IVFIndex:
    """A PCA + IVF FAISS index and what searching it needs."""

    mean: np.ndarray  # (D,) float32
    components: np.ndarray  # (D, pca_dim) float32
    index: Any
    params: dict[str, Any] = field(default_factory=dict)

    def project(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x.astype(np.float32) - self.mean) @ self.components)

    def search(self, parts, queries: Tensor, k: int, nprobe: int | None = None, rerank: int = 0):
        """Top-k by exact scores among the approximate top ``max(k, rerank)`` candidates."""
        self.index.nprobe = int(nprobe or self.params["nprobe"])
        q = queries.detach().cpu().numpy().astype(np.float32)
        _, ids = self.index.search(self.project(q), min(max(k, rerank), self.index.ntotal))
        ids = ids.astype(np.int64)
        missing = ids < 0  # fewer than k candidates in the visited cells
        rows = gather_rows(parts, np.where(missing, 0, ids))
        scores = np.einsum("qkd,qd->qk", rows, q)
        scores[missing] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, 1)
        ids = np.take_along_axis(ids, order, 1)
        return torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(ids)


_PCA_TRAIN = 16384


def _pca(parts, total: int, pca_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top ``pca_dim`` principal directions (D, pca_dim) of a sample."""
    dim = parts[0].shape[1]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(total, _PCA_TRAIN), replace=False))
    x = torch.from_numpy(gather_rows(parts, chosen))
    mean = x.mean(0)
    if pca_dim >= dim:
        return mean.numpy(), np.eye(dim, dtype=np.float32)
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(x - mean, q=min(pca_dim + 16, *x.shape), center=False, niter=3)
    return mean.numpy(), np.ascontiguousarray(v[:, :pca_dim].numpy())


def _faiss_ivf(faiss, d: int, p: dict[str, Any]) -> Any:
    quantizer = faiss.IndexFlatL2(d)
    if p["encoding"] == "flat":
        return faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_L2)
    if p["encoding"] == "sq8":
        qtype = faiss.ScalarQuantizer.QT_8bit
        return faiss.IndexIVFScalarQuantizer(quantizer, d, p["nlist"], qtype, faiss.METRIC_L2)
    p["pq_m"] = p.get("pq_m") or max(1, d // 8)
    return faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["pq_m"], 8, faiss.METRIC_L2)


def build_ivf(
    parts: Sequence[np.ndarray], total: int, dim: int, *, encoding: str, seed: int, **params
) -> IVFIndex:
    """PCA on a sample; one streamed pass projects every tile (kept as float16, N x pca_dim);
    k-means on a sample of the projections; then every projection is added."""
    faiss = require("faiss", "faiss")
    p = {**approximate_parameters(total, dim), **{k: v for k, v in params.items() if v}}
    p["encoding"] = encoding
    mean, components = _pca(parts, total, p["pca_dim"], seed)
    ivf = IVFIndex(mean, components, None, p)
    d = components.shape[1]
    projected = np.empty((total, d), dtype=np.float16)
    for offset, block in iter_blocks(parts, block_rows(dim)):
        projected[offset : offset + len(block)] = ivf.project(block)
    index = _faiss_ivf(faiss, d, p)
    index.cp.seed = seed
    rng = np.random.default_rng(seed + 1)
    train = np.sort(rng.choice(total, size=min(total, p["train_size"]), replace=False))
    index.train(np.ascontiguousarray(projected[train], dtype=np.float32))
    step = max(1, 2**22 // d)
    for start in range(0, total, step):
        index.add(np.ascontiguousarray(projected[start : start + step], dtype=np.float32))
    ivf.index = index
    return ivf


def write_ivf(ivf: IVFIndex, path_prefix: str) -> None:
    faiss = require("faiss", "faiss")
    faiss.write_index(ivf.index, path_prefix + ".faiss")
    np.savez(path_prefix + ".npz", mean=ivf.mean, components=ivf.components)


def read_ivf(path_prefix: str, params: dict[str, Any]) -> IVFIndex:
    faiss = require("faiss", "faiss")
    arrays = np.load(path_prefix + ".npz")
    index = faiss.read_index(path_prefix + ".faiss")
    return IVFIndex(arrays["mean"], arrays["components"], index, dict(params))


def ivf_bytes(ivf: IVFIndex) -> int:
    """Bytes the index holds in RAM: codes, ids, centroids and the PCA matrix."""
    index = ivf.index
    code = index.code_size * index.ntotal + 8 * index.ntotal
    centroids = 4 * index.nlist * index.d
    pq = 0
    if hasattr(index, "pq"):
        pq = 4 * index.pq.M * index.pq.ksub * index.pq.dsub
    return int(code + centroids + pq + ivf.components.nbytes + ivf.mean.nbytes)
