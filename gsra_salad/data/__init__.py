"""Datasets, transforms, samplers and synthetic layouts. Imports no model code.

Readers take the dataset's ``root`` and read the real on-disk layouts; decoding needs Pillow
and CVACT's ``.mat`` needs SciPy (``pip install 'gsra-salad[data]'``); transforms need
torchvision.
"""

from . import synthetic
from .cvact import CVACT
from .cvusa import CVUSA
from .geometry import haversine_m, nearest_neighbours, polar_transform, rotate_pair
from .preload import PairedBatchAugmentation, PreloadedImages, PreloadedPairs
from .samplers import NeighbourBatchSampler, UniqueLabelBatchSampler
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairedAugmentation,
    eval_transform,
    train_transform,
)
from .university1652 import University1652

__all__ = [
    "CVACT",
    "CVUSA",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NeighbourBatchSampler",
    "PairedAugmentation",
    "PairedBatchAugmentation",
    "PreloadedImages",
    "PreloadedPairs",
    "UniqueLabelBatchSampler",
    "University1652",
    "eval_transform",
    "haversine_m",
    "nearest_neighbours",
    "polar_transform",
    "rotate_pair",
    "synthetic",
    "train_transform",
]
