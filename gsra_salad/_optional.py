"""Imports of optional dependencies with an error that names the extra to install. Private.

Imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module``, or raises an ImportError saying which extra provides it.

    Args:
        module: the module to import, e.g. ``"torchvision.models"``.
        extra: the ``gsra-salad`` extra that installs it, e.g. ``"torchvision"``.

    Returns:
        The imported module.

    Example:
        >>> require("math", "none").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed here but not installed: pip install 'gsra-salad[{extra}]'"
        ) from err
