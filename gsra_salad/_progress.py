"""Progress bars: one helper for the whole package (tqdm, when the ``progress`` extra is there).

Private bottom-layer module: evaluation (``embed``) and training use it; without tqdm, or when
disabled, the iterable is returned as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    iterable: Iterable[Any], *, total: int | None = None, enabled: bool = True, desc: str = ""
) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar (rank 0 decides ``enabled``), or unchanged.

    Example:
        >>> list(progress_bar(range(3), enabled=False))
        [0, 1, 2]
    """
    if not enabled:
        return iterable
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
