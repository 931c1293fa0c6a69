"""gsra-salad: cross-view image geo-localization with GSRA attention and SALAD aggregation.

Public surface::

    from gsra_salad import log_sinkhorn, dustbin_sinkhorn
"""

from ._version import __version__
from .ops import dustbin_sinkhorn, log_sinkhorn

__all__ = ["__version__", "dustbin_sinkhorn", "log_sinkhorn"]
