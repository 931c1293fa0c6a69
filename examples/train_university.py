"""Train a cross-view geo-localizer on University-1652 (drone <-> satellite), or its demo.

    python examples/train_university.py --demo                          # synthetic, CPU
    python examples/train_university.py --data-root /data/University-1652

Defaults with --data-root: LRFR's recipe (its public train_university.py): lrfr() at
384 x 384 for both views, soft-margin triplet loss with semi-hard negatives (alpha 10), batch 32
pairs of distinct buildings, AdamW lr 1e-4, linear decay to 0 without warmup, 40 epochs,
clipping by value 100, mixed precision, satellite and drone flipped together with p = 0.5,
seed 1. Reports drone -> satellite and satellite -> drone (official protocol: distractor
buildings stay in the gallery), one JSON line each. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

from _common import Data, Recipe, main

from gsra_salad.data import (
    PairedAugmentation,
    PairedBatchAugmentation,
    PreloadedImages,
    PreloadedPairs,
    University1652,
    eval_transform,
    synthetic,
    train_transform,
)
from gsra_salad.training import RetrievalTask


def write_demo(root, locations, seed, args):
    return synthetic.write_university1652(
        root,
        num_train=2 * locations,
        num_test=locations,
        num_distractors=max(1, locations // 5),
        drones_per_building=4,
        seed=seed,
    )


def load(args, root, query_size, reference_size, train):
    threads = min(8, os.cpu_count() or 1)

    def split(view, size):
        if args.demo:  # small images: decoded and resized once, held in memory
            return PreloadedImages(University1652(root, "test", view=view), size, workers=threads)
        return University1652(root, "test", view=view, transform=eval_transform(size))

    tasks = [
        RetrievalTask(
            "drone->satellite",
            split("query_drone", query_size),
            split("gallery_satellite", reference_size),
            query_view="query",
            reference_view="reference",
            protocol="university1652",
        ),
        RetrievalTask(
            "satellite->drone",
            split("query_satellite", reference_size),
            split("gallery_drone", query_size),
            query_view="reference",
            reference_view="query",
            protocol="university1652",
        ),
    ]
    if not train:
        return Data(None, None, tasks, "test")
    if args.demo:
        pairs = PreloadedPairs(
            University1652(root, "train", query_view="drone"),
            query_size,
            reference_size,
            workers=threads,
        )
        augmentation = PairedBatchAugmentation(
            "drone", brightness=0.2, contrast=0.2, saturation=0.2, channel_gain=0.1
        )
        return Data(pairs, None, tasks, "test", augmentation)
    pairs = University1652(
        root,
        "train",
        query_view="drone",
        query_transform=train_transform("drone", query_size),
        reference_transform=train_transform("satellite", reference_size),
        pair_transform=PairedAugmentation("drone", flip_p=0.5, rotate=False),
    )
    return Data(pairs, None, tasks, "test")


RECIPE = Recipe(
    name="university1652",
    title="University-1652",
    source="LRFR's recipe",
    published={
        "epochs": 40,
        "batch_size": 32,
        "lr": 1e-4,
        "schedule": "linear",
        "warmup_epochs": 0.0,
        "eval_every": 10,
        "mining": "none",
        "loss": "triplet",
        "query_size": (384, 384),
        "reference_size": (384, 384),
        "demo_locations": None,
    },
    demo={
        "epochs": 16,
        "batch_size": 64,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_epochs": 0.8,
        "eval_every": 16,
        "mining": "none",
        "loss": "infonce",
        "query_size": (128, 128),
        "reference_size": (128, 128),
        "demo_locations": 100,
    },
    write_demo=write_demo,
    load=load,
    protocol="university1652",
)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
