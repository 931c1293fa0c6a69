"""gsra-salad: cross-view image geo-localization with GSRA attention and SALAD aggregation.

Public surface::

    from gsra_salad import (log_sinkhorn, dustbin_sinkhorn,
                            GlobalSpatialRelationAttention, SALAD, CrossViewGeoLocalizer,
                            InputConfig)
"""

from ._input import InputConfig
from ._version import __version__
from .layers import SALAD, GlobalSpatialRelationAttention
from .models import CrossViewGeoLocalizer
from .ops import dustbin_sinkhorn, log_sinkhorn

__all__ = [
    "SALAD",
    "CrossViewGeoLocalizer",
    "GlobalSpatialRelationAttention",
    "InputConfig",
    "__version__",
    "dustbin_sinkhorn",
    "log_sinkhorn",
]
