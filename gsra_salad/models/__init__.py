"""The assembled model, backbone adapters, checkpoint conversion and the component registry.

``save_pretrained`` / ``from_pretrained`` describe a model by its components, each as
``{"type": <registered name>, **module.get_config()}``. A component class joins by defining
``get_config()`` (its constructor arguments as JSON values, so that
``type(m)(**m.get_config())`` rebuilds it) and calling :func:`register_component`; the
backbones here, ``GlobalSpatialRelationAttention`` and ``SALAD`` are registered.
"""

from ._registry import build_component, register_component, registered_components
from .backbones import ConvNeXtTrunk, SmallConvNeXt, TimmBackbone, TinyCNN, feature_size
from .geolocalizer import CrossViewGeoLocalizer

__all__ = [
    "ConvNeXtTrunk",
    "CrossViewGeoLocalizer",
    "SmallConvNeXt",
    "TimmBackbone",
    "TinyCNN",
    "build_component",
    "feature_size",
    "register_component",
    "registered_components",
]
