"""Train the demo model for a synthetic region, to index its tiles and locate its panoramas.

    python examples/train_region.py                  # writes region/, trains -> runs/region/best
    python -m gsra_salad index --checkpoint runs/region/best --tiles region/tiles.csv \\
        --out region-index
    python -m gsra_salad locate --index region-index region/queries/*.jpg \\
        --truth region/queries.csv > located.jsonl

The demo checkpoint of ``train_cvusa.py --demo`` does not transfer to a region (its synthetic
CVUSA draws every location from a map of its own, at another scale; docs/localization.md has
the numbers), so this script writes a region (``gsra_salad.data.synthetic.write_region``: one
aerial map of 432 x 432 m, its tiles 64 m wide on a 24 x 24 grid 16 m apart, 100 held-out
query panoramas at random points) together with a training split of the same map in CVUSA's
layout (2,000 panoramas at other random points, each paired with a tile up to 8 m off, as far
as a photo lies from its nearest grid tile), and trains the CVUSA demo recipe on it for 12
epochs: ``gsra-salad train cvusa --demo --data-root region --epochs 12``. Every other option is
that command's (``--epochs``, ``--overwrite``, ``--resume``, ...).

Options of this script: ``--region DIR`` (default ``region``; written when it does not exist),
``--num-train N`` (training pairs, default 2000). The run goes to ``--output-dir`` (default
``runs/region``).
"""

import argparse
import sys
from pathlib import Path

from gsra_salad.cli import train_main
from gsra_salad.data import synthetic

REGION = {"grid": (24, 24), "stride": 16, "num_queries": 100, "num_val": 200, "seed": 0}
EPOCHS = "12"  # the demo recipe's 6 leave the median error near a random tile's

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--region", type=Path, default=Path("region"))
    parser.add_argument("--num-train", type=int, default=2000)
    ours, rest = parser.parse_known_args()
    if not (ours.region / "region.json").is_file():
        if ours.region.exists() and any(ours.region.iterdir()):
            sys.exit(f"{Path(__file__).name}: error: {ours.region} exists and holds no region")
        synthetic.write_region(ours.region, num_train=ours.num_train, **REGION)
        print(f"wrote the region and its training split to {ours.region}", flush=True)
    elif not (ours.region / "splits" / "train-19zl.csv").is_file():
        sys.exit(
            f"{Path(__file__).name}: error: {ours.region} holds a region without a training "
            "split (write_region(..., num_train=N, num_val=M)); pass another --region"
        )
    if "--output-dir" not in rest:
        rest += ["--output-dir", "runs/region"]
    if "--epochs" not in rest:
        rest += ["--epochs", EPOCHS]
    argv = ["--demo", "--data-root", str(ours.region), *rest]
    sys.exit(train_main("cvusa", argv, prog=Path(__file__).name))
