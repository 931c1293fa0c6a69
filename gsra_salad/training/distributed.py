"""torch.distributed plumbing: the process group from ``torchrun``'s environment.

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

from .._distributed import rank_and_world_size

__all__ = [
    "DistributedContext",
    "barrier",
    "cleanup_distributed",
    "get_context",
    "init_distributed",
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
        rank, world_size = rank_and_world_size()
    return DistributedContext(rank, world_size, local_rank, device)


def get_context(device: str | torch.device | None = None) -> DistributedContext:
    """The current context without initialising anything (world size 1 if no group exists).

    Example:
        >>> get_context("cpu").rank
        0
    """
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    return DistributedContext(rank, world_size, local_rank, _default_device(device, local_rank))


def cleanup_distributed() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
