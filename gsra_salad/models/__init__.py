"""The assembled model, backbone adapters and checkpoint conversion."""

from .backbones import ConvNeXtTrunk, TimmBackbone, TinyCNN, feature_size
from .geolocalizer import CrossViewGeoLocalizer

__all__ = ["ConvNeXtTrunk", "CrossViewGeoLocalizer", "TimmBackbone", "TinyCNN", "feature_size"]
