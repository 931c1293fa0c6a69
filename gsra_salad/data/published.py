"""The per-image augmentations of LRFR and Sample4Geo, on torchvision v2.

Both published codes use the same albumentations pipeline per view (DESIGN section 7):
``ImageCompression(90-100, p 0.5)``, ``ColorJitter(0.15, 0.15, 0.15, hue 0.15, p 0.5)``,
``OneOf([AdvancedBlur, Sharpen], p 0.3)`` and ``OneOf([GridDropout(ratio), CoarseDropout(10-25
holes of 0.1-0.2 of the height)], p 0.3)``, with ``ratio`` 0.4 for satellite and drone images
and 0.5 for Sample4Geo's ground panoramas. :func:`published_augmentation` builds it from
torchvision's ``ColorJitter`` and ``GaussianBlur``; what torchvision lacks is written here after
albumentations' definitions: :class:`GridDropout`, :class:`CoarseDropout` (many holes of sizes
drawn in pixels; ``RandomErasing`` erases one box drawn by area) and :class:`Sharpen`
(albumentations' kernel, with random strength; ``RandomAdjustSharpness`` blends with a fixed
factor); :class:`JPEGCompression` goes through Pillow because torchvision's ``v2.JPEG`` warns
that its JPEG coding is deprecated. ``AdvancedBlur`` (an anisotropic, rotated, generalised
Gaussian with multiplicative noise) is approximated by an isotropic ``GaussianBlur`` with its
kernel sizes (3, 5, 7) and its sigma range (0.2, 1.0). See ``docs/training.md``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import require

__all__ = ["CoarseDropout", "GridDropout", "JPEGCompression", "Sharpen", "published_augmentation"]

# the published parameters (albumentations 1.3 argument names in the comments)
JPEG_QUALITY = (90, 100)  # ImageCompression(quality_lower=90, quality_upper=100, p=0.5)
JPEG_P = 0.5
COLOR_JITTER = (0.15, 0.15, 0.15, 0.15)  # ColorJitter(brightness, contrast, saturation, hue)
COLOR_JITTER_P = 0.5
BLUR_SHARPEN_P = 0.3  # OneOf([AdvancedBlur(p=1.0), Sharpen(p=1.0)], p=0.3)
BLUR_KERNELS = (3, 5, 7)  # AdvancedBlur(blur_limit=(3, 7))
BLUR_SIGMA = (0.2, 1.0)  # AdvancedBlur(sigmaX_limit=(0.2, 1.0), sigmaY_limit=(0.2, 1.0))
DROPOUT_P = 0.3  # OneOf([GridDropout(ratio), CoarseDropout(...)], p=0.3)
HOLES = (10, 25)  # CoarseDropout(min_holes=10, max_holes=25)
HOLE_FRACTION = (0.1, 0.2)  # min/max_height = int(0.1 / 0.2 * img_size[0]), widths alike


def _check_image(image: Tensor, owner: str) -> None:
    if not isinstance(image, Tensor) or image.dim() < 3 or image.shape[-3] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{owner}: expected an image tensor (..., 3, H, W), got {shape}")


class JPEGCompression:
    """albumentations' ``ImageCompression``: a JPEG round trip at a quality drawn uniformly from
    ``quality`` (both ends included), through Pillow (the ``data`` extra). torchvision's
    ``v2.JPEG`` does the same but warns that its JPEG coding is deprecated (torchvision 0.29),
    so it is not used. Draws from torch's global generator.

    Args:
        quality: (min, max) JPEG quality in [1, 100] (published: (90, 100)).

    Shape:
        - Input: (3, H, W) uint8
        - Output: the same

    Example:
        >>> out = JPEGCompression((90, 100))(torch.full((3, 8, 8), 128, dtype=torch.uint8))
        >>> out.dtype, out.shape, int((out.int() - 128).abs().max()) <= 2
        (torch.uint8, torch.Size([3, 8, 8]), True)
    """

    def __init__(self, quality: Sequence[int] = (90, 100)) -> None:
        lo, hi = quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(
                f"JPEGCompression: quality must be 1 <= min <= max <= 100, got {tuple(quality)}"
            )
        self.quality = (int(lo), int(hi))

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image, "JPEGCompression")
        if image.dtype != torch.uint8:
            raise ValueError(f"JPEGCompression: expected a uint8 image, got {image.dtype}")
        pil = require("PIL.Image", "data")
        quality = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        buffer = io.BytesIO()
        pil.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(
            buffer, format="JPEG", quality=quality
        )
        buffer.seek(0)
        decoded = np.asarray(pil.open(buffer).convert("RGB"))
        return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.device)

    def __repr__(self) -> str:
        return f"JPEGCompression(quality={self.quality})"


class GridDropout:
    """albumentations' ``GridDropout(ratio)`` with its defaults: a grid of square units of
    ``max(2, W // 10)`` pixels from the top-left corner, and in each unit a hole of
    ``int(unit * ratio)`` pixels (at least 1, at most unit - 1) filled with ``fill``.
    Deterministic for a given image size.

    Args:
        ratio: the hole's side over the unit's side (0.4 for satellite and drone images, 0.5
            for Sample4Geo's ground panoramas).
        fill: the value of the holes (0: black pixels, before the normalisation).

    Shape:
        - Input: (..., 3, H, W), any dtype
        - Output: the same

    Example:
        >>> image = torch.full((3, 2, 4), 9, dtype=torch.uint8)
        >>> GridDropout(0.5)(image)[0].tolist()
        [[0, 9, 0, 9], [9, 9, 9, 9]]
    """

    def __init__(self, ratio: float, fill: float = 0) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"GridDropout: ratio must be in (0, 1), got {ratio}")
        self.ratio, self.fill = float(ratio), fill

    def mask(self, height: int, width: int) -> Tensor:
        """(H, W) bool, True in the holes."""
        unit_w = max(2, width // 10)
        unit_h = max(min(unit_w, height), 2)
        hole_w = min(max(int(unit_w * self.ratio), 1), unit_w - 1)
        hole_h = min(max(int(unit_h * self.ratio), 1), unit_h - 1)
        rows = (torch.arange(height) % unit_h) < hole_h
        cols = (torch.arange(width) % unit_w) < hole_w
        return rows[:, None] & cols[None, :]

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image, "GridDropout")
        mask = self.mask(*image.shape[-2:]).to(image.device)
        return image.masked_fill(mask, self.fill)

    def __repr__(self) -> str:
        return f"GridDropout(ratio={self.ratio:g}, fill={self.fill})"


class CoarseDropout:
    """albumentations' ``CoarseDropout`` with pixel sizes: ``randint(*holes)`` rectangles, each
    of height and width drawn from ``randint(*hole_size)`` pixels at a uniform position inside
    the image, filled with ``fill``. Draws from torch's global generator (seeded per
    DataLoader worker).

    Args:
        holes: (min, max) number of holes, both included (published: (10, 25)).
        hole_size: (min, max) side of a hole in pixels, both included (published:
            ``(int(0.1 H), int(0.2 H))`` for both sides, H the image height).
        fill: the value of the holes.

    Shape:
        - Input: (3, H, W), any dtype
        - Output: the same

    Example:
        >>> out = CoarseDropout((10, 25), (2, 4))(torch.ones(3, 20, 20))
        >>> 0 < int((out == 0).all(0).sum()) <= 25 * 16
        True
    """

    def __init__(self, holes: Sequence[int], hole_size: Sequence[int], fill: float = 0) -> None:
        (lo, hi), (smin, smax) = holes, hole_size
        if not 1 <= lo <= hi:
            raise ValueError(f"CoarseDropout: holes must be 1 <= min <= max, got {tuple(holes)}")
        if not 1 <= smin <= smax:
            raise ValueError(
                f"CoarseDropout: hole_size must be 1 <= min <= max pixels, got {tuple(hole_size)}"
            )
        self.holes, self.hole_size, self.fill = (int(lo), int(hi)), (int(smin), int(smax)), fill

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image, "CoarseDropout")
        height, width = image.shape[-2:]
        out = image.clone()
        count = int(torch.randint(self.holes[0], self.holes[1] + 1, ()))
        smin, smax = self.hole_size
        for _ in range(count):
            h = min(int(torch.randint(smin, smax + 1, ())), height)
            w = min(int(torch.randint(smin, smax + 1, ())), width)
            y = int(torch.randint(0, height - h + 1, ()))
            x = int(torch.randint(0, width - w + 1, ()))
            out[..., y : y + h, x : x + w] = self.fill
        return out

    def __repr__(self) -> str:
        return f"CoarseDropout(holes={self.holes}, hole_size={self.hole_size}, fill={self.fill})"


class Sharpen:
    """albumentations' ``Sharpen`` with its defaults: the 3 x 3 kernel ``(1 - a) I + a K``,
    ``K = [[-1, -1, -1], [-1, 8 + l, -1], [-1, -1, -1]]``, with ``a`` drawn from ``alpha`` and
    ``l`` from ``lightness``, borders reflected (OpenCV's default), uint8 results rounded and
    clamped (float ones clamped to [0, 1]).

    Args:
        alpha: (min, max) strength (published: the default (0.2, 0.5)).
        lightness: (min, max) lightness (published: the default (0.5, 1.0)).

    Shape:
        - Input: (3, H, W) uint8 or float in [0, 1]
        - Output: the same

    Example:
        >>> flat = torch.full((3, 5, 5), 100, dtype=torch.uint8)
        >>> Sharpen()(flat).shape
        torch.Size([3, 5, 5])
    """

    def __init__(
        self, alpha: Sequence[float] = (0.2, 0.5), lightness: Sequence[float] = (0.5, 1.0)
    ) -> None:
        self.alpha, self.lightness = tuple(alpha), tuple(lightness)

    def kernel(self, alpha: float, lightness: float) -> Tensor:
        """The (3, 3) float32 kernel for one draw."""
        identity = torch.zeros(3, 3)
        identity[1, 1] = 1.0
        effect = -torch.ones(3, 3)
        effect[1, 1] = 8.0 + lightness
        return (1 - alpha) * identity + alpha * effect

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image, "Sharpen")
        u = torch.rand(2)
        alpha = self.alpha[0] + float(u[0]) * (self.alpha[1] - self.alpha[0])
        lightness = self.lightness[0] + float(u[1]) * (self.lightness[1] - self.lightness[0])
        weight = self.kernel(alpha, lightness).to(image.device)
        x = image.float().reshape(-1, 1, *image.shape[-2:])
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight[None, None])
        y = y.reshape(image.shape)
        if image.dtype == torch.uint8:
            return y.round().clamp(0, 255).to(torch.uint8)
        return y.clamp(0, 1).to(image.dtype)

    def __repr__(self) -> str:
        return f"Sharpen(alpha={self.alpha}, lightness={self.lightness})"


def published_augmentation(image_size: int | Sequence[int], *, grid_ratio: float = 0.4):
    """The published per-image augmentation of one view (LRFR, Sample4Geo), on pixels.

    In order: :class:`JPEGCompression` at quality 90-100 (p 0.5); ColorJitter(0.15, 0.15, 0.15,
    hue 0.15) (p 0.5); one of a Gaussian blur (kernel 3, 5 or 7, sigma 0.2-1.0) and
    :class:`Sharpen` (p 0.3); one of :class:`GridDropout` (``grid_ratio``) and
    :class:`CoarseDropout` (10-25 holes of ``int(0.1 H)`` to ``int(0.2 H)`` pixels) (p 0.3).
    Holes are black (0) pixels, as in albumentations before its ``Normalize``. Draws come from
    torch's global generator.

    Args:
        image_size: the image's (H, W) (an int: square); the hole sizes follow H.
        grid_ratio: GridDropout's ratio: 0.4 (satellite, drone), 0.5 (Sample4Geo's ground).

    Returns:
        A ``torchvision.transforms.v2.Compose``: (3, H, W) uint8 (or float in [0, 1], turned
        into uint8 first) -> (3, H, W) uint8.

    Example:
        >>> aug = published_augmentation((16, 64), grid_ratio=0.5)
        >>> aug(torch.randint(0, 256, (3, 16, 64), dtype=torch.uint8)).dtype
        torch.uint8
    """
    v2 = require("torchvision.transforms.v2", "torchvision")
    height = image_size if isinstance(image_size, int) else int(image_size[0])
    hole = (max(1, int(HOLE_FRACTION[0] * height)), max(1, int(HOLE_FRACTION[1] * height)))
    blur = v2.RandomChoice([v2.GaussianBlur(k, sigma=BLUR_SIGMA) for k in BLUR_KERNELS])
    return v2.Compose(
        [
            v2.ToDtype(torch.uint8, scale=True),
            v2.RandomApply([JPEGCompression(JPEG_QUALITY)], p=JPEG_P),
            v2.RandomApply([v2.ColorJitter(*COLOR_JITTER)], p=COLOR_JITTER_P),
            v2.RandomApply([v2.RandomChoice([blur, Sharpen()])], p=BLUR_SHARPEN_P),
            v2.RandomApply(
                [v2.RandomChoice([GridDropout(grid_ratio), CoarseDropout(HOLES, hole)])],
                p=DROPOUT_P,
            ),
        ]
    )
