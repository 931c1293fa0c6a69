"""Datasets, transforms, samplers and synthetic layouts. Imports no model code.

Readers take the dataset's ``root`` and read the real on-disk layouts; decoding needs Pillow
and CVACT's ``.mat`` needs SciPy (``pip install 'gsra-salad[data]'``); transforms need
torchvision. :func:`create_transform` builds a view's transform from the
:class:`~gsra_salad.InputConfig` a model records.
"""

from .._input import InputConfig
from . import synthetic
from ._base import ImageSet
from .cvact import CVACT
from .cvusa import CVUSA
from .geometry import haversine_m, nearest_neighbours, polar_transform, rotate_pair
from .preload import PairedBatchAugmentation, PreloadedImages, PreloadedPairs
from .published import (
    CoarseDropout,
    GridDropout,
    JPEGCompression,
    Sharpen,
    published_augmentation,
)
from .samplers import NeighbourBatchSampler, UniqueLabelBatchSampler
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairedAugmentation,
    create_transform,
    eval_transform,
    resolve_input_config,
    train_transform,
)
from .university1652 import University1652

__all__ = [
    "CVACT",
    "CVUSA",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CoarseDropout",
    "GridDropout",
    "ImageSet",
    "InputConfig",
    "JPEGCompression",
    "NeighbourBatchSampler",
    "PairedAugmentation",
    "PairedBatchAugmentation",
    "PreloadedImages",
    "PreloadedPairs",
    "Sharpen",
    "UniqueLabelBatchSampler",
    "University1652",
    "create_transform",
    "eval_transform",
    "haversine_m",
    "nearest_neighbours",
    "polar_transform",
    "published_augmentation",
    "resolve_input_config",
    "rotate_pair",
    "synthetic",
    "train_transform",
]
