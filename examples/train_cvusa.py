"""Train a cross-view geo-localizer on CVUSA (ground panorama -> satellite tile), or its demo.

    python examples/train_cvusa.py --demo                      # synthetic CVUSA, CPU, ~1.5 min
    python examples/train_cvusa.py --data-root /data/CVUSA     # the paper's model, one GPU
    torchrun --nproc_per_node 4 examples/train_cvusa.py --data-root /data/CVUSA

Defaults with --data-root: Sample4Geo's recipe (the one its published numbers came from) on
LRFR's model (ConvNeXt-T, GSRA per view, SALAD): symmetric InfoNCE (temperature 0.07, learnable,
label smoothing 0.1), panorama 140 x 768, satellite 384 x 384, batch 128, AdamW lr 1e-3, cosine
with 1 warmup epoch, 40 epochs, clipping by value 100, mixed precision, evaluation every 4
epochs, the published per-image augmentations, batches of GPS neighbours from the first epoch
(positions from split_locations/all.csv of the full CVUSA release) and of ground->satellite
embedding neighbours after each evaluation (32 nearest + 32 of ranks 33-128). --recipe
lrfr-cvusa swaps in LRFR's loss. See docs/training.md.

A thin script: the recipe lives in the library (``gsra_salad.recipes.get("cvusa")``) and
the command line too; ``python -m gsra_salad train cvusa ...`` is the same command.
"""

import sys
from pathlib import Path

from gsra_salad.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("cvusa", prog=Path(__file__).name))
