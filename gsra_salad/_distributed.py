"""The rank and world size of the default process group: one helper for the whole package.

Private bottom-layer module (imports nothing of the package), so that data (samplers),
losses, evaluation (``embed``) and training ask the same question the same way.
"""

from __future__ import annotations

import torch

__all__ = ["rank_and_world_size"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one.

    Example:
        >>> rank_and_world_size()  # not launched by torchrun
        (0, 1)
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
