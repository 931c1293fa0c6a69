"""torch.distributed plumbing: process group from ``torchrun``'s environment, gathers, shards.

``torchrun --nproc_per_node N script.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and picks the backend
from the device (``nccl`` for CUDA, ``gloo`` for CPU). Without them it is a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedContext",
    "barrier",
    "cleanup_distributed",
    "gather_rows",
    "get_context",
    "init_distributed",
    "shard_range",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this machine (picks the CUDA device).
        device: the device this process trains on.

    Example:
        >>> DistributedContext(0, 1, 0, torch.device("cpu")).is_main
        True
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def _default_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device | None = None) -> DistributedContext:
    """Joins the process group that ``torchrun`` describes (if any) and picks the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` (then ``cuda:LOCAL_RANK``), a full device, or
            ``None``/``"auto"`` (CUDA when available).

    Returns:
        The :class:`DistributedContext`; world size 1 outside ``torchrun``.

    Example:
        >>> init_distributed("cpu").world_size  # not launched by torchrun
        1
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _default_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("joined a %s process group: rank %d of %d", backend, rank, world_size)
    elif dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedContext(rank, world_size, local_rank, device)


def get_context(device: str | torch.device | None = None) -> DistributedContext:
    """The current context without initialising anything (world size 1 if no group exists).

    Example:
        >>> get_context("cpu").rank
        0
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, _default_device(device, local_rank)
        )
    return DistributedContext(0, 1, 0, _default_device(device, 0))


def cleanup_distributed() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``range(n)`` that ``rank`` handles (sizes differ by at most 1
    item per rank... and the last ranks may be shorter).

    Example:
        >>> [list(shard_range(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    per = -(-n // world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def gather_rows(local: Tensor, total: int) -> Tensor:
    """Concatenates every rank's rows (rank order), the shards of :func:`shard_range`.

    Args:
        local: (n_rank, ...) this rank's rows.
        total: the number of rows over all ranks.

    Returns:
        (total, ...) on ``local``'s device; ``local`` itself in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world_size = dist.get_world_size()
    per = -(-total // world_size)
    device = local.device
    if dist.get_backend() == "nccl":
        local = local.cuda()
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    rows = [part[: len(shard_range(total, r, world_size))] for r, part in enumerate(parts)]
    return torch.cat(rows).to(device)
