"""Decode once, augment on batches: an in-memory data path for small datasets and CPU demos.

The per-item path (a reader with transforms in a ``DataLoader``) decodes every JPEG and runs
every transform once per image per epoch, in Python, one image at a time. When the resized
images fit in memory (the synthetic layouts, a few thousand real images at reduced size), it is
much faster to decode and resize every image once into a uint8 tensor and to do the random
part of the pipeline on whole batches:

- :class:`PreloadedPairs` holds a pair dataset's query and reference images as
  (N, 3, H, W) uint8 tensors (decoded with a thread pool, resized exactly as
  :func:`~gsra_salad.data.eval_transform` resizes) and serves batches for any batch sampler
  (:class:`~gsra_salad.data.UniqueLabelBatchSampler`, ...);
- :class:`PreloadedImages` does the same for an evaluation set ((image, label) items);
- :class:`PairedBatchAugmentation` (defined in ``gsra_salad.data.augment``, the rule of
  :class:`~gsra_salad.data.PairedAugmentation` on whole batches: a flip and a quarter turn per
  pair, the panorama rolled to match the tile) plus an independent colour change per view, on
  the uint8 images, before the normalisation;
- :func:`normalize` scales uint8 batches to ImageNet-normalised floats, with the same
  operations as :func:`~gsra_salad.data.eval_transform`.

Without augmentation the batches are identical to those of the per-item path with
``eval_transform`` (tested).

Example:
    >>> import tempfile
    >>> from gsra_salad.data import CVUSA, UniqueLabelBatchSampler, synthetic
    >>> root = synthetic.write_cvusa(tempfile.mkdtemp(), num_train=8, num_val=2, tile_size=64,
    ...                              pano_size=(32, 128))
    >>> pairs = PreloadedPairs(CVUSA(root, "train"), query_size=(16, 64), reference_size=32)
    >>> pairs.query.shape, pairs.reference.shape, pairs.query.dtype
    (torch.Size([8, 3, 16, 64]), torch.Size([8, 3, 32, 32]), torch.uint8)
    >>> augment = PairedBatchAugmentation("panorama", brightness=0.2, generator=torch.Generator())
    >>> sampler = UniqueLabelBatchSampler(pairs.labels, batch_size=4)
    >>> query, reference, labels = next(iter(pairs.batches(sampler, augment)))
    >>> query.shape, reference.dtype, labels.shape
    (torch.Size([4, 3, 16, 64]), torch.float32, torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._input import InputConfig
from ._base import load_rgb, require
from .augment import PairedBatchAugmentation
from .transforms import IMAGENET_MEAN, IMAGENET_STD, pixel_steps

__all__ = [
    "PairedBatchAugmentation",
    "PreloadedImages",
    "PreloadedPairs",
    "load_images",
    "normalize",
]

Size = int | tuple[int, int] | None


def _size(size: Size) -> list[int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        pair = [size, size]
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        pair = [int(s) for s in size]
    else:
        raise TypeError(f"size must be an int, an (H, W) pair or None, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return pair


def _resize(image: Tensor, size: list[int] | None) -> Tensor:
    if size is None:
        return image
    functional = require("torchvision.transforms.v2.functional", "torchvision")
    # the same call as eval_transform's v2.Resize(size, antialias=True): identical pixels
    return functional.resize(image, size, antialias=True)


def _fill(
    count: int,
    load: Any,
    size: list[int] | None,
    workers: int,
    what: str,
) -> Tensor:
    """Loads ``count`` images with ``load(i) -> (3, H, W) uint8``, resizes, stacks."""
    if count == 0:
        raise ValueError(f"{what}: there are no images to load")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    first = _resize(load(0), size)
    if first.dim() != 3 or first.dtype != torch.uint8:
        raise TypeError(
            f"{what}: images must be uint8 tensors (3, H, W) as the readers return them without "
            f"transforms, got {first.dtype} {tuple(first.shape)}; remove the dataset's transforms"
        )
    out = torch.empty((count, *first.shape), dtype=torch.uint8)
    out[0] = first

    def work(i: int) -> None:
        image = _resize(load(i), size)
        if image.shape != first.shape:
            raise ValueError(
                f"{what}: image {i} has shape {tuple(image.shape)}, image 0 {tuple(first.shape)}; "
                "pass a size so that every image is resized to it"
            )
        out[i] = image

    indices = range(1, count)
    if workers <= 1:
        for i in indices:
            work(i)
    else:
        # Pillow's decoder and torch's resize release the GIL: threads run them in parallel
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(work, indices, chunksize=max(1, count // (8 * workers))):
                pass
    return out


BatchTransform = Callable[[Tensor], Tensor]


def _apply(transform: BatchTransform | None, images: Tensor, what: str, chunk: int = 256) -> Tensor:
    """Runs a uint8 batch transform over ``images`` in chunks (bounded memory), checks it."""
    if transform is None:
        return images
    parts = [transform(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    first = parts[0]
    if not isinstance(first, Tensor) or first.dtype != torch.uint8 or first.dim() != 4:
        got = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, Tensor) else type(first)
        raise TypeError(
            f"{what}: the transform must map a uint8 batch (N, 3, H, W) to a uint8 batch, got "
            f"{got}; it runs once at loading (e.g. polar_transform), normalisation comes later"
        )
    out = torch.cat(parts)
    if len(out) != len(images):
        raise ValueError(f"{what}: the transform returned {len(out)} images for {len(images)}")
    return out


def load_images(paths: Sequence[str | Path], size: Size = None, *, workers: int = 0) -> Tensor:
    """Decodes image files and resizes them (as :func:`~gsra_salad.data.eval_transform` does).

    Args:
        paths: image files.
        size: int or (H, W) to resize every image to; ``None`` keeps the files' size (they
            must then all have the same size).
        workers: decoding threads (0 or 1: in the calling thread).

    Returns:
        (N, 3, H, W) uint8.

    Example:
        >>> import tempfile
        >>> from gsra_salad.data import CVUSA, synthetic
        >>> root = synthetic.write_cvusa(tempfile.mkdtemp(), num_train=2, num_val=1, tile_size=64)
        >>> load_images(CVUSA(root).reference_paths, 32).shape
        torch.Size([2, 3, 32, 32])
    """
    paths = list(paths)
    return _fill(len(paths), lambda i: load_rgb(paths[i]), _size(size), workers, "load_images")


def normalize(
    images: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """uint8 images to float32 in [0, 1], then ``(x - mean) / std`` per channel.

    The operations of :func:`~gsra_salad.data.eval_transform` after its resize, so a batch of
    preloaded images gives the same floats as the per-item path.

    Args:
        images: (..., 3, H, W) uint8 (or floats in [0, 1]).
        mean, std: per-channel statistics (ImageNet's by default).

    Returns:
        (..., 3, H, W) float32.

    Example:
        >>> normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0]
        tensor([2.2489, 2.4286, 2.6400])
    """
    if not isinstance(images, Tensor) or images.dim() < 3 or images.shape[-3] != len(mean):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be (..., {len(mean)}, H, W), got {shape}")
    functional = require("torchvision.transforms.v2.functional", "torchvision")
    x = functional.to_dtype(images, torch.float32, scale=True)
    return functional.normalize(x, list(mean), list(std))


def _with_input(
    config: InputConfig | None,
    size: Size,
    transform: BatchTransform | None,
    names: tuple[str, str, str],
) -> tuple[list[int] | None, BatchTransform | None]:
    """The resize size and uint8 batch transform of a view: from ``config`` when given (then
    ``size`` and ``transform`` must not be), else from ``size`` and ``transform``. ``names``:
    the three arguments' names, for the errors."""
    if config is None:
        return _size(size), transform
    if not isinstance(config, InputConfig):
        raise TypeError(
            f"{names[0]} must be an InputConfig (e.g. resolve_input_config(model, view)), got "
            f"{type(config).__name__}"
        )
    if size is not None or transform is not None:
        raise ValueError(
            f"give either {names[0]} (an InputConfig: it sets the size and the view transform) "
            f"or {names[1]} / {names[2]}, not both"
        )
    return pixel_steps(config)


def _names(view: str) -> tuple[str, str, str]:
    return f"{view}_input", f"{view}_size", f"{view}_transform"


def _stats(config: InputConfig | None) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation's mean and std: the config's, or ImageNet's."""
    return (IMAGENET_MEAN, IMAGENET_STD) if config is None else (config.mean, config.std)


def _paths(dataset: Any, *names: str) -> list[list[Path]] | None:
    """The path lists of a reader (or of the reader it wraps), or None."""
    for candidate in (dataset, getattr(dataset, "_data", None)):
        if candidate is not None and all(hasattr(candidate, n) for n in names):
            return [list(getattr(candidate, n)) for n in names]
    return None


class PreloadedImages(Dataset):
    """An evaluation set ((image, label) items) decoded and resized once, held in memory.

    Args:
        source: an evaluation set such as ``University1652(root, "test", view=...)`` (read from
            its files; its own transform is not applied), any dataset of (uint8 image, label)
            items, or an (N, 3, H, W) uint8 tensor (then give ``labels``).
        size: int or (H, W) to resize to; ``None`` keeps the images' size.
        labels: (N,) labels when ``source`` is a tensor.
        transform: applied once, after resizing, to the uint8 images as batches (N, 3, H, W),
            returning uint8 batches, e.g. ``lambda x: polar_transform(x, (64, 256))``.
        workers: decoding threads.
        normalize_items: items are normalised float32 images (``True``, ready for a model) or
            the stored uint8 images.
        input_config: the :class:`~gsra_salad.InputConfig` of the view these images are
            embedded by (e.g. ``resolve_input_config(model, "reference")``): resizes or
            polar-transforms as it says and normalises with its mean and std; then leave
            ``size`` and ``transform`` out. Without it, ImageNet's mean and std.

    Attributes:
        images: (N, 3, H, W) uint8.
        labels: (N,) int64 tensor.
        input_config: the ``InputConfig`` given (or ``None``).

    Example:
        >>> images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
        >>> images = PreloadedImages(images, labels=[0, 1, 2, 3])
        >>> [tuple(x.shape) for x, _ in images.batches(3)]
        [(3, 3, 8, 8), (1, 3, 8, 8)]
    """

    def __init__(
        self,
        source: Dataset | Tensor,
        size: Size = None,
        *,
        labels: Sequence[int] | np.ndarray | Tensor | None = None,
        transform: BatchTransform | None = None,
        workers: int = 0,
        normalize_items: bool = True,
        input_config: InputConfig | None = None,
    ) -> None:
        pair, transform = _with_input(
            input_config, size, transform, ("input_config", "size", "transform")
        )
        self.input_config = input_config
        if isinstance(source, Tensor):
            if labels is None:
                raise ValueError("PreloadedImages: give labels= with a tensor of images")
            if source.dim() != 4 or source.dtype != torch.uint8:
                raise ValueError(
                    f"PreloadedImages: images must be (N, 3, H, W) uint8, got {source.dtype} "
                    f"{tuple(source.shape)}"
                )
            self.images = _resize(source, pair).contiguous()
        else:
            if labels is None:
                labels = np.asarray(source.labels)  # type: ignore[attr-defined]
            found = _paths(source, "paths")
            if found is not None:
                (paths,) = found
                load = lambda i: load_rgb(paths[i])  # noqa: E731
            else:
                load = lambda i: source[i][0]  # noqa: E731
            self.images = _fill(len(labels), load, pair, workers, "PreloadedImages")
        self.images = _apply(transform, self.images, "PreloadedImages")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"PreloadedImages: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.normalize_items = normalize_items

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.normalize_items:
            image = normalize(image, *_stats(self.input_config))
        return image, int(self.labels[index])

    def batches(self, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised batches in order: (images (B, 3, H, W) float32, labels (B,))."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            chunk = slice(start, start + batch_size)
            yield normalize(self.images[chunk], *_stats(self.input_config)), self.labels[chunk]

    @classmethod
    def _of(
        cls, images: Tensor, labels: Tensor, config: InputConfig | None, normalize_items: bool
    ) -> PreloadedImages:
        """Images already brought to ``config``'s pixels (no copy), normalised by its stats."""
        out = cls(images, labels=labels, normalize_items=normalize_items)
        out.input_config = config
        return out


class PreloadedPairs(Dataset):
    """A pair dataset's images decoded and resized once, held as uint8 tensors.

    Args:
        source: a pair dataset (``CVUSA``, ``CVACT``, ``University1652(split="train")``, any
            ``PairDataset``; read from its files, its own transforms are not applied), or any
            dataset of (uint8 query, uint8 reference, label) items.
        query_size, reference_size: int or (H, W) to resize each view to, as
            :func:`~gsra_salad.data.eval_transform` would; ``None`` keeps the files' size.
        query_transform, reference_transform: applied once, after resizing, to each view's
            uint8 images as batches (N, 3, H, W), returning uint8 batches. E.g.
            ``reference_transform=lambda x: polar_transform(x, (64, 256))`` turns satellite
            tiles into panoramas (SAFA-style), to train with
            ``PairedBatchAugmentation("polar")``.
        workers: decoding threads (0: in the calling thread).
        query_input, reference_input: the :class:`~gsra_salad.InputConfig` of each view
            (e.g. ``resolve_input_config(model, "query")``), instead of the size and transform
            arguments: the view is resized, or centre-cropped and polar-transformed, as the
            config says (the same pixels as ``create_transform(config, normalize=False)``),
            and :meth:`batches` normalises it with the config's mean and std (ImageNet's
            without a config).

    Attributes:
        query: (N, 3, Hq, Wq) uint8.
        reference: (N, 3, Hr, Wr) uint8. A reference image shared by several pairs (e.g. a
            University-1652 satellite tile and its drone views) is decoded once.
        labels: (N,) int64 location ids.
        positions: the source's ``positions`` (or None), for ``NeighbourBatchSampler``.
        query_input, reference_input: the ``InputConfig`` given for each view (or ``None``).

    Items are ``(query, reference, label)`` with uint8 images, so the object also works with a
    ``DataLoader`` and any sampler; :meth:`batches` is the fast way.
    """

    def __init__(
        self,
        source: Dataset,
        query_size: Size = None,
        reference_size: Size = None,
        *,
        query_transform: BatchTransform | None = None,
        reference_transform: BatchTransform | None = None,
        workers: int = 0,
        query_input: InputConfig | None = None,
        reference_input: InputConfig | None = None,
    ) -> None:
        qsize, query_transform = _with_input(
            query_input, query_size, query_transform, _names("query")
        )
        rsize, reference_transform = _with_input(
            reference_input, reference_size, reference_transform, _names("reference")
        )
        self.query_input, self.reference_input = query_input, reference_input
        labels = np.asarray(source.labels)  # type: ignore[attr-defined]
        found = _paths(source, "query_paths", "reference_paths")
        if found is not None:
            qpaths, rpaths = found
            self.query = _fill(len(qpaths), lambda i: load_rgb(qpaths[i]), qsize, workers, "query")
            unique = list(dict.fromkeys(rpaths))
            where = {p: i for i, p in enumerate(unique)}
            decoded = _fill(len(unique), lambda i: load_rgb(unique[i]), rsize, workers, "reference")
            decoded = _apply(reference_transform, decoded, "reference_transform")
            index = torch.tensor([where[p] for p in rpaths], dtype=torch.int64)
            self.reference = decoded if len(unique) == len(rpaths) else decoded[index]
        else:
            n = len(labels)
            self.query = _fill(n, lambda i: source[i][0], qsize, workers, "query")
            self.reference = _fill(n, lambda i: source[i][1], rsize, workers, "reference")
            self.reference = _apply(reference_transform, self.reference, "reference_transform")
        self.query = _apply(query_transform, self.query, "query_transform")
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.positions = getattr(source, "positions", None)
        self.position_metric = getattr(source, "position_metric", "euclidean")
        if not len(self.query) == len(self.reference) == len(self.labels):
            raise ValueError(
                f"PreloadedPairs: {len(self.query)} queries, {len(self.reference)} references, "
                f"{len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.query[index], self.reference[index], int(self.labels[index])

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The uint8 images and labels of ``indices``: ((B, 3, Hq, Wq), (B, 3, Hr, Wr), (B,))."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.query[index], self.reference[index], self.labels[index]

    def batches(
        self,
        batch_sampler: Iterable[Sequence[int]],
        augmentation: PairedBatchAugmentation | None = None,
        *,
        normalized: bool = True,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One epoch of training batches.

        Args:
            batch_sampler: yields lists of indices (e.g. ``UniqueLabelBatchSampler``; call its
                ``set_epoch`` before each epoch as usual).
            augmentation: applied to each (query, reference) batch, e.g.
                :class:`PairedBatchAugmentation`.
            normalized: normalise the batches (float32; with each view's ``InputConfig``
                mean and std, ImageNet's without), after the augmentation; otherwise the
                (augmented) uint8 images.

        Yields:
            (query (B, 3, Hq, Wq), reference (B, 3, Hr, Wr), labels (B,)).
        """
        for indices in batch_sampler:
            query, reference, labels = self.batch(indices)
            if augmentation is not None:
                query, reference = augmentation(query, reference)
            if normalized:
                query = normalize(query, *_stats(self.query_input))
                reference = normalize(reference, *_stats(self.reference_input))
            yield query, reference, labels

    def query_set(self, *, normalize_items: bool = True) -> PreloadedImages:
        """The query images as an evaluation set (shares memory; no copy; normalised with
        ``query_input``'s statistics)."""
        return PreloadedImages._of(self.query, self.labels, self.query_input, normalize_items)

    def reference_set(self, *, normalize_items: bool = True) -> PreloadedImages:
        """The reference images as an evaluation set (shares memory; no copy; normalised with
        ``reference_input``'s statistics)."""
        return PreloadedImages._of(
            self.reference, self.labels, self.reference_input, normalize_items
        )
