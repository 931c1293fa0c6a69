"""InputConfig: what a view of a model expects as input. Private module, public class.

Imports nothing of the package, so that models (which record it) and data (which builds the
transforms from it) may both use it. Like timm's ``pretrained_cfg`` and open_clip's
``preprocess_cfg``, but per view: a cross-view model sees two kinds of image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["VIEWS", "InputConfig"]

VIEWS = ("query", "reference")

# ImageNet's statistics (the same numbers as gsra_salad.data.IMAGENET_MEAN / IMAGENET_STD)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ViewTransform = Literal["none", "polar"]


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(
            f"InputConfig: {name} must be 3 finite numbers (one per RGB channel, for images "
            f"scaled to [0, 1]), got {value!r}; e.g. ImageNet's {name} "
            f"{_IMAGENET_MEAN if name == 'mean' else _IMAGENET_STD}"
        )
    return triple  # type: ignore[return-value]


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise ValueError(
            f"InputConfig: image_size must be (H, W), two positive ints (or one int for a "
            f"square), the size of the tensor the network sees, got {value!r}"
        )
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class InputConfig:
    """The preprocessing one view of a model expects: size, normalisation, view transform.

    A model records one per view (``model.input_config["query"]``, ``["reference"]``) and
    saves it in ``config.json``; :func:`gsra_salad.data.create_transform` builds the matching
    transform from it, so a checkpoint is evaluated with the preprocessing it was trained with.

    The per-image pipeline it describes: an image (uint8 in [0, 255], or floats in [0, 1]) ->
    for ``view_transform="polar"``, the centre ``polar_crop`` of the tile side, then
    :func:`gsra_salad.data.polar_transform` to ``image_size`` (SAFA-style panorama); for
    ``"none"``, a resize to ``image_size`` (antialiased) -> floats in [0, 1] ->
    ``(x - mean) / std`` per channel.

    Args:
        image_size: (H, W) of the tensor the network sees (an int means a square); stored as
            a tuple.
        mean: per-channel mean of images scaled to [0, 1] (default ImageNet's).
        std: per-channel standard deviation (default ImageNet's), all > 0.
        view_transform: ``"none"`` or ``"polar"`` (aerial tile -> panorama about its centre).
        polar_crop: fraction of the tile side kept around its centre before the polar
            transform, in (0, 1] (1.0 = the whole tile; the University-1652 demo uses 0.7).
            Must be 1.0 with ``view_transform="none"``.

    Shape:
        - The view's input to the network: (B, 3, *image_size), float, normalised.

    Raises:
        ValueError: a field of the wrong form, naming it, what was expected and an example.

    Example:
        >>> config = InputConfig((32, 128), view_transform="polar", polar_crop=0.7)
        >>> config.image_size, config.mean
        ((32, 128), (0.485, 0.456, 0.406))
        >>> InputConfig.from_dict(config.to_dict()) == config
        True
        >>> InputConfig(384).image_size
        (384, 384)
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = _IMAGENET_MEAN
    std: tuple[float, float, float] = _IMAGENET_STD
    view_transform: ViewTransform = "none"
    polar_crop: float = 1.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "image_size", _image_size(self.image_size))
        set_(self, "mean", _triple("mean", self.mean))
        std = _triple("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"InputConfig: std must be > 0 per channel, got {self.std!r}")
        set_(self, "std", std)
        if self.view_transform not in ("none", "polar"):
            raise ValueError(
                f"InputConfig: view_transform must be 'none' or 'polar' (aerial tile -> "
                f"panorama), got {self.view_transform!r}"
            )
        crop = self.polar_crop
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            raise ValueError(
                f"InputConfig: polar_crop must be a fraction in (0, 1] of the tile side kept "
                f"around its centre (1.0 = the whole tile), got {crop!r}"
            )
        set_(self, "polar_crop", float(crop))
        if self.view_transform == "none" and self.polar_crop != 1.0:
            raise ValueError(
                f"InputConfig: polar_crop={self.polar_crop} only applies to "
                "view_transform='polar'; set view_transform='polar' or leave polar_crop at 1.0"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values: ``{"image_size": [H, W], "mean": [...], ...}``.

        Returns:
            A dict that :meth:`from_dict` turns back into an equal config.
        """
        return {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "view_transform": self.view_transform,
            "polar_crop": self.polar_crop,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputConfig:
        """Rebuilds a config from :meth:`to_dict`'s output (e.g. read from ``config.json``).

        Args:
            data: ``image_size`` is required; ``mean``, ``std``, ``view_transform`` and
                ``polar_crop`` default as in the constructor.

        Returns:
            The config.

        Raises:
            ValueError: not a mapping, unknown keys or a missing ``image_size`` (naming them
                and the known keys), or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"InputConfig.from_dict: expected a mapping such as "
                f"{{'image_size': [384, 384]}}, got {type(data).__name__}"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"InputConfig.from_dict: unknown keys {unknown}; known keys: {known} (the "
                "config was written by another program or a newer gsra_salad)"
            )
        if "image_size" not in data:
            raise ValueError(
                f"InputConfig.from_dict: the required key 'image_size' is missing (got keys "
                f"{sorted(data)}); give the (H, W) the network sees"
            )
        values = dict(data)
        for key in ("image_size", "mean", "std"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


def input_configs(value: Any, what: str = "input_config") -> dict[str, InputConfig] | None:
    """``None``, one :class:`InputConfig` (both views) or a mapping of both views (configs or
    their dicts) -> ``{"query": ..., "reference": ...}`` or ``None``. Private helper.

    Example:
        >>> sorted(input_configs(InputConfig(64)))
        ['query', 'reference']
    """
    if value is None:
        return None
    if isinstance(value, InputConfig):
        return dict.fromkeys(VIEWS, value)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be None, an InputConfig (for both views) or a mapping "
            f"{{'query': InputConfig, 'reference': InputConfig}}, got {type(value).__name__}"
        )
    if sorted(value) != sorted(VIEWS):
        raise ValueError(
            f"{what} must give exactly the views {list(VIEWS)}, got keys {sorted(value)}"
        )
    out = {}
    for view in VIEWS:
        item = value[view]
        if isinstance(item, Mapping):
            item = InputConfig.from_dict(item)
        if not isinstance(item, InputConfig):
            raise TypeError(
                f"{what}[{view!r}] must be an InputConfig (or its to_dict()), got "
                f"{type(item).__name__}"
            )
        out[view] = item
    return out
