"""Train a cross-view geo-localizer on CVACT (ground panorama -> satellite tile), or its demo.

    python examples/train_cvact.py --demo                          # synthetic CVACT, CPU
    python examples/train_cvact.py --data-root /data/CVACT         # evaluates val
    python examples/train_cvact.py --data-root /data/CVACT --split test

Defaults with --data-root: Sample4Geo's recipe (the one its published numbers came from) on
LRFR's model: symmetric InfoNCE (temperature 0.07, learnable, label smoothing 0.1), panorama
140 x 768, satellite 384 x 384, batch 128, AdamW lr 1e-3, cosine with 1 warmup epoch, 40 epochs,
clipping by value 100, mixed precision, evaluation every 4 epochs, the published per-image
augmentations, batches of GPS (UTM) neighbours from the first epoch and of ground->satellite
embedding neighbours after each evaluation (32 nearest + 32 of ranks 33-128). --recipe
lrfr-cvact swaps in LRFR's loss. See docs/training.md.

A thin script: the recipe lives in the library (``gsra_salad.recipes.get("cvact")``) and
the command line too; ``python -m gsra_salad train cvact ...`` is the same command.
"""

import sys
from pathlib import Path

from gsra_salad.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("cvact", prog=Path(__file__).name))
