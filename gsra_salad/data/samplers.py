"""Batch samplers for contrastive training: one pair per location in a batch, hard negatives.

InfoNCE treats the rest of the batch as negatives, so two pairs of the same location in a batch
would be false negatives. Every sampler here yields batches of distinct labels, is deterministic
for a given ``seed`` and epoch (call ``set_epoch`` like ``DistributedSampler``), and in
distributed training splits every global batch of ``batch_size * num_replicas`` distinct labels
into one slice per rank (so labels are distinct across ranks too, for an all-gathered loss).

Every sampler yields the same number of batches in every epoch (``num_batches``, ``len()``), so
learning-rate schedules sized from ``len(loader)`` do not drift; an epoch is packed once and
cached, so ``len()`` costs nothing.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .._distributed import rank_and_world_size
from .geometry import _check_finite_rows, nearest_neighbours

__all__ = ["NeighbourBatchSampler", "UniqueLabelBatchSampler"]


def _distributed(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        group_rank, group_size = rank_and_world_size()
        num_replicas = group_size if num_replicas is None else num_replicas
        rank = group_rank if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas = {num_replicas}), got {rank}")
    return num_replicas, rank


class UniqueLabelBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which no label appears twice, the same number in every epoch.

    The epoch's order is a seeded permutation; a sample whose label is already in the batch being
    filled waits for the next batch. Every epoch has exactly ``num_batches`` global batches
    (``len(sampler) == num_batches``; default: ``N // (batch_size * num_replicas)`` with
    ``drop_last=True``; with ``drop_last=False`` the ceiling of that, or the number of samples
    of the most frequent label if larger):

    - ``drop_last=True`` (the default): only full batches. When an epoch's packing gives fewer
      full batches than ``num_batches`` (labels with many samples leave incomplete batches at
      the end), the missing ones are re-drawn from a fresh shuffle of all samples (so a few
      samples appear twice in that epoch); extra ones are dropped.
    - ``drop_last=False``: every sample is used once per epoch, the last batches may be
      smaller. When the packing needs more than ``num_batches`` batches, that epoch's samples
      are instead grouped by label and dealt round-robin over ``num_batches`` batches (batches
      of about equal size); samples that fit nowhere (a label with more than ``num_batches``
      samples, with a ``num_batches`` set by hand) are left out of that epoch with a warning.

    Args:
        labels: (N,) location id of every sample (e.g. ``dataset.labels``).
        batch_size: samples per batch on each rank.
        num_batches: global batches per epoch (see above), the same in every epoch. Batches
            beyond what one pass over the samples fills are re-drawn from fresh shuffles (in
            both modes; samples then repeat within the epoch).
        seed: base seed; the epoch's permutation uses ``seed + epoch``.
        drop_last: keep only full global batches. Keep it true in distributed training: the
            incomplete batches are split over the ranks as evenly as possible, which can leave a
            rank an empty or a smaller batch.
        num_replicas, rank: distributed split (default: from ``torch.distributed`` if
            initialised, else 1 and 0).

    Raises:
        ValueError: a global batch needs more distinct labels than there are; a bad
            ``num_batches`` or rank.

    Example:
        >>> sampler = UniqueLabelBatchSampler([0, 0, 1, 1, 2, 2], batch_size=3, seed=0)
        >>> [sorted([0, 0, 1, 1, 2, 2][i] for i in batch) for batch in sampler]
        [[0, 1, 2], [0, 1, 2]]
        >>> len(sampler)
        2
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        num_batches: int | None = None,
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
        size = batch_size * self.num_replicas
        if num_batches is None and drop_last:
            num_batches = len(self.labels) // size
        elif num_batches is None:  # room for every sample, and for the most frequent label
            most = int(np.unique(self.labels, return_counts=True)[1].max())
            num_batches = max(-(-len(self.labels) // size), most)
        elif isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
            raise TypeError(f"num_batches must be an int or None, got {num_batches!r}")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = int(num_batches)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next iteration yields (seeds ``seed + epoch``)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: ``{"epoch": int, "neighbours": (N, k) int64 tensor or
        None}`` (the mined neighbours, for :class:`NeighbourBatchSampler`).

        Example:
            >>> sampler = UniqueLabelBatchSampler([0, 1, 2, 3], batch_size=2)
            >>> sampler.set_epoch(3); sampler.state_dict()
            {'epoch': 3, 'neighbours': None}
        """
        neighbours = getattr(self, "neighbours", None)
        if neighbours is not None:
            neighbours = torch.from_numpy(np.asarray(neighbours, dtype=np.int64))
        return {"epoch": int(self.epoch), "neighbours": neighbours}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`.

        Raises:
            ValueError: neighbours saved by a :class:`NeighbourBatchSampler` given to a sampler
                without neighbours (build a :class:`NeighbourBatchSampler` from them first).
        """
        neighbours = state.get("neighbours")
        if neighbours is not None and not hasattr(self, "neighbours"):
            raise ValueError(
                f"{type(self).__name__} cannot take saved neighbours; build a "
                "NeighbourBatchSampler(labels, state['neighbours'].numpy(), ...) instead"
            )
        if neighbours is not None:
            self.neighbours = np.asarray(neighbours)
            self._cache = None
        self.set_epoch(int(state["epoch"]))

    def _order(self) -> np.ndarray:
        return np.random.default_rng(self.seed + self.epoch).permutation(len(self.labels))

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Global batches of distinct labels from ``order`` (full ones first)."""
        return _pack_unique(order, self.labels, self.batch_size * self.num_replicas)

    def _global_batches(self) -> list[list[int]]:
        """The epoch's ``num_batches`` global batches, packed once per epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._fit(self._order()))
        return self._cache[1]

    def _fit(self, order: np.ndarray) -> list[list[int]]:
        """Exactly ``num_batches`` batches of ``order``: re-draw missing ones or re-deal."""
        size = self.batch_size * self.num_replicas
        batches = self._pack(order)
        if self.drop_last:
            batches = [b for b in batches if len(b) == size]
        elif len(batches) > self.num_batches:  # the packing spilled over: deal all samples
            batches = _deal(order, self.labels, self.num_batches, size, self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        while len(batches) < self.num_batches:  # the first batch of a packing is always full
            batches += [b for b in self._pack(rng.permutation(len(self.labels))) if len(b) == size]
        return batches[: self.num_batches]

    def _local(self, batches: list[list[int]]) -> Iterator[list[int]]:
        size = self.batch_size * self.num_replicas
        for batch in batches:
            if len(batch) < size:  # drop_last=False: split as evenly as possible over the ranks
                yield batch[self.rank :: self.num_replicas]
            else:
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._local(self._global_batches())

    def __len__(self) -> int:
        return self.num_batches


def _deal(order: np.ndarray, labels: np.ndarray, count: int, size: int, epoch: int):
    """``count`` batches of distinct labels holding every sample of ``order`` that can fit.

    The samples are grouped by label (labels in order of first appearance, so the grouping is
    as random as ``order``) and dealt round-robin: a label's samples are consecutive, so they
    land in distinct batches whenever the label has at most ``count`` samples. Samples beyond
    that, or beyond ``count * size`` in all, are left out with a warning.
    """
    rank: dict = {}
    for index in order:
        rank.setdefault(labels[index], len(rank))
    grouped = sorted((int(i) for i in order), key=lambda i: rank[labels[i]])  # stable
    batches: list[list[int]] = [[] for _ in range(count)]
    taken: dict = {}
    left_out, dealt = [], 0
    for index in grouped:
        label = labels[index]
        if taken.get(label, 0) == count or dealt == count * size:
            left_out.append(index)
            continue
        batches[dealt % count].append(index)
        taken[label] = taken.get(label, 0) + 1
        dealt += 1
    if left_out:
        warnings.warn(
            f"epoch {epoch}: {len(left_out)} sample(s) fit in none of the {count} batches "
            f"without repeating a label (e.g. index {left_out[0]}, label {labels[left_out[0]]}) "
            "and are left out of this epoch; raise num_batches to use them",
            stacklevel=5,
        )
    return batches


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
    until full. Labels in a batch are distinct; every epoch has ``num_batches`` batches, with
    the same padding and truncation as :class:`UniqueLabelBatchSampler`.

    Args:
        labels: (N,) location ids.
        neighbours: (N, k) indices of each sample's nearest other samples.
        batch_size, num_batches, seed, drop_last, num_replicas, rank: as
            :class:`UniqueLabelBatchSampler`.
        neighbours_per_anchor: how many of an anchor's neighbours join its batch (at most).
        nearest: ``None``: an anchor's neighbours join in order of nearness, skipping the
            used ones, until ``neighbours_per_anchor`` have joined. A number n: Sample4Geo's
            rule (``neighbour_select=64, neighbour_range=128``: n = 32): the candidates are
            the n nearest neighbours and ``neighbours_per_anchor - n`` drawn at random (per
            anchor and epoch, from ``seed``) from the rest of the list, each tried once; the
            unused ones join while the batch has room.

    Example:
        >>> positions = np.array([[0.0, 0.0], [0.0, 1.0], [50.0, 0.0], [50.0, 1.0]])
        >>> sampler = NeighbourBatchSampler.from_positions(
        ...     [0, 1, 2, 3], positions, batch_size=2, metric="euclidean", k=1
        ... )
        >>> sorted(sorted(batch) for batch in sampler)
        [[0, 1], [2, 3]]
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        neighbours: np.ndarray,
        batch_size: int,
        *,
        neighbours_per_anchor: int = 3,
        nearest: int | None = None,
        num_batches: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            labels,
            batch_size,
            num_batches=num_batches,
            seed=seed,
            drop_last=drop_last,
            num_replicas=num_replicas,
            rank=rank,
        )
        neighbours = np.asarray(neighbours)
        if neighbours.ndim != 2 or len(neighbours) != len(self.labels):
            raise ValueError(
                f"neighbours must be (N, k) with N = {len(self.labels)}, got {neighbours.shape}"
            )
        if neighbours_per_anchor < 0:
            raise ValueError(f"neighbours_per_anchor must be >= 0, got {neighbours_per_anchor}")
        if nearest is not None and not 0 <= nearest <= neighbours_per_anchor:
            raise ValueError(
                f"nearest must be None or in [0, neighbours_per_anchor={neighbours_per_anchor}], "
                f"got {nearest}"
            )
        self.neighbours = neighbours
        self.neighbours_per_anchor = neighbours_per_anchor
        self.nearest = nearest

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
        """Geographic neighbours of (N, 2) ``positions``.

        Args:
            labels: (N,) location ids.
            positions: (N, 2): (latitude, longitude) degrees for ``metric="haversine"``, UTM
                metres for ``"euclidean"`` (CVACT's ``positions``). NaN or infinite rows are
                rejected (their neighbours are undefined): leave those samples out, e.g. CVACT
                test ids without a UTM position.
            batch_size: samples per batch on each rank.
            metric: ``"haversine"`` or ``"euclidean"``.
            k: neighbours per sample (at most N - 1).
            cache: a file for the neighbour lists (NumPy ``.npz`` format, whatever its name).
                It holds a hash of ``positions``, ``metric`` and ``k`` and is used only when
                all three match, else recomputed and rewritten.
            **kwargs: the constructor's keyword arguments (``num_batches``, ``seed``, ...).

        Raises:
            ValueError: positions not (N, 2), holding NaN or inf (naming the rows), or not
                one per label.
        """
        positions = np.asarray(positions, dtype=np.float64)
        _check_finite_rows(positions, "positions")
        if positions.shape[1] != 2 or len(positions) != len(np.asarray(labels).reshape(-1)):
            raise ValueError(
                f"positions must be (N, 2) with one row per label, got {positions.shape} for "
                f"{len(np.asarray(labels).reshape(-1))} labels"
            )
        k = min(k, len(positions) - 1)
        key = _neighbours_key(positions, metric, k)
        neighbours = _read_cache(cache, key) if cache is not None else None
        if neighbours is None:
            neighbours = nearest_neighbours(positions, k, metric)
            if cache is not None:
                _write_cache(Path(cache), key, neighbours)
        return cls(labels, neighbours, batch_size, **kwargs)

    @classmethod
    def from_embeddings(
        cls,
        labels,
        embeddings,
        batch_size: int,
        *,
        k: int = 16,
        query_embeddings=None,
        **kwargs,
    ) -> NeighbourBatchSampler:
        """Neighbours by cosine similarity of (N, D) embeddings (e.g. the last evaluation's).

        Args:
            labels: (N,) location ids.
            embeddings: (N, D) embeddings of the samples' references.
            batch_size: samples per batch on each rank.
            k: neighbours per sample (at most N - 1).
            query_embeddings: optional (N, D) embeddings of the samples' queries: sample i's
                neighbours are then the references most similar to its query, its own
                reference left out (Sample4Geo's ground->satellite neighbours); without
                them, the references most similar to its reference.
            **kwargs: the constructor's keyword arguments.

        Example:
            >>> refs = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
            >>> queries = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1]])
            >>> NeighbourBatchSampler.from_embeddings(
            ...     [0, 1, 2], refs, 2, k=1, query_embeddings=queries
            ... ).neighbours.tolist()
            [[2], [0], [1]]
        """
        k = min(k, len(embeddings) - 1)
        if query_embeddings is None:
            neighbours = nearest_neighbours(embeddings, k, "cosine")
        else:
            neighbours = cross_neighbours(query_embeddings, embeddings, k)
        return cls(labels, neighbours, batch_size, **kwargs)

    def update_embeddings(self, embeddings, k: int | None = None) -> None:
        """Recomputes the neighbour lists from new (N, D) embeddings (from the next epoch on)."""
        k = k or self.neighbours.shape[1]
        self.neighbours = nearest_neighbours(embeddings, min(k, len(embeddings) - 1), "cosine")
        self._cache = None

    def _pack(self, order: np.ndarray) -> list[list[int]]:
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

        rng = np.random.default_rng([self.seed, self.epoch, len(order)])
        for anchor in order:
            if not take(anchor):
                continue  # used already, or its label is in this batch: it stays for later
            if self.nearest is None:
                added = 0
                for neighbour in self.neighbours[anchor]:
                    if len(batch) == size or added == self.neighbours_per_anchor:
                        break
                    added += take(neighbour)
            else:  # Sample4Geo: the nearest, then some drawn from the rest, each tried once
                row = self.neighbours[anchor]
                far = row[self.nearest :]
                drawn = rng.permutation(far)[: self.neighbours_per_anchor - self.nearest]
                for neighbour in (*row[: self.nearest], *drawn):
                    if len(batch) == size:
                        break
                    take(neighbour)
            if len(batch) == size:
                batches.append(batch)
                batch, seen = [], set()
        # the partial batch and the samples whose label collided are packed like the unique
        # sampler does (every sample is still used once per epoch)
        rest = batch + [int(i) for i in order if not used[i]]
        if rest:
            batches += _pack_unique(np.asarray(rest, dtype=np.int64), self.labels, size)
        return batches


def cross_neighbours(queries, references, k: int, chunk: int = 1024) -> np.ndarray:
    """(N, k) indices of the references most similar (cosine) to each query, leaving out the
    query's own reference (the same index): Sample4Geo's ``calc_sim``. Private.

    Example:
        >>> refs = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
        >>> cross_neighbours(refs[[2, 0, 1]], refs, 1).tolist()  # own reference left out
        [[2], [0], [1]]
    """
    q = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1
    )
    r = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(references), dtype=torch.float32), dim=1
    )
    n = len(r)
    if q.shape != r.shape:
        raise ValueError(
            f"queries and references must both be (N, D), got {tuple(q.shape)} and {tuple(r.shape)}"
        )
    if not 0 < k < n:
        raise ValueError(f"k must be between 1 and N - 1 = {n - 1}, got {k}")
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        scores = q[start : start + chunk] @ r.T
        rows = torch.arange(start, start + len(scores))
        scores[rows - start, rows] = -float("inf")  # its own reference
        out[start : start + len(scores)] = scores.topk(k, dim=1).indices.numpy()
    return out


def _neighbours_key(positions: np.ndarray, metric: str, k: int) -> str:
    digest = hashlib.sha256(f"{metric}|k={k}|shape={positions.shape}|".encode())
    digest.update(np.ascontiguousarray(positions, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _read_cache(path: str | os.PathLike, key: str) -> np.ndarray | None:
    """The cached neighbour lists if ``path`` holds them for ``key``, else None."""
    if not Path(path).is_file():
        return None
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable or another format: recompute
    if not isinstance(stored, np.lib.npyio.NpzFile):
        return None  # e.g. a bare .npy of an older version, which held no key
    with stored:
        if set(stored.files) != {"key", "neighbours"} or str(stored["key"]) != key:
            return None
        return stored["neighbours"]


def _write_cache(path: Path, key: str, neighbours: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, key=np.array(key), neighbours=neighbours)
    os.replace(tmp, path)
