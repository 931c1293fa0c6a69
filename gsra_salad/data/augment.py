"""The paired cross-view augmentation, one rule for single pairs and for batches.

:class:`PairedBatchAugmentation` flips, turns and rolls a batch of (query, reference) pairs so
that every pair stays a valid cross-view pair, and changes each view's colour;
:class:`PairedAugmentation` is the same rule on one pair (a batch of one), for a reader's
``pair_transform``. Both work on pixels, uint8 in [0, 255] or floats in [0, 1], before the
normalisation: a normalised image is refused with a ValueError (never clamped), so that the
normalisation always comes last (as timm's ``PrefetchLoader`` does it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._base import _check_pixels
from .geometry import rotate_pair

__all__ = ["PairedAugmentation", "PairedBatchAugmentation"]


def _check_unnormalised(images: Tensor, name: str, owner: str) -> None:
    """A ValueError for images outside [0, 1] / [0, 255] (e.g. normalised already)."""
    try:
        _check_pixels(images)
    except ValueError as err:
        raise ValueError(
            f"{owner}: the {name} images: {err}. The augmentation works on pixels before the "
            "normalisation: build the per-image transforms with normalize=False "
            "(train_transform(..., normalize=False), create_transform(..., normalize=False)); "
            "the training loop normalises after the augmentation"
        ) from err


class PairedBatchAugmentation:
    """The paired geometric augmentation on whole batches, plus colour changes.

    For every pair of the batch, independently: with probability ``flip_p`` both views are
    mirrored left-right; with ``rotate``, a quarter turn ``k`` in {0, 1, 2, 3} is drawn and,
    in ``mode="panorama"`` (CVUSA, CVACT), the reference tile turns by ``k`` x 90 degrees
    counter-clockwise and the query panorama rolls by ``-k W / 4`` columns to match
    (:func:`~gsra_salad.data.rotate_pair`); in ``mode="polar"`` the reference is already a
    panorama (the tile's :func:`~gsra_salad.data.polar_transform`, SAFA-style) and both views
    roll by ``-k W / 4`` (the polar transform of the turned tile); in ``mode="drone"``
    (University-1652) only the reference tile turns. Then each view of each pair gets its own
    colour change: brightness, contrast and saturation factors drawn uniformly from
    ``[1 - s, 1 + s]`` (torchvision's ``ColorJitter`` formulas, in that order) and, with
    ``channel_gain``, a per-channel gain from ``[1 - g, 1 + g]`` (a white-balance or season
    change), composed into one affine colour map per image and clamped once
    (:meth:`apply_colour`).

    Works on uint8 images (the result is rounded back to uint8) or on floats in [0, 1], before
    the normalisation; normalised images (values below -0.5 or above 1.5) raise a ValueError.
    Every draw comes from ``generator``, so a seeded generator gives the same batches every
    run. :class:`PairedAugmentation` applies the same rule to one pair.

    Args:
        mode: ``"panorama"``, ``"polar"`` or ``"drone"``.
        flip_p: probability of mirroring a pair.
        rotate: draw a quarter turn per pair.
        brightness, contrast, saturation, channel_gain: colour-change strengths (0 disables).
        generator: a ``torch.Generator`` for reproducible draws (default: the global RNG).

    Shape:
        - Input: query (B, 3, Hq, Wq) with Wq divisible by 4 in panorama and polar mode;
          reference (B, 3, S, S) (square, for the quarter turns), or (B, 3, Hr, Wr) with Wr
          divisible by 4 in polar mode.
        - Output: the same shapes and dtypes.

    Example:
        >>> aug = PairedBatchAugmentation(generator=torch.Generator().manual_seed(0))
        >>> q, r = aug(torch.rand(8, 3, 16, 64), torch.rand(8, 3, 32, 32))
        >>> q.shape, r.shape
        (torch.Size([8, 3, 16, 64]), torch.Size([8, 3, 32, 32]))
    """

    def __init__(
        self,
        mode: Literal["panorama", "polar", "drone"] = "panorama",
        flip_p: float = 0.5,
        rotate: bool = True,
        *,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        channel_gain: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in ("panorama", "polar", "drone"):
            raise ValueError(f"mode must be 'panorama', 'polar' or 'drone', got {mode!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        for name, value in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
            ("channel_gain", channel_gain),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a relative strength), got {value}")
        self.mode, self.flip_p, self.rotate = mode, flip_p, rotate
        self.brightness, self.contrast = brightness, contrast
        self.saturation, self.channel_gain = saturation, channel_gain
        self.generator = generator

    def draw(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The geometric draws of one batch: (flip (B,) bool, quarter turns (B,) int64)."""
        flip = torch.rand(batch_size, generator=self.generator) < self.flip_p
        if self.rotate:
            turns = torch.randint(0, 4, (batch_size,), generator=self.generator)
        else:
            turns = torch.zeros(batch_size, dtype=torch.int64)
        return flip, turns

    def geometric(
        self, query: Tensor, reference: Tensor, flip: Tensor, turns: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Applies given flips and quarter turns (see :meth:`draw`) to a batch of pairs."""
        turning = bool((turns % 4).any())
        if self.mode == "polar":
            for name, x in (("query", query), ("reference", reference)):
                if turning and x.shape[-1] % 4:
                    raise ValueError(
                        f"polar mode: the {name} panorama's width must be divisible by 4 to "
                        f"roll by quarter turns, got {x.shape[-1]}"
                    )
        elif reference.shape[-1] != reference.shape[-2] and bool((turns % 2).any()):
            raise ValueError(
                f"quarter turns need square reference images, got {tuple(reference.shape)}; "
                "for polar-transformed references use mode='polar'"
            )
        if self.mode == "panorama" and query.shape[-1] % 4:
            raise ValueError(
                f"panorama width must be divisible by 4 to roll by quarter turns, got "
                f"{query.shape[-1]}"
            )
        query, reference = query.clone(), reference.clone()
        if bool(flip.any()):
            query[flip] = query[flip].flip(-1)
            reference[flip] = reference[flip].flip(-1)
        for k in (1, 2, 3):
            mask = turns == k
            if not bool(mask.any()):
                continue
            if self.mode == "panorama":
                reference[mask], query[mask] = rotate_pair(reference[mask], query[mask], k)
            elif self.mode == "polar":
                wq, wr = query.shape[-1], reference.shape[-1]
                query[mask] = torch.roll(query[mask], -k * wq // 4, dims=-1)
                reference[mask] = torch.roll(reference[mask], -k * wr // 4, dims=-1)
            else:
                reference[mask] = torch.rot90(reference[mask], k, dims=(-2, -1))
        return query, reference

    def draw_colour(self, batch_size: int) -> dict[str, Tensor]:
        """The colour factors of a batch: ``brightness``, ``contrast``, ``saturation`` (B,) and
        ``channel_gain`` (B, 3), each drawn only when its strength is non-zero."""
        factors = {}
        for name in ("brightness", "contrast", "saturation", "channel_gain"):
            strength = getattr(self, name)
            if strength:
                shape = (batch_size, 3) if name == "channel_gain" else (batch_size,)
                u = torch.rand(shape, generator=self.generator)
                factors[name] = 1 - strength + 2 * strength * u
        return factors

    @staticmethod
    def apply_colour(images: Tensor, factors: dict[str, Tensor]) -> Tensor:
        """Applies colour factors (see :meth:`draw_colour`) to a batch (B, 3, H, W).

        With ``g`` the luma of an image (ITU-R 601-2 weights, as torchvision) and ``mean(g)``
        its mean: brightness ``x * fb``; contrast ``mean(g) + fc (x - mean(g))``; saturation
        ``g + fs (x - g)``; gain ``x * gain[c]``, in that order. The four steps compose to one
        affine colour map per image (a 3 x 3 matrix and an offset), applied in one pass and
        clamped once at the end (torchvision's ColorJitter clamps after every step).
        """
        b = images.shape[0]
        if not factors:
            return images
        integer = not images.is_floating_point()
        work = torch.float32 if integer else images.dtype
        top = float(torch.iinfo(images.dtype).max) if integer else 1.0
        x = images.reshape(b, 3, -1).to(work)
        ones = torch.ones(b, dtype=work)
        fb = factors.get("brightness", ones).to(work)
        fc = factors.get("contrast", ones).to(work)
        fs = factors.get("saturation", ones).to(work)
        gain = factors.get("channel_gain", torch.ones(b, 3)).to(work)
        luma = torch.tensor([0.2989, 0.587, 0.114], dtype=work)
        # saturation: fs I + (1 - fs) 1 luma^T; then the gain scales its rows
        sat = fs.view(b, 1, 1) * torch.eye(3, dtype=work) + (1 - fs).view(b, 1, 1) * luma
        sat = gain.unsqueeze(2) * sat
        matrix = sat * (fc * fb).view(b, 1, 1)
        grey_mean = (x.mean(2) @ luma) * fb  # mean luma after the brightness step
        offset = sat.sum(2) * ((1 - fc) * grey_mean).unsqueeze(1)  # (B, 3)
        out = torch.baddbmm(offset.unsqueeze(2), matrix, x).clamp_(0, top)
        if integer:
            out = out.round_()
        return out.to(images.dtype).view(images.shape)

    def colour(self, images: Tensor) -> Tensor:
        """An independent colour change per image of a batch (B, 3, H, W)."""
        return self.apply_colour(images, self.draw_colour(images.shape[0]))

    def __call__(self, query: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        for name, x in (("query", query), ("reference", reference)):
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a batch (B, 3, H, W), got {shape}")
        if query.shape[0] != reference.shape[0]:
            raise ValueError(
                f"query and reference batches differ in size: {query.shape[0]} and "
                f"{reference.shape[0]}"
            )
        for name, x in (("query", query), ("reference", reference)):
            _check_unnormalised(x, name, type(self).__name__)
        flip, turns = self.draw(query.shape[0])
        query, reference = self.geometric(query, reference, flip, turns)
        return self.colour(query), self.colour(reference)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, flip_p={self.flip_p}, "
            f"rotate={self.rotate}, brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, channel_gain={self.channel_gain})"
        )


class PairedAugmentation(PairedBatchAugmentation):
    """:class:`PairedBatchAugmentation` on one pair: the same flip / quarter-turn / roll rule
    (and, if asked, colour changes), applied as to a batch of one.

    For a reader's ``pair_transform`` (it runs first, on the decoded uint8 images):
    ``mode="panorama"`` (CVUSA, CVACT): the satellite tile turns by k x 90 degrees and the
    ground panorama rolls by k / 4 of its width to match (:func:`~gsra_salad.data.rotate_pair`);
    with probability ``flip_p`` both are mirrored left-right. ``mode="drone"``
    (University-1652): drone views are not north-aligned, so the satellite tile turns by a
    random k x 90 degrees alone, and both are mirrored with probability ``flip_p``.
    ``mode="polar"``: both views are panoramas and roll together.

    Kept for callers of earlier versions: the arguments are the same (colour strengths are new,
    keyword-only, off by default); the draws now come from :meth:`draw` (a seed gives other
    flips and turns than before), and normalised images raise a ValueError.

    Args:
        mode: ``"panorama"``, ``"drone"`` or ``"polar"``.
        flip_p: probability of mirroring both views.
        rotate: draw a random quarter turn (otherwise none).
        generator: a ``torch.Generator`` for reproducible draws (default: the global RNG, which
            DataLoader seeds per worker).
        **colour: ``brightness``, ``contrast``, ``saturation``, ``channel_gain`` (default 0).

    Shape:
        - Input: query (3, Hq, Wq), satellite (3, S, S), pixels (uint8 or floats in [0, 1])
        - Output: the same shapes and dtypes

    Example:
        >>> aug = PairedAugmentation("panorama", generator=torch.Generator().manual_seed(0))
        >>> ground, satellite = aug(torch.rand(3, 16, 64), torch.rand(3, 32, 32))
        >>> ground.shape, satellite.shape
        (torch.Size([3, 16, 64]), torch.Size([3, 32, 32]))
    """

    def __init__(
        self,
        mode: Literal["panorama", "polar", "drone"] = "panorama",
        flip_p: float = 0.5,
        rotate: bool = True,
        generator: torch.Generator | None = None,
        **colour: float,
    ) -> None:
        super().__init__(mode, flip_p, rotate, generator=generator, **colour)

    def __call__(self, query: Tensor, satellite: Tensor) -> tuple[Tensor, Tensor]:
        for name, x in (("query", query), ("satellite", satellite)):
            if not isinstance(x, Tensor) or x.dim() != 3:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"PairedAugmentation: {name} must be one image (3, H, W), got {shape}; "
                    "for batches use PairedBatchAugmentation"
                )
        query, satellite = super().__call__(query.unsqueeze(0), satellite.unsqueeze(0))
        return query[0], satellite[0]
