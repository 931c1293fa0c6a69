"""Neural-network layers built on :mod:`gsra_salad.ops`."""

from .gsra import GlobalSpatialRelationAttention
from .salad import SALAD

__all__ = ["SALAD", "GlobalSpatialRelationAttention"]
