"""CVUSA: street-view panoramas (query) and satellite tiles (reference), 35,532 / 8,884 pairs."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from ._base import PairDataset, PairTransform, Transform, check_dir, check_file

__all__ = ["CVUSA"]

logger = logging.getLogger(__name__)

LAYOUT = (
    "root/splits/train-19zl.csv and root/splits/val-19zl.csv (no header; columns sat, ground, "
    "ground_anno, e.g. bingmap/19/0000001.jpg,streetview/panos/0000001.jpg,...), image paths "
    "relative to root"
)


class CVUSA(PairDataset):
    """CVUSA pairs from ``splits/{train,val}-19zl.csv``.

    Items are ``(ground panorama, satellite tile, id)`` with ``id = int(basename of the
    satellite file)``; images are RGB uint8 tensors (3, H, W) unless transforms change them.
    Image sizes differ between the copies of CVUSA in circulation; nothing here assumes one.

    Positions: the 19zl csv files hold none. When ``root/split_locations/all.csv`` exists (in
    the full CVUSA release: no header, one row per location id, columns ``sat_lat, sat_lon,
    ground_lat, ground_lon, ...``; row ``id - 1`` belongs to id ``id``, as Sample4Geo's GPS
    script reads it), ``positions`` holds each pair's ground (latitude, longitude) in degrees
    (``position_metric = "haversine"``); otherwise ``positions`` is None, and an INFO log line
    says so (GPS-neighbour batches then need the file).

    Args:
        root: the CVUSA directory (the one holding ``splits/``).
        split: ``"train"`` or ``"val"``.
        query_transform: applied to the ground panorama.
        reference_transform: applied to the satellite tile.
        pair_transform: applied to (panorama, tile) first, e.g. ``PairedAugmentation``.
        check_files: verify that every listed image exists (one ``stat`` per file).

    Raises:
        FileNotFoundError: naming the missing directory, csv or image, and the expected layout.
        ValueError: a csv row that is not ``sat,ground,...`` or a csv without any row.
    """

    position_metric = "haversine"

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "val"] = "train",
        *,
        query_transform: Transform | None = None,
        reference_transform: Transform | None = None,
        pair_transform: PairTransform | None = None,
        check_files: bool = True,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"CVUSA: split must be 'train' or 'val', got {split!r}")
        self.root = check_dir(Path(root), "CVUSA", LAYOUT)
        csv_path = check_file(self.root / "splits" / f"{split}-19zl.csv", "CVUSA", LAYOUT)
        queries, references, labels = [], [], []
        with csv_path.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row:
                    continue
                if len(row) < 2:
                    raise ValueError(f"CVUSA: {csv_path}:{line} has {len(row)} column(s); {LAYOUT}")
                sat, ground = row[0].strip(), row[1].strip()
                try:
                    labels.append(int(Path(sat).stem))
                except ValueError as err:
                    raise ValueError(
                        f"CVUSA: {csv_path}:{line}: satellite file name {sat!r} is not a number"
                    ) from err
                queries.append(self.root / ground)
                references.append(self.root / sat)
        if not queries:
            raise ValueError(f"CVUSA: {csv_path} lists no image pairs (empty file?); {LAYOUT}")
        if check_files:
            for path in (*queries, *references):
                check_file(path, "CVUSA", LAYOUT)
        self.split = split
        positions = _read_positions(self.root, labels)
        super().__init__(
            queries,
            references,
            labels,
            query_transform=query_transform,
            reference_transform=reference_transform,
            pair_transform=pair_transform,
            positions=positions,
        )


def _read_positions(root: Path, labels: list[int]) -> np.ndarray | None:
    """Each id's ground (latitude, longitude) from ``split_locations/all.csv``, or None."""
    path = root / "split_locations" / "all.csv"
    if not path.is_file():
        logger.info(
            "CVUSA: no %s (the 19zl splits hold no positions): the pairs have no positions, so "
            "GPS-neighbour batches are not available",
            path,
        )
        return None
    rows = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            try:
                rows.append((float(row[2]), float(row[3])))
            except (IndexError, ValueError) as err:
                raise ValueError(
                    f"CVUSA: {path}:{line}: expected sat_lat,sat_lon,ground_lat,ground_lon,... "
                    f"({err})"
                ) from err
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    ids = np.asarray(labels, dtype=np.int64)
    if ids.min() < 1 or ids.max() > len(table):
        raise ValueError(
            f"CVUSA: {path} has {len(table)} rows but the split holds ids up to {ids.max()} "
            "(row id - 1 holds id's position)"
        )
    return table[ids - 1]
