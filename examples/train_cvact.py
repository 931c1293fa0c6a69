"""Train a cross-view geo-localizer on CVACT (ground panorama -> satellite tile), or its demo.

    python examples/train_cvact.py --demo                          # synthetic CVACT, CPU
    python examples/train_cvact.py --data-root /data/CVACT         # evaluates val
    python examples/train_cvact.py --data-root /data/CVACT --split test

Defaults with --data-root: LRFR's model and loss (soft-margin triplet, semi-hard) with
Sample4Geo's recipe and sizes (LRFR's public code covers only University-1652): panorama
140 x 768, satellite 384 x 384, batch 128, AdamW lr 1e-3, cosine with 1 warmup epoch, 40 epochs,
clipping by value 100, mixed precision, evaluation every 4 epochs; batches of GPS neighbours
until the first evaluation, then of embedding neighbours. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

from _common import SAMPLE4GEO_PUBLISHED, SAMPLE4GEO_SOURCE, Data, Recipe, demo_augmentation, main

from gsra_salad.data import (
    CVACT,
    InputConfig,
    PairedAugmentation,
    PreloadedPairs,
    eval_transform,
    synthetic,
    train_transform,
)
from gsra_salad.training import PairView, RetrievalTask


def arguments(parser):
    parser.add_argument(
        "--split", choices=("val", "test"), default="val", help="evaluation split (default: val)"
    )


def write_demo(root, locations, seed, args):
    return synthetic.write_cvact(
        root,
        num_train=2 * locations,
        num_val=locations,
        num_test=locations if args.split == "test" else 0,
        seed=seed,
    )


def load(args, root, query_size, reference_size, train):
    if args.demo:  # small images: decode and resize once, augment whole batches in memory
        return _load_in_memory(args, root, query_size, reference_size, train)
    evaluation = CVACT(
        root,
        args.split,
        query_transform=eval_transform(query_size),
        reference_transform=eval_transform(reference_size),
    )
    tasks = [RetrievalTask(args.split, PairView(evaluation, 0), PairView(evaluation, 1))]
    if not train:
        return Data(None, None, tasks, args.split)
    # pixels (uint8): fit() normalises the batches with the model's mean / std
    pairs = CVACT(
        root,
        "train",
        query_transform=train_transform("ground", query_size, normalize=False),
        reference_transform=train_transform("satellite", reference_size, normalize=False),
        pair_transform=PairedAugmentation("panorama"),
    )
    plain = CVACT(root, "train", reference_transform=eval_transform(reference_size))
    return Data(pairs, PairView(plain, 1), tasks, args.split)


def demo_input(query_size, reference_size):
    """The demo's preprocessing: panoramas resized; satellite tiles turned into panoramas by
    the polar transform (as SAFA does), so both views are panoramas of one size (one GSRA
    serves both). The demo model records it."""
    return {
        "query": InputConfig(query_size),
        "reference": InputConfig(reference_size, view_transform="polar"),
    }


def _load_in_memory(args, root, query_size, reference_size, train):
    """The demo's data: decoded once into memory and brought to :func:`demo_input`'s sizes;
    whole batches flipped, rolled and colour-changed together."""
    threads = min(8, os.cpu_count() or 1)
    inputs = demo_input(query_size, reference_size)

    def load_split(split):
        return PreloadedPairs(
            CVACT(root, split),
            query_input=inputs["query"],
            reference_input=inputs["reference"],
            workers=threads,
        )

    evaluation = load_split(args.split)
    tasks = [RetrievalTask(args.split, evaluation.query_set(), evaluation.reference_set())]
    if not train:
        return Data(None, None, tasks, args.split, input_config=inputs)
    pairs = load_split("train")
    augmentation = demo_augmentation(args.seed)
    return Data(pairs, pairs.reference_set(), tasks, args.split, augmentation, inputs)


RECIPE = Recipe(
    name="cvact",
    title="CVACT",
    source=SAMPLE4GEO_SOURCE,
    published={**SAMPLE4GEO_PUBLISHED, "mining": "gps+embedding"},
    demo={
        "epochs": 12,
        "batch_size": 64,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_epochs": 0.6,
        "eval_every": 12,
        "mining": "gps",
        "loss": "infonce",
        "query_size": (32, 128),
        "reference_size": (32, 128),
        "demo_locations": 300,
    },
    write_demo=write_demo,
    load=load,
    extra_arguments=arguments,
)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
