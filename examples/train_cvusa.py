"""Train a cross-view geo-localizer on CVUSA (ground panorama -> satellite tile), or its demo.

    python examples/train_cvusa.py --demo                      # synthetic CVUSA, CPU, ~1.5 min
    python examples/train_cvusa.py --data-root /data/CVUSA     # the paper's model, one GPU
    torchrun --nproc_per_node 4 examples/train_cvusa.py --data-root /data/CVUSA

Defaults with --data-root: LRFR's model (ConvNeXt-T, GSRA per view, SALAD) and loss (soft-margin
triplet, semi-hard), trained with Sample4Geo's recipe and sizes (LRFR's public code covers only
University-1652): panorama 140 x 768, satellite 384 x 384, batch 128, AdamW lr 1e-3, cosine with
1 warmup epoch, 40 epochs, clipping by value 100, mixed precision, evaluation every 4 epochs,
hard negatives from embedding neighbours after each evaluation. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

from _common import SAMPLE4GEO_PUBLISHED, SAMPLE4GEO_SOURCE, Data, Recipe, demo_augmentation, main

from gsra_salad.data import (
    CVUSA,
    InputConfig,
    PairedAugmentation,
    PreloadedPairs,
    eval_transform,
    synthetic,
    train_transform,
)
from gsra_salad.training import PairView, RetrievalTask


def write_demo(root, locations, seed, args):
    return synthetic.write_cvusa(root, num_train=2 * locations, num_val=locations, seed=seed)


def load(args, root, query_size, reference_size, train):
    if args.demo:  # small images: decode and resize once, augment whole batches in memory
        return _load_in_memory(args, root, query_size, reference_size, train)
    evaluation = CVUSA(
        root,
        "val",
        query_transform=eval_transform(query_size),
        reference_transform=eval_transform(reference_size),
    )
    tasks = [RetrievalTask("val", PairView(evaluation, 0), PairView(evaluation, 1))]
    if not train:
        return Data(None, None, tasks, "val")
    # pixels (uint8): fit() normalises the batches with the model's mean / std
    pairs = CVUSA(
        root,
        "train",
        query_transform=train_transform("ground", query_size, normalize=False),
        reference_transform=train_transform("satellite", reference_size, normalize=False),
        pair_transform=PairedAugmentation("panorama"),
    )
    plain = CVUSA(root, "train", reference_transform=eval_transform(reference_size))
    return Data(pairs, PairView(plain, 1), tasks, "val")


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
            CVUSA(root, split),
            query_input=inputs["query"],
            reference_input=inputs["reference"],
            workers=threads,
        )

    evaluation = load_split("val")
    tasks = [RetrievalTask("val", evaluation.query_set(), evaluation.reference_set())]
    if not train:
        return Data(None, None, tasks, "val", input_config=inputs)
    pairs = load_split("train")
    augmentation = demo_augmentation(args.seed)
    return Data(pairs, pairs.reference_set(), tasks, "val", augmentation, inputs)


RECIPE = Recipe(
    name="cvusa",
    title="CVUSA",
    source=SAMPLE4GEO_SOURCE,
    published={**SAMPLE4GEO_PUBLISHED, "mining": "embedding"},
    demo={
        "epochs": 6,
        "batch_size": 64,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_epochs": 0.3,
        "eval_every": 6,
        "mining": "none",
        "loss": "infonce",
        "query_size": (32, 128),
        "reference_size": (32, 128),
        "demo_locations": 500,
    },
    write_demo=write_demo,
    load=load,
)

if __name__ == "__main__":
    sys.exit(main(RECIPE))
