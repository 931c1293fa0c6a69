"""Shared plumbing of the readers: image decoding, path checks, the pair dataset. Private."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._optional import require as _require

Transform = Callable[[Tensor], Tensor]
PairTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def require(module: str, extra: str = "data") -> ModuleType:
    """:func:`gsra_salad._optional.require` with the readers' extra, ``data``, as default."""
    return _require(module, extra)


def load_rgb(path: str | Path) -> Tensor:
    """Decodes an image file with Pillow into an RGB uint8 tensor (3, H, W).

    Raises:
        OSError: naming ``path`` when the file is missing, truncated or not an image (Pillow's
            own messages do not name the file; its error is chained).
    """
    image_module = require("PIL.Image")
    try:
        with image_module.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as err:  # incl. PIL.UnidentifiedImageError and "image file is truncated"
        error = FileNotFoundError if isinstance(err, FileNotFoundError) else OSError
        raise error(f"could not read image {path}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


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


def check_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: directory {path} not found. Expected layout: {layout}")
    return path


def check_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: file {path} not found. Expected layout: {layout}")
    return path


class PairDataset(Dataset):
    """(query image, reference image, location id) triples from lists of paths.

    Subclasses fill ``query_paths``, ``reference_paths``, ``labels`` (and ``positions``
    where the dataset has them, compared by ``position_metric``: ``"euclidean"`` for planar
    metres, ``"haversine"`` for (latitude, longitude) degrees). Items: ``(query (3, H, W),
    reference (3, H', W'), label)``; images are uint8 tensors unless the transforms change
    them. ``pair_transform(query, reference)`` runs first (e.g.
    :class:`~gsra_salad.data.PairedAugmentation`), then the per-view transforms.
    """

    position_metric = "euclidean"

    def __init__(
        self,
        query_paths: Sequence[Path],
        reference_paths: Sequence[Path],
        labels: Sequence[int],
        *,
        query_transform: Transform | None = None,
        reference_transform: Transform | None = None,
        pair_transform: PairTransform | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        self.query_paths = list(query_paths)
        self.reference_paths = list(reference_paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.positions = positions
        self.query_transform = query_transform
        self.reference_transform = reference_transform
        self.pair_transform = pair_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        query = load_rgb(self.query_paths[index])
        reference = load_rgb(self.reference_paths[index])
        if self.pair_transform is not None:
            query, reference = self.pair_transform(query, reference)
        if self.query_transform is not None:
            query = self.query_transform(query)
        if self.reference_transform is not None:
            reference = self.reference_transform(reference)
        return query, reference, int(self.labels[index])

    def query_set(self) -> ImageSet:
        """The queries as an evaluation set of ``(image, label)`` items: only the query image
        is decoded, with ``query_transform`` (the pair transform is skipped).

        Example:
            >>> import tempfile
            >>> from gsra_salad.data import CVUSA, synthetic
            >>> root = synthetic.write_cvusa(tempfile.mkdtemp(), num_train=2, num_val=3,
            ...                              tile_size=32, pano_size=(16, 64))
            >>> side = CVUSA(root, "val").reference_set()
            >>> image, label = side[0]
            >>> len(side), tuple(image.shape), label == int(side.labels[0])
            (3, (3, 32, 32), True)
        """
        return ImageSet(self.query_paths, self.labels, self.query_transform)

    def reference_set(self) -> ImageSet:
        """The references as an evaluation set of ``(image, label)`` items (see
        :meth:`query_set`), e.g. the images to embed for hard-negative mining."""
        return ImageSet(self.reference_paths, self.labels, self.reference_transform)


class ImageSet(Dataset):
    """(image, label) items for evaluation sets; ``labels`` lists every label.

    The readers' evaluation sets (``University1652(split="test", view=...)``) and one side of a
    pair dataset (:meth:`PairDataset.query_set`, :meth:`PairDataset.reference_set`) are these.
    """

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], transform: Transform | None = None
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
