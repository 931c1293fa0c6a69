"""University-1652: drone, satellite (and street) views of 1,652 university buildings."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from ._base import ImageSet, PairDataset, PairTransform, Transform, check_dir

__all__ = ["University1652"]

LAYOUT = (
    "root/train/{satellite,drone,street,google}/<id>/... and root/test/{query_drone,"
    "gallery_drone,query_satellite,gallery_satellite,query_street,gallery_street}/<id>/...; "
    "a satellite folder holds <id>.jpg, a drone folder image-01.jpeg ... image-54.jpeg"
)
EVAL_VIEWS = (
    "query_drone",
    "gallery_drone",
    "query_satellite",
    "gallery_satellite",
    "query_street",
    "gallery_street",
)
_COUNTERPART = {
    "gallery_satellite": "query_drone",
    "gallery_drone": "query_satellite",
    "gallery_street": "query_street",
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_TRAIN_ARGS = ("query_view", "query_transform", "reference_transform", "pair_transform")
_TEST_ARGS = ("view", "transform")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _buildings(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _label(folder: Path) -> int | None:
    """The building id a folder's name gives, None if the name is not a number."""
    return int(folder.name) if folder.name.isdigit() else None


def _check_arguments(split: str, **given) -> None:
    """Rejects arguments given (not None) that belong to the other split."""
    allowed = _TRAIN_ARGS if split == "train" else _TEST_ARGS
    misplaced = [name for name, value in given.items() if value is not None and name not in allowed]
    if misplaced:
        other = "test" if split == "train" else "train"
        raise ValueError(
            f"University-1652: {', '.join(misplaced)} (given) belong(s) to split={other!r}; "
            f"split={split!r} takes {', '.join(allowed)}. A training set is "
            "University1652(root, 'train', query_view=...), an evaluation set "
            "University1652(root, 'test', view=...)"
        )


class University1652(Dataset):
    """University-1652 readers: training pairs, or one evaluation set.

    ``University1652(root, split="train", query_view="drone")`` is a pair dataset: every image
    of ``query_view`` (``"drone"`` (the default), ``"street"`` or ``"google"``) with its
    building's satellite image, labelled by the building id (37,854 drone pairs over 701
    buildings in the real data); items are ``(query, satellite, building id)``.

    ``University1652(root, split="test", view="query_drone" | "gallery_satellite" | ...)`` is an
    evaluation set of ``(image, building id)``; ``labels`` lists every label. The satellite
    gallery keeps the distractor buildings that no query shows (the official protocol);
    ``distractors`` marks them (True where the label is absent from the matching query view).

    Building folders whose name is not a number, and (training) buildings without a satellite
    image, are skipped and counted in one warning (as :class:`~gsra_salad.data.CVACT` does);
    ``skipped`` lists their folders. Images are RGB uint8 tensors (3, H, W) unless transforms
    change them.

    Args:
        root: the University-1652 directory (holding ``train/`` and ``test/``).
        split: ``"train"`` or ``"test"``.
        query_view: training query view (``split="train"`` only; default ``"drone"``).
        view: evaluation set (``split="test"`` only, required there).
        query_transform, reference_transform, pair_transform: training transforms
            (``split="train"`` only).
        transform: evaluation transform (``split="test"`` only).

    Raises:
        FileNotFoundError: naming the missing folder and the expected layout.
        ValueError: an unknown split or view, or an argument that does not apply to ``split``
            (e.g. ``view=`` with ``split="train"``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "test"] = "train",
        *,
        query_view: Literal["drone", "street", "google"] | None = None,
        view: str | None = None,
        query_transform: Transform | None = None,
        reference_transform: Transform | None = None,
        pair_transform: PairTransform | None = None,
        transform: Transform | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"University-1652: split must be 'train' or 'test', got {split!r}")
        _check_arguments(
            split,
            query_view=query_view,
            view=view,
            query_transform=query_transform,
            reference_transform=reference_transform,
            pair_transform=pair_transform,
            transform=transform,
        )
        self.root = check_dir(Path(root), "University-1652", LAYOUT)
        self.split = split
        self.positions = None
        if split == "train":
            self.query_view, self.view = query_view or "drone", None
            self._data, self.skipped = _train_pairs(
                self.root, self.query_view, query_transform, reference_transform, pair_transform
            )
            self.distractors = None
            where = self.root / "train" / self.query_view
        else:
            if view not in EVAL_VIEWS:
                raise ValueError(
                    f"University-1652 test: view must be one of {EVAL_VIEWS}, got {view!r}"
                )
            self.query_view, self.view = None, view
            self._data, self.distractors, self.skipped = _eval_set(self.root, view, transform)
            where = self.root / "test" / view
        if self.skipped:
            warnings.warn(
                f"University-1652 {split}: skipped {len(self.skipped)} building folder(s) under "
                f"{where} whose name is not a number or (training) that have no satellite image "
                f"under train/satellite (e.g. {self.skipped[0]}); see .skipped",
                stacklevel=2,
            )

    @property
    def labels(self) -> np.ndarray:
        """Building id of every item."""
        return self._data.labels

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int):
        return self._data[index]


def _train_pairs(root, query_view, query_transform, reference_transform, pair_transform):
    """The pair dataset of ``query_view`` and the building folders skipped."""
    if query_view not in ("drone", "street", "google"):
        raise ValueError(
            f"University-1652: query_view must be drone, street or google, got {query_view!r}"
        )
    sat_root = check_dir(root / "train" / "satellite", "University-1652", LAYOUT)
    view_root = check_dir(root / "train" / query_view, "University-1652", LAYOUT)
    satellites = {}
    for folder in _buildings(sat_root):
        images = _images(folder)
        if images:
            satellites[folder.name] = images[0]
    queries, references, labels, skipped = [], [], [], []
    for folder in _buildings(view_root):
        label = _label(folder)
        if label is None or folder.name not in satellites:
            skipped.append(folder.name)
            continue
        for image in _images(folder):
            queries.append(image)
            references.append(satellites[folder.name])
            labels.append(label)
    if not queries:
        raise FileNotFoundError(
            f"University-1652: no {query_view} images with a satellite image under {view_root}; "
            f"{LAYOUT}"
        )
    data = PairDataset(
        queries,
        references,
        labels,
        query_transform=query_transform,
        reference_transform=reference_transform,
        pair_transform=pair_transform,
    )
    return data, skipped


def _eval_set(root: Path, view: str, transform):
    """The evaluation set, its distractor mask and the building folders skipped."""
    folder = check_dir(root / "test" / view, "University-1652", LAYOUT)
    paths, labels, skipped = [], [], []
    for building in _buildings(folder):
        label = _label(building)
        if label is None:
            skipped.append(building.name)
            continue
        for image in _images(building):
            paths.append(image)
            labels.append(label)
    if not paths:
        raise FileNotFoundError(f"University-1652: no images under {folder}; {LAYOUT}")
    counterpart = _COUNTERPART.get(view)
    if counterpart is not None and (root / "test" / counterpart).is_dir():
        shown = {_label(b) for b in _buildings(root / "test" / counterpart)}
        distractors = np.array([label not in shown for label in labels])
    else:
        distractors = np.zeros(len(labels), dtype=bool)
    return ImageSet(paths, labels, transform), distractors, skipped
