"""Train a cross-view geo-localizer on University-1652 (drone <-> satellite), or its demo.

    python examples/train_university.py --demo                  # synthetic, CPU, ~1.5 min
    python examples/train_university.py --data-root /data/University-1652

Defaults with --data-root: LRFR's recipe (its public train_university.py): lrfr() at
384 x 384 for both views, soft-margin triplet loss with semi-hard negatives (alpha 10), batch 32
pairs of distinct buildings, AdamW lr 1e-4, linear decay over int(1.05 T) steps without warmup
(ends at ~4.8% of the peak), 40 epochs, clipping by value 100, mixed precision (loss scale from
2**10), satellite and drone flipped together with p = 0.5 and the satellite turned by a random
quarter, the published per-image augmentations, seed 1. Reports drone -> satellite and
satellite -> drone, one JSON line each, scored both ways: the official protocol (distractor
buildings stay in the gallery) and, under "papers", the way LRFR's and Sample4Geo's code scores
(distractors dropped, R@1% = CMC[round(G/100)]), which is how the published tables were scored.
See docs/training.md.

--demo: both views polar-transformed once at loading to 32 x 128 (drone views whole, satellite
tiles centre-cropped to 0.7 of their side first), the small demo model, InfoNCE, batch 64,
lr 2e-3 with 5 % warmup and cosine decay, 16 epochs; 800 training buildings x 4 drone views,
evaluation on 200 buildings + 40 distractors (--demo-locations 200).

A thin script: the recipe lives in the library (``gsra_salad.recipes.get("university1652")``) and
the command line too; ``python -m gsra_salad train university1652 ...`` is the same command.
"""

import sys
from pathlib import Path

from gsra_salad.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("university1652", prog=Path(__file__).name))
