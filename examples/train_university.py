"""Train a cross-view geo-localizer on University-1652 (drone <-> satellite), or its demo.

    python examples/train_university.py --demo                  # synthetic, CPU, ~1.5 min
    python examples/train_university.py --data-root /data/University-1652

Defaults with --data-root: LRFR's recipe (its public train_university.py): lrfr() at
384 x 384 for both views, soft-margin triplet loss with semi-hard negatives (alpha 10), batch 32
pairs of distinct buildings, AdamW lr 1e-4, linear decay to 0 without warmup, 40 epochs,
clipping by value 100, mixed precision, satellite and drone flipped together with p = 0.5,
seed 1. Reports drone -> satellite and satellite -> drone (official protocol: distractor
buildings stay in the gallery), one JSON line each. See docs/training.md.

--demo: both views polar-transformed once at loading to 32 x 128 (drone views whole, satellite
tiles centre-cropped to 0.7 of their side first), the small demo model, InfoNCE, batch 64,
lr 2e-3 with 5 % warmup and cosine decay, 16 epochs; 800 training buildings x 4 drone views,
evaluation on 200 buildings + 40 distractors (--demo-locations 200).
"""

from __future__ import annotations

import os
import sys

from _common import Data, Recipe, demo_augmentation, main

from gsra_salad.data import (
    InputConfig,
    PairedAugmentation,
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
        num_train=4 * locations,
        num_test=locations,
        num_distractors=max(1, locations // 5),
        drones_per_building=4,
        seed=seed,
    )


def load(args, root, query_size, reference_size, train):
    if args.demo:  # small images: decode and polar-transform once, augment whole batches
        return _load_in_memory(args, root, query_size, reference_size, train)
    tasks = _tasks(lambda view, size: University1652(
        root, "test", view=view, transform=eval_transform(size)
    ), query_size, reference_size)  # fmt: skip
    if not train:
        return Data(None, None, tasks, "test")
    # pixels (uint8): fit() normalises the batches with the model's mean / std
    pairs = University1652(
        root,
        "train",
        query_view="drone",
        query_transform=train_transform("drone", query_size, normalize=False),
        reference_transform=train_transform("satellite", reference_size, normalize=False),
        pair_transform=PairedAugmentation("drone", flip_p=0.5, rotate=False),
    )
    return Data(pairs, None, tasks, "test")


def _tasks(split, query_size, reference_size):
    """Both directions; ``split(view, size)`` reads one test view of University-1652."""
    return [
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


def demo_input(query_size, reference_size):
    """The demo's preprocessing: both views polar-transformed about the image centre, drone
    views whole, satellite tiles after a centre crop to 0.7 of their side (what a drone view
    covers, 55-85 % of the tile in the synthetic data), so both views are panoramas of one size
    (one GSRA serves both) and a drone's turn is a horizontal roll. The demo model records it."""
    return {
        "query": InputConfig(query_size, view_transform="polar"),
        "reference": InputConfig(reference_size, view_transform="polar", polar_crop=0.7),
    }


def _load_in_memory(args, root, query_size, reference_size, train):
    """The demo's data: decoded once into memory and brought to :func:`demo_input`'s
    panoramas; whole batches flipped, rolled and colour-changed together."""
    threads = min(8, os.cpu_count() or 1)
    inputs = demo_input(query_size, reference_size)

    def split(view, size):
        config = inputs["query" if view.endswith("drone") else "reference"]
        return PreloadedImages(
            University1652(root, "test", view=view), input_config=config, workers=threads
        )

    tasks = _tasks(split, query_size, reference_size)
    if not train:
        return Data(None, None, tasks, "test", input_config=inputs)
    pairs = PreloadedPairs(
        University1652(root, "train", query_view="drone"),
        query_input=inputs["query"],
        reference_input=inputs["reference"],
        workers=threads,
    )
    augmentation = demo_augmentation(args.seed)
    return Data(pairs, None, tasks, "test", augmentation, inputs)


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
        "query_size": (32, 128),
        "reference_size": (32, 128),
        "demo_locations": 200,
    },
    write_demo=write_demo,
    load=load,
    protocol="university1652",
)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
