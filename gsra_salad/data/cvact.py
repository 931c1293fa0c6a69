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
            grd = {
                p.name[: -len("_grdView.jpg")]
                for p in (folder / "streetview").glob("*_grdView.jpg")
            }
            sat = {
                p.name[: -len("_satView_polish.jpg")]
                for p in (folder / "satview_polish").glob("*_satView_polish.jpg")
            }
            wanted = sorted(grd | sat)
            index = {pid: i for i, pid in enumerate(all_ids)}
            labels, extra = [], len(all_ids)
            for pid in wanted:
                if pid in index:
                    labels.append(index[pid])
                else:
                    labels.append(extra)
                    extra += 1
            candidates = list(zip(wanted, labels))
        else:
            folder = self.root / "ANU_data_small"
            key = "trainSet" if split == "train" else "valSet"
            try:
                indices = (
                    np.asarray(_field(mat, key, mat_path)[0][0][1], dtype=np.int64).reshape(-1) - 1
                )
            except (IndexError, TypeError, ValueError) as err:
                raise ValueError(
                    f"CVACT: {mat_path}: {key}[0][0][1] is not a list of indices; {LAYOUT}"
                ) from err
            if len(indices) and (indices.min() < 0 or indices.max() >= len(all_ids)):
                raise ValueError(f"CVACT: {mat_path}: {key} indices fall outside 1..{len(all_ids)}")
            candidates = [(all_ids[i], int(i)) for i in indices]
        queries, references, labels, positions, skipped = [], [], [], [], []
        for pid, label in candidates:
            q = folder / "streetview" / f"{pid}_grdView.jpg"
            r = folder / "satview_polish" / f"{pid}_satView_polish.jpg"
            if not (q.is_file() and r.is_file()):
                skipped.append(pid)
                continue
            queries.append(q)
            references.append(r)
            labels.append(label)
            positions.append(utm[label] if label < len(utm) else (np.nan, np.nan))
        self.skipped = skipped
        if skipped:
            warnings.warn(
                f"CVACT {split}: skipped {len(skipped)} of {len(candidates)} ids whose panorama or "
                f"satellite file is missing under {folder} (e.g. {skipped[0]})",
                stacklevel=2,
            )
        if not queries:
            raise FileNotFoundError(f"CVACT {split}: no image pairs found under {folder}; {LAYOUT}")
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
