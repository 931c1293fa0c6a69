"""CVUSA: street-view panoramas (query) and satellite tiles (reference), 35,532 / 8,884 pairs."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

from ._base import PairDataset, PairTransform, Transform, check_dir, check_file

__all__ = ["CVUSA"]

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
        super().__init__(
            queries,
            references,
            labels,
            query_transform=query_transform,
            reference_transform=reference_transform,
            pair_transform=pair_transform,
        )
