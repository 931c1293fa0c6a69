"""Per-view image transforms (torchvision.transforms.v2), built by hand or from a model's
:class:`~gsra_salad.InputConfig` (:func:`create_transform`), and the paired augmentation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._input import _IMAGENET_MEAN, _IMAGENET_STD, VIEWS, InputConfig
from ._base import _check_pixels, require
from .augment import PairedAugmentation
from .geometry import polar_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PairedAugmentation",
    "create_transform",
    "eval_transform",
    "resolve_input_config",
    "train_transform",
]

IMAGENET_MEAN = _IMAGENET_MEAN
IMAGENET_STD = _IMAGENET_STD

View = Literal["satellite", "ground", "drone"]


def _size(image_size: int | tuple[int, int]) -> list[int]:
    return [image_size, image_size] if isinstance(image_size, int) else list(image_size)


def eval_transform(
    image_size: int | tuple[int, int],
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """Resize to ``image_size`` (int or (H, W)), scale to [0, 1], normalise with ImageNet stats.

    Works on uint8 tensors (3, H, W) as the readers return them, float tensors in [0, 1] and
    PIL images; needs torchvision. Tensors outside those ranges raise (see
    ``_check_pixels``): a float image in [0, 255] would otherwise come out near 1000. For a
    model that records its input, :func:`create_transform` builds this from the model.

    Args:
        image_size: output size, an int (square) or (H, W).
        mean, std: the normalisation's per-channel statistics (ImageNet's by default).

    Returns:
        A ``torchvision.transforms.v2.Compose`` mapping an image (3, H, W) to a normalised
        float32 tensor (3, *image_size).

    Raises:
        ValueError: when called on a float image outside [0, 1] or a non-uint8 integer image.

    Example:
        >>> transform = eval_transform((32, 48))
        >>> transform(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)).shape
        torch.Size([3, 32, 48])
    """
    v2 = require("torchvision.transforms.v2", "torchvision")
    return v2.Compose(
        [
            v2.Lambda(_check_pixels, Tensor),
            v2.Resize(_size(image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def train_transform(
    view: View,
    image_size: int | tuple[int, int],
    *,
    normalize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augmentations: Literal["library", "published"] = "library",
):
    """Training transform of one view: resize, colour jitter, blur, small occlusions, normalise.

    ``augmentations="library"`` (the default) is this library's set (below);
    ``"published"`` is LRFR's and Sample4Geo's (:func:`~gsra_salad.data.published_augmentation`:
    JPEG, colour jitter p 0.5, blur or sharpen p 0.3, grid or coarse dropout p 0.3, with grid
    ratio 0.5 for ``"ground"`` and 0.4 for the other views; no affine for drone views).

    Geometric augmentation that must keep the two views consistent (flips, rotations) belongs to
    :class:`PairedAugmentation`, which runs before these, or to
    :class:`~gsra_salad.data.PairedBatchAugmentation` on whole batches, which runs after them:
    then pass ``normalize=False`` (the batch augmentation needs pixels, not normalised values;
    the training loop normalises after it). Input as for :func:`eval_transform` (uint8 in
    [0, 255] or float in [0, 1]; anything else raises).

    Args:
        view: ``"satellite"``, ``"ground"`` or ``"drone"`` (drone views also get a small
            random affine).
        image_size: output size, an int (square) or (H, W).
        normalize: end with the scaling to [0, 1] and ``(x - mean) / std`` (``True``), or
            return pixels in the input's dtype (uint8 for uint8 input); occlusions are then
            filled with the mean colour, which normalises to 0 as with ``normalize=True``.
        mean, std: the normalisation's per-channel statistics (ImageNet's by default).
        augmentations: ``"library"`` or ``"published"`` (see above; pixels come out as uint8).

    Returns:
        A ``torchvision.transforms.v2.Compose`` mapping an image (3, H, W) to a normalised
        float32 tensor (3, *image_size), or with ``normalize=False`` to pixels (3, *image_size).

    Raises:
        ValueError: for an unknown ``view`` or ``augmentations``; when called on a float image
            outside [0, 1].

    Example:
        >>> transform = train_transform("satellite", 24)
        >>> transform(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)).shape
        torch.Size([3, 24, 24])
    """
    if view not in ("satellite", "ground", "drone"):
        raise ValueError(f"view must be 'satellite', 'ground' or 'drone', got {view!r}")
    if augmentations not in ("library", "published"):
        raise ValueError(f"augmentations must be 'library' or 'published', got {augmentations!r}")
    v2 = require("torchvision.transforms.v2", "torchvision")
    if augmentations == "published":
        from .published import published_augmentation

        ratio = 0.5 if view == "ground" else 0.4
        steps = [
            v2.Lambda(_check_pixels, Tensor),
            v2.Resize(_size(image_size), antialias=True),
            published_augmentation(_size(image_size), grid_ratio=ratio),
        ]
        if normalize:
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(steps)
    steps = [
        v2.Lambda(_check_pixels, Tensor),
        v2.Resize(_size(image_size), antialias=True),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.3),
    ]
    if view == "drone":
        steps.insert(2, v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.9, 1.1)))
    if normalize:
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.RandomErasing(p=0.3, scale=(0.01, 0.05), value=0),
        ]
    else:
        steps.append(_EraseToMean(mean))
    return v2.Compose(steps)


class _EraseToMean:
    """``RandomErasing(p=0.3, scale=(0.01, 0.05))`` filling with the mean colour, for pixels
    (uint8 or [0, 1]) that are normalised later: the fill then normalises to 0. Private."""

    def __init__(self, mean: Sequence[float]) -> None:
        v2 = require("torchvision.transforms.v2", "torchvision")
        self.mean = tuple(float(m) for m in mean)
        self.erase = {
            "uint8": v2.RandomErasing(0.3, (0.01, 0.05), value=[round(255 * m) for m in mean]),
            "float": v2.RandomErasing(0.3, (0.01, 0.05), value=list(self.mean)),
        }

    def __call__(self, image: Tensor) -> Tensor:
        return self.erase["uint8" if image.dtype == torch.uint8 else "float"](image)

    def __repr__(self) -> str:
        return f"RandomErasing(p=0.3, scale=(0.01, 0.05), value=mean {self.mean})"


def _to_pixels(image: Any) -> Tensor:
    """A PIL image -> uint8 tensor (3, H, W); a tensor -> itself after :func:`_check_pixels`."""
    if isinstance(image, Tensor):
        return _check_pixels(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)
    raise TypeError(
        f"expected an image tensor (3, H, W) (uint8 or float in [0, 1]) or a PIL image, got "
        f"{type(image).__name__}"
    )


def centre_crop_fraction(images: Tensor, fraction: float) -> Tensor:
    """The centre ``fraction`` of each side of images (..., H, W): ``round(fraction * H)`` rows
    and ``round(fraction * W)`` columns, the remainder split with the extra pixel after. Private.

    Example:
        >>> centre_crop_fraction(torch.arange(16).view(1, 4, 4), 0.5).tolist()
        [[[5, 6], [9, 10]]]
    """
    if fraction == 1.0:
        return images
    h, w = images.shape[-2:]
    kh, kw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - kh) // 2, (w - kw) // 2
    return images[..., top : top + kh, left : left + kw]


class PolarStep:
    """The ``view_transform="polar"`` step of an :class:`~gsra_salad.InputConfig`: the centre
    ``polar_crop`` of the tile, then :func:`~gsra_salad.data.polar_transform` to ``image_size``.
    Works on one image (3, S, S) or a batch (N, 3, S, S), in the input's dtype (uint8 in, uint8
    out, rounded). Private (picklable, for DataLoader workers).

    Example:
        >>> step = PolarStep((8, 32), 0.7)
        >>> step(torch.zeros(2, 3, 20, 20, dtype=torch.uint8)).shape
        torch.Size([2, 3, 8, 32])
    """

    def __init__(self, image_size: tuple[int, int], crop: float) -> None:
        self.image_size, self.crop = tuple(image_size), float(crop)

    def __call__(self, images: Tensor) -> Tensor:
        return polar_transform(centre_crop_fraction(images, self.crop), self.image_size)

    def __repr__(self) -> str:
        return f"PolarStep(image_size={self.image_size}, crop={self.crop:g})"


def pixel_steps(config: InputConfig) -> tuple[list[int] | None, PolarStep | None]:
    """How to bring a decoded image to ``config``'s pixels: ``(resize size, None)`` for
    ``view_transform="none"``, ``(None, PolarStep)`` for ``"polar"`` (no resize: the polar
    transform samples the tile at its own size). Private (the preloaded path uses it too)."""
    if config.view_transform == "polar":
        return None, PolarStep(config.image_size, config.polar_crop)
    return list(config.image_size), None


def resolve_input_config(source: Any, view: str = "query") -> InputConfig:
    """The :class:`~gsra_salad.InputConfig` of one view, from a model or a config.

    Like timm's ``resolve_data_config``: the preprocessing comes from what the model recorded
    (``model.input_config``, saved in its ``config.json``), never re-typed by hand.

    Args:
        source: a model with an ``input_config`` attribute (a
            :class:`~gsra_salad.CrossViewGeoLocalizer`), an ``InputConfig`` (returned as is,
            whatever ``view``), its ``to_dict()``, or a mapping of views to either.
        view: ``"query"`` or ``"reference"``.

    Returns:
        The view's ``InputConfig``.

    Raises:
        ValueError: an unknown view, a model that records no preprocessing (built without
            it, or saved by an older version), a mapping without the view.
        TypeError: any other source.

    Example:
        >>> resolve_input_config({"query": InputConfig(64), "reference": InputConfig(32)},
        ...                      "reference").image_size
        (32, 32)
        >>> resolve_input_config({"image_size": [16, 64]}).image_size
        (16, 64)
    """
    if view not in VIEWS:
        raise ValueError(f"view must be 'query' or 'reference', got {view!r}")
    if isinstance(source, InputConfig):
        return source
    if not isinstance(source, Mapping) and hasattr(source, "input_config"):
        recorded = source.input_config
        if recorded is None:
            raise ValueError(
                f"this model ({type(source).__name__}) does not record its input preprocessing "
                "(built without input_config=, or saved by an older version of gsra_salad): "
                "pass sizes explicitly (eval_transform(size)) or set it with "
                "model.input_config = {'query': InputConfig(...), 'reference': "
                "InputConfig(...)} (save_pretrained then keeps it)"
            )
        source = recorded
    if isinstance(source, Mapping):
        if "image_size" in source:
            return InputConfig.from_dict(source)
        if view not in source:
            raise ValueError(
                f"the input config has no {view!r} view (keys: {sorted(source)}); give "
                "{'query': InputConfig, 'reference': InputConfig} or one InputConfig"
            )
        item = source[view]
        return item if isinstance(item, InputConfig) else InputConfig.from_dict(item)
    raise TypeError(
        f"expected a model with input_config, an InputConfig or a dict, got {type(source).__name__}"
    )


def create_transform(
    source: Any,
    view: str = "query",
    *,
    train: bool = False,
    normalize: bool = True,
    augmentations: Literal["library", "published"] = "library",
):
    """The per-image transform a view of a model expects, built from its
    :class:`~gsra_salad.InputConfig` (like timm's ``create_transform``).

    ``view_transform="none"``: resize to ``image_size`` (antialiased, exactly as
    :func:`eval_transform`); ``"polar"``: the centre ``polar_crop`` of the tile, then
    :func:`~gsra_salad.data.polar_transform` to ``image_size`` (on uint8 pixels, rounded, as
    the preloaded path does). Then, with ``normalize``, scaling to [0, 1] and ``(x - mean) /
    std`` with the config's statistics.

    Args:
        source: anything :func:`resolve_input_config` takes (a model, an ``InputConfig``, a
            dict).
        view: ``"query"`` or ``"reference"``.
        train: the view's training transform (:func:`train_transform`'s colour jitter, blur,
            sharpness and occlusions after the step above; the drone view's random affine is
            not included: use ``train_transform("drone", ...)`` for it).
        augmentations: with ``train``, ``"library"`` or ``"published"`` (LRFR's and
            Sample4Geo's, see :func:`train_transform`; the query view counts as a ground view).
        normalize: end normalised (float32); ``False`` returns pixels in the input's dtype
            (uint8 for uint8 or PIL input), for :class:`~gsra_salad.data.PreloadedPairs` or
            for a batch augmentation that runs later (the training loop normalises after it).

    Returns:
        A ``torchvision.transforms.v2.Compose``: an image (uint8 (3, H, W) tensor, float in
        [0, 1], or PIL image) -> (3, *image_size), float32 normalised (or pixels).

    Raises:
        ValueError, TypeError: as :func:`resolve_input_config`; when called, on images outside
            [0, 1] / [0, 255] (e.g. normalised already).

    Example:
        >>> config = InputConfig((16, 64), view_transform="polar", polar_crop=0.7)
        >>> transform = create_transform(config)
        >>> transform(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)).shape
        torch.Size([3, 16, 64])
        >>> pixels = create_transform(config, normalize=False)
        >>> pixels(torch.zeros(3, 40, 40, dtype=torch.uint8)).dtype
        torch.uint8
    """
    config = resolve_input_config(source, view)
    v2 = require("torchvision.transforms.v2", "torchvision")
    size, polar = pixel_steps(config)
    steps: list[Any] = [v2.Lambda(_to_pixels)]
    steps.append(polar if polar is not None else v2.Resize(size, antialias=True))
    if train:
        kind = "ground" if view == "query" else "satellite"  # the same steps for both
        steps.append(
            train_transform(
                kind,
                config.image_size,
                normalize=normalize,
                mean=config.mean,
                std=config.std,
                augmentations=augmentations,
            )
        )
    elif normalize:
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(config.mean), list(config.std)),
        ]
    return v2.Compose(steps)
