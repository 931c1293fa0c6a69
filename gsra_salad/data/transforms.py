"""Per-view image transforms (torchvision.transforms.v2) and the paired cross-view augmentation."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._base import require
from .geometry import rotate_pair

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PairedAugmentation",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

View = Literal["satellite", "ground", "drone"]


def _size(image_size: int | tuple[int, int]) -> list[int]:
    return [image_size, image_size] if isinstance(image_size, int) else list(image_size)


def _check_pixels(image: Tensor) -> Tensor:
    """Returns ``image`` unchanged if its values are pixels the transforms can normalise.

    Accepted: uint8 in [0, 255] (what the readers return) and floating point in [0, 1]. A float
    image in [0, 255] would come out of the normalisation near 1000, and an image normalised
    already would be normalised twice; both raise instead, as does any other dtype. The float
    check allows values up to 1.5 and down to -0.5 (resampling overshoots [0, 1] a little).

    Raises:
        ValueError: naming the dtype or the value range found, the range expected and the fix.

    Example:
        >>> _check_pixels(torch.rand(3, 4, 4)).shape
        torch.Size([3, 4, 4])
        >>> _check_pixels(torch.full((3, 4, 4), 255.0))
        Traceback (most recent call last):
        ...
        ValueError: ...float images in [0, 1]...divide by 255...
    """
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(
            f"expected a uint8 image in [0, 255] or a float image in [0, 1], got dtype "
            f"{image.dtype}; convert it with image.to(torch.uint8) if it holds 0..255 pixels"
        )
    if image.numel() == 0:
        return image
    if not torch.isfinite(image).all():
        raise ValueError("the image contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -0.5:
        raise ValueError(
            f"expected float images in [0, 1] (or uint8 in [0, 255]), got values down to "
            f"{low:g}: the image looks normalised already; pass it before normalising"
        )
    if high > 1.5:
        raise ValueError(
            f"expected float images in [0, 1] (or uint8 in [0, 255]), got {image.dtype} values up "
            f"to {high:g}: divide by 255 (image / 255) or pass the uint8 tensor the readers return"
        )
    return image


def eval_transform(image_size: int | tuple[int, int]):
    """Resize to ``image_size`` (int or (H, W)), scale to [0, 1], normalise with ImageNet stats.

    Works on uint8 tensors (3, H, W) as the readers return them, float tensors in [0, 1] and
    PIL images; needs torchvision. Tensors outside those ranges raise (see
    ``_check_pixels``): a float image in [0, 255] would otherwise come out near 1000.

    Args:
        image_size: output size, an int (square) or (H, W).

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
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(view: View, image_size: int | tuple[int, int]):
    """Training transform of one view: resize, colour jitter, blur, small occlusions, normalise.

    Geometric augmentation that must keep the two views consistent (flips, rotations) belongs to
    :class:`PairedAugmentation`, which runs before these. Input as for :func:`eval_transform`
    (uint8 in [0, 255] or float in [0, 1]; anything else raises).

    Args:
        view: ``"satellite"``, ``"ground"`` or ``"drone"`` (drone views also get a small
            random affine).
        image_size: output size, an int (square) or (H, W).

    Returns:
        A ``torchvision.transforms.v2.Compose`` mapping an image (3, H, W) to a normalised
        float32 tensor (3, *image_size).

    Raises:
        ValueError: for an unknown ``view``; when called on a float image outside [0, 1].

    Example:
        >>> transform = train_transform("satellite", 24)
        >>> transform(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)).shape
        torch.Size([3, 24, 24])
    """
    if view not in ("satellite", "ground", "drone"):
        raise ValueError(f"view must be 'satellite', 'ground' or 'drone', got {view!r}")
    v2 = require("torchvision.transforms.v2", "torchvision")
    steps = [
        v2.Lambda(_check_pixels, Tensor),
        v2.Resize(_size(image_size), antialias=True),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.3),
    ]
    if view == "drone":
        steps.insert(2, v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.9, 1.1)))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(p=0.3, scale=(0.01, 0.05), value=0),
    ]
    return v2.Compose(steps)


class PairedAugmentation:
    """Random geometric augmentation that keeps a (query, satellite) pair consistent.

    ``mode="panorama"`` (CVUSA, CVACT): the satellite tile turns by k x 90 degrees and the
    ground panorama rolls by k / 4 of its width to match (:func:`~gsra_salad.data.rotate_pair`);
    with probability ``flip_p`` both are mirrored left-right. ``mode="drone"``
    (University-1652): drone views are not north-aligned, so the satellite tile turns by a
    random k x 90 degrees alone, and both are mirrored with probability ``flip_p``.

    Args:
        mode: ``"panorama"`` or ``"drone"``.
        flip_p: probability of mirroring both views.
        rotate: draw a random quarter turn (otherwise none).
        generator: a ``torch.Generator`` for reproducible draws (default: the global RNG, which
            DataLoader seeds per worker).

    Example:
        >>> aug = PairedAugmentation("panorama", generator=torch.Generator().manual_seed(0))
        >>> ground, satellite = aug(torch.rand(3, 16, 64), torch.rand(3, 32, 32))
        >>> ground.shape, satellite.shape
        (torch.Size([3, 16, 64]), torch.Size([3, 32, 32]))
    """

    def __init__(
        self,
        mode: Literal["panorama", "drone"] = "panorama",
        flip_p: float = 0.5,
        rotate: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in ("panorama", "drone"):
            raise ValueError(f"mode must be 'panorama' or 'drone', got {mode!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.mode, self.flip_p, self.rotate, self.generator = mode, flip_p, rotate, generator

    def __call__(self, query: Tensor, satellite: Tensor) -> tuple[Tensor, Tensor]:
        draws = torch.rand(2, generator=self.generator)
        if draws[0] < self.flip_p:
            query, satellite = query.flip(-1), satellite.flip(-1)
        if self.rotate:
            k = int(draws[1] * 4) % 4
            if self.mode == "panorama":
                satellite, query = rotate_pair(satellite, query, k)
            else:
                satellite = torch.rot90(satellite, k, dims=(-2, -1))
        return query, satellite

    def __repr__(self) -> str:
        return f"PairedAugmentation(mode={self.mode!r}, flip_p={self.flip_p}, rotate={self.rotate})"
