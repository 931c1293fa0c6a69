"""CVACT: street-view panoramas and polished satellite tiles, with UTM positions."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from ._base import PairDataset, PairTransform, Transform, check_dir, check_file, require

__all__ = ["CVACT"]

logger = logging.getLogger(__name__)

LAYOUT = (
    "root/ACT_data.mat (panoIds, trainSet, valSet, utm); root/ANU_data_small/streetview/"
    "<id>_grdView.jpg and root/ANU_data_small/satview_polish/<id>_satView_polish.jpg for train "
    "and val; the same two folders under root/ANU_data_test/ for test"
)


def _read_mat(path: Path) -> dict:
    sio = require("scipy.io")
    try:
        return sio.loadmat(str(path))
    except Exception as err:
        raise ValueError(f"CVACT: could not read {path} ({err}); {LAYOUT}") from err


def _field(mat: dict, name: str, path: Path):
    if name not in mat:
        fields = sorted(k for k in mat if not k.startswith("__"))
        raise KeyError(f"CVACT: {path} has no field {name!r} (fields: {fields}); {LAYOUT}")
    return mat[name]


def _ids(mat: dict, path: Path) -> np.ndarray:
    raw = np.asarray(_field(mat, "panoIds", path)).reshape(-1)
    # a char matrix loads as strings, a cell array as objects wrapping 1-element arrays
    ids = [str(np.asarray(v).reshape(-1)[0]) if raw.dtype == object else str(v) for v in raw]
    return np.array([i.strip() for i in ids])


def _names(folder: Path, suffix: str) -> set[str]:
    """The ids of the files ``<id><suffix>`` in ``folder``."""
    return {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")}


def _test_candidates(folder: Path, all_ids: np.ndarray) -> list[tuple[str, int]]:
    """(id, label) of every id with a panorama or a satellite file under ``ANU_data_test/``.

    Labels are indices into ``panoIds``; ids absent from it get fresh labels after them.
    """
    wanted = sorted(
        _names(folder / "streetview", "_grdView.jpg")
        | _names(folder / "satview_polish", "_satView_polish.jpg")
    )
    index = {pid: i for i, pid in enumerate(all_ids)}
    candidates, extra = [], len(all_ids)
    for pid in wanted:
        if pid in index:
            candidates.append((pid, index[pid]))
        else:
            candidates.append((pid, extra))
            extra += 1
    return candidates


def _split_candidates(
    mat: dict, mat_path: Path, split: str, all_ids: np.ndarray
) -> list[tuple[str, int]]:
    """(id, label) of the train or val split: ``panoIds[<key>[0][0][1] - 1]`` (1-based)."""
    key = "trainSet" if split == "train" else "valSet"
    try:
        indices = np.asarray(_field(mat, key, mat_path)[0][0][1], dtype=np.int64).reshape(-1) - 1
    except (IndexError, TypeError, ValueError) as err:
        raise ValueError(
            f"CVACT: {mat_path}: {key}[0][0][1] is not a list of indices; {LAYOUT}"
        ) from err
    if len(indices) and (indices.min() < 0 or indices.max() >= len(all_ids)):
        raise ValueError(f"CVACT: {mat_path}: {key} indices fall outside 1..{len(all_ids)}")
    return [(all_ids[i], int(i)) for i in indices]


def _existing_pairs(folder: Path, candidates: list[tuple[str, int]]):
    """Paths and labels of the candidates whose two files exist, and the ids skipped."""
    queries, references, labels, skipped = [], [], [], []
    for pid, label in candidates:
        q = folder / "streetview" / f"{pid}_grdView.jpg"
        r = folder / "satview_polish" / f"{pid}_satView_polish.jpg"
        if not (q.is_file() and r.is_file()):
            skipped.append(pid)
            continue
        queries.append(q)
        references.append(r)
        labels.append(label)
    return queries, references, labels, skipped


class CVACT(PairDataset):
    """CVACT pairs: ``train`` / ``val`` from ``ACT_data.mat``, ``test`` from ``ANU_data_test/``.

    ``train`` and ``val`` take ``panoIds[trainSet[0][0][1] - 1]`` / ``panoIds[valSet[0][0][1] -
    1]`` (1-based MATLAB indices) under ``ANU_data_small/``; ``test`` takes every id whose
    panorama and satellite files are both under ``ANU_data_test/``. Ids whose files are missing
    are skipped and counted in one warning (never a crash mid-epoch); ``skipped`` lists them.
    Labels are indices into ``panoIds`` (test ids absent from it get fresh labels after them);
    ``positions`` holds the UTM coordinates (N, 2) in metres (NaN where unknown).

    Args:
        root: the CVACT directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        query_transform, reference_transform, pair_transform: as for
            :class:`~gsra_salad.data.CVUSA`.

    Raises:
        FileNotFoundError, KeyError, ValueError: naming the missing path or field and the layout.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "val", "test"] = "train",
        *,
        query_transform: Transform | None = None,
        reference_transform: Transform | None = None,
        pair_transform: PairTransform | None = None,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"CVACT: split must be 'train', 'val' or 'test', got {split!r}")
        self.root = check_dir(Path(root), "CVACT", LAYOUT)
        mat_path = check_file(self.root / "ACT_data.mat", "CVACT", LAYOUT)
        mat = _read_mat(mat_path)
        all_ids = _ids(mat, mat_path)
        utm = np.asarray(_field(mat, "utm", mat_path), dtype=np.float64).reshape(-1, 2)
        if len(utm) != len(all_ids):
            raise ValueError(
                f"CVACT: {mat_path}: utm has {len(utm)} rows for {len(all_ids)} panoIds"
            )
        if split == "test":
            folder = check_dir(self.root / "ANU_data_test", "CVACT", LAYOUT)
            candidates = _test_candidates(folder, all_ids)
        else:
            folder = self.root / "ANU_data_small"
            candidates = _split_candidates(mat, mat_path, split, all_ids)
        queries, references, labels, self.skipped = _existing_pairs(folder, candidates)
        if self.skipped:
            warnings.warn(
                f"CVACT {split}: skipped {len(self.skipped)} of {len(candidates)} ids whose "
                f"panorama or satellite file is missing under {folder} (e.g. {self.skipped[0]})",
                stacklevel=2,
            )
        if not queries:
            raise FileNotFoundError(f"CVACT {split}: no image pairs found under {folder}; {LAYOUT}")
        positions = [utm[label] if label < len(utm) else (np.nan, np.nan) for label in labels]
        self.split = split
        super().__init__(
            queries,
            references,
            labels,
            query_transform=query_transform,
            reference_transform=reference_transform,
            pair_transform=pair_transform,
            positions=np.asarray(positions, dtype=np.float64).reshape(-1, 2),
        )
