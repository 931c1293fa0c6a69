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


def eval_transform(image_size: int | tuple[int, int]):
    """Resize to ``image_size`` (int or (H, W)), scale to [0, 1], normalise with ImageNet stats.

    Works on uint8 tensors (3, H, W) as the readers return them; needs torchvision.
    """
    v2 = require("torchvision.transforms.v2", "torchvision")
    return v2.Compose(
        [
            v2.Resize(_size(image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(view: View, image_size: int | tuple[int, int]):
    """Training transform of one view: resize, colour jitter, blur, small occlusions, normalise.

    Geometric augmentation that must keep the two views consistent (flips, rotations) belongs to
    :class:`PairedAugmentation`, which runs before these.
    """
    if view not in ("satellite", "ground", "drone"):
        raise ValueError(f"view must be 'satellite', 'ground' or 'drone', got {view!r}")
    v2 = require("torchvision.transforms.v2", "torchvision")
    steps = [
        v2.Resize(_size(image_size), antialias=True),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.3),
    ]
    if view == "drone":
        steps.insert(1, v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.9, 1.1)))
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
