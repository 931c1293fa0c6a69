"""Batch samplers for contrastive training: one pair per location in a batch, hard negatives.

InfoNCE treats the rest of the batch as negatives, so two pairs of the same location in a batch
would be false negatives. Every sampler here yields batches of distinct labels, is deterministic
for a given ``seed`` and epoch (call ``set_epoch`` like ``DistributedSampler``), and in
distributed training splits every global batch of ``batch_size * num_replicas`` distinct labels
into one slice per rank (so labels are distinct across ranks too, for an all-gathered loss).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from .geometry import nearest_neighbours

__all__ = ["NeighbourBatchSampler", "UniqueLabelBatchSampler"]


def _distributed(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        else:
            num_replicas, rank = num_replicas or 1, rank or 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas = {num_replicas}), got {rank}")
    return num_replicas, rank


class UniqueLabelBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which no label appears twice.

    The epoch's order is a seeded permutation; a sample whose label is already in the batch being
    filled waits for the next batch. With ``drop_last=False`` every sample is used exactly once
    per epoch (the last batches may be smaller); with ``drop_last=True`` (the default) only full
    global batches are kept.

    Args:
        labels: (N,) location id of every sample (e.g. ``dataset.labels``).
        batch_size: samples per batch on each rank.
        seed: base seed; the epoch's permutation uses ``seed + epoch``.
        drop_last: drop the incomplete global batches at the end of the epoch. Keep it true in
            distributed training: the incomplete batches are split over the ranks as evenly as
            possible, which can leave a rank an empty or a smaller batch.
        num_replicas, rank: distributed split (default: from ``torch.distributed`` if
            initialised, else 1 and 0).

    Example:
        >>> sampler = UniqueLabelBatchSampler([0, 0, 1, 1, 2, 2], batch_size=3, seed=0)
        >>> [sorted([0, 0, 1, 1, 2, 2][i] for i in batch) for batch in sampler]
        [[0, 1, 2], [0, 1, 2]]
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels).reshape(-1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_replicas, self.rank = _distributed(num_replicas, rank)
        distinct = len(np.unique(self.labels))
        if batch_size * self.num_replicas > distinct:
            raise ValueError(
                f"a global batch of {batch_size} x {self.num_replicas} samples needs as many "
                f"distinct labels, but there are only {distinct}; use a smaller batch_size"
            )
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        return np.random.default_rng(self.seed + self.epoch).permutation(len(self.labels))

    def _global_batches(self) -> list[list[int]]:
        return _pack_unique(self._order(), self.labels, self.batch_size * self.num_replicas)

    def _local(self, batches: list[list[int]]) -> Iterator[list[int]]:
        size = self.batch_size * self.num_replicas
        for batch in batches:
            if len(batch) < size:
                if self.drop_last:
                    continue
                # split what there is as evenly as possible over the ranks
                yield batch[self.rank :: self.num_replicas]
                continue
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._local(self._global_batches())

    def __len__(self) -> int:
        return sum(1 for _ in self._local(self._global_batches()))


def _pack_unique(order: np.ndarray, labels: np.ndarray, size: int) -> list[list[int]]:
    """Greedy packing of ``order`` into batches of distinct labels; waiting samples go first."""
    batches: list[list[int]] = []
    waiting: list[int] = []
    queue = list(order)
    while queue or waiting:
        batch, seen, still_waiting = [], set(), []
        for index in waiting:
            if len(batch) < size and labels[index] not in seen:
                batch.append(index)
                seen.add(labels[index])
            else:
                still_waiting.append(index)
        position = 0
        while len(batch) < size and position < len(queue):
            index = queue[position]
            position += 1
            if labels[index] in seen:
                still_waiting.append(index)
            else:
                batch.append(index)
                seen.add(labels[index])
        queue = queue[position:]
        waiting = still_waiting
        batches.append([int(i) for i in batch])
    return batches


class NeighbourBatchSampler(UniqueLabelBatchSampler):
    """Batches of hard negatives: each batch grows from a random anchor through its neighbours.

    The neighbour lists come from geography (:meth:`from_positions`: haversine on
    (latitude, longitude) degrees or Euclidean UTM metres, computed once) or from the last
    embeddings (:meth:`from_embeddings`, or :meth:`update_embeddings` between epochs). A batch
    takes an unused anchor, then its unused neighbours of distinct labels, then the next anchor,
    until full. Every sample is used at most once per epoch; labels in a batch are distinct.

    Args:
        labels: (N,) location ids.
        neighbours: (N, k) indices of each sample's nearest other samples.
        batch_size, seed, drop_last, num_replicas, rank: as :class:`UniqueLabelBatchSampler`.
        neighbours_per_anchor: how many of an anchor's neighbours join its batch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        neighbours: np.ndarray,
        batch_size: int,
        *,
        neighbours_per_anchor: int = 3,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            labels, batch_size, seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank
        )
        neighbours = np.asarray(neighbours)
        if neighbours.ndim != 2 or len(neighbours) != len(self.labels):
            raise ValueError(
                f"neighbours must be (N, k) with N = {len(self.labels)}, got {neighbours.shape}"
            )
        self.neighbours = neighbours
        self.neighbours_per_anchor = neighbours_per_anchor

    @classmethod
    def from_positions(
        cls,
        labels,
        positions: np.ndarray,
        batch_size: int,
        *,
        metric: str = "haversine",
        k: int = 16,
        cache: str | os.PathLike | None = None,
        **kwargs,
    ) -> NeighbourBatchSampler:
        """Geographic neighbours: ``metric="haversine"`` for (lat, lon) degrees, ``"euclidean"``
        for UTM metres (CVACT's ``positions``). With ``cache`` (a ``.npy`` path) the
        neighbour lists are computed once and read back on later runs (recomputed if the
        cached array does not fit: other N or fewer than k neighbours)."""
        k = min(k, len(positions) - 1)
        neighbours = None
        if cache is not None and Path(cache).is_file():
            stored = np.load(cache)
            if stored.ndim == 2 and stored.shape[0] == len(positions) and stored.shape[1] >= k:
                neighbours = stored[:, :k]
        if neighbours is None:
            neighbours = nearest_neighbours(positions, k, metric)
            if cache is not None:
                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(cache).with_suffix(".tmp.npy")
                np.save(tmp, neighbours)
                os.replace(tmp, cache)
        return cls(labels, neighbours, batch_size, **kwargs)

    @classmethod
    def from_embeddings(
        cls, labels, embeddings, batch_size: int, *, k: int = 16, **kwargs
    ) -> NeighbourBatchSampler:
        """Neighbours by cosine similarity of (N, D) embeddings (e.g. the last evaluation's)."""
        k = min(k, len(embeddings) - 1)
        return cls(labels, nearest_neighbours(embeddings, k, "cosine"), batch_size, **kwargs)

    def update_embeddings(self, embeddings, k: int | None = None) -> None:
        """Recomputes the neighbour lists from new (N, D) embeddings."""
        k = k or self.neighbours.shape[1]
        self.neighbours = nearest_neighbours(embeddings, min(k, len(embeddings) - 1), "cosine")

    def _global_batches(self) -> list[list[int]]:
        order = self._order()
        size = self.batch_size * self.num_replicas
        used = np.zeros(len(self.labels), dtype=bool)
        batches: list[list[int]] = []
        batch: list[int] = []
        seen: set = set()

        def take(index: int) -> bool:
            if used[index] or self.labels[index] in seen:
                return False
            used[index] = True
            seen.add(self.labels[index])
            batch.append(int(index))
            return True

        for anchor in order:
            if not take(anchor):
                continue  # used already, or its label is in this batch: it stays for later
            added = 0
            for neighbour in self.neighbours[anchor]:
                if len(batch) == size or added == self.neighbours_per_anchor:
                    break
                added += take(neighbour)
            if len(batch) == size:
                batches.append(batch)
                batch, seen = [], set()
        # the partial batch and the samples whose label collided are packed like the unique
        # sampler does (every sample is still used once per epoch)
        rest = batch + [int(i) for i in order if not used[i]]
        if rest:
            batches += _pack_unique(np.asarray(rest, dtype=np.int64), self.labels, size)
        return batches
