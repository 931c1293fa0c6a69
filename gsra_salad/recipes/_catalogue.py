"""The published and demo recipes of CVUSA, CVACT and University-1652 (DESIGN section 7)."""

from __future__ import annotations

import os

from .._input import InputConfig
from ..training import TrainConfig
from ._recipe import Augmentation, Recipe

__all__ = ["RECIPES"]

SAMPLE4GEO = "Sample4Geo's recipe (train_cvusa.py / train_cvact.py) on LRFR's model"
SAMPLE4GEO_TRIPLET = "Sample4Geo's recipe with LRFR's model and loss"
LRFR = "LRFR's recipe (its public train_university.py)"
DEMO = "the demo recipe (synthetic data, CPU)"

# DataLoader workers where one is used: what the machine has, at most 4
_WORKERS = min(4, os.cpu_count() or 1)

_SAMPLE4GEO_NOTES = (
    "panorama 140 x 768, satellite 384 x 384; pairs flipped (p 0.5) and turned by a random "
    "quarter (panorama rolled to match); the published per-image augmentations",
    "batches: GPS neighbours (top 128) from the first epoch, then ground->satellite "
    "embedding neighbours after each evaluation; an anchor's batch gets its 32 nearest and "
    "32 drawn from ranks 33-128",
)


def _sample4geo(name: str, dataset: str, loss: str = "infonce") -> Recipe:
    """Sample4Geo's CVUSA/CVACT recipe (DESIGN section 7) on LRFR's model; ``loss="triplet"``
    swaps in LRFR's loss."""
    return Recipe(
        name=name,
        dataset=dataset,  # type: ignore[arg-type]
        source=SAMPLE4GEO if loss == "infonce" else SAMPLE4GEO_TRIPLET,
        train=TrainConfig(
            epochs=40,
            batch_size=128,
            lr=1e-3,
            schedule="cosine",
            warmup_epochs=1.0,
            clip_value=100.0,
            eval_every=4,
            mining="gps+embedding",
            mining_neighbours=128,
            neighbours_per_anchor=64,
            mining_nearest=32,
            mining_from="query",
            workers=_WORKERS,
        ),
        model="lrfr",
        loss=loss,  # type: ignore[arg-type]
        query_input=InputConfig((140, 768)),
        reference_input=InputConfig((384, 384)),
        augmentation=Augmentation("panorama", flip_p=0.5, rotate=True),
        image_augmentation="published",
        notes=_SAMPLE4GEO_NOTES,
    )


def _lrfr_university(name: str) -> Recipe:
    """LRFR's ``train_university.py`` (DESIGN section 7)."""
    return Recipe(
        name=name,
        dataset="university1652",
        source=LRFR,
        train=TrainConfig(
            epochs=40,
            batch_size=32,
            lr=1e-4,
            schedule="linear",
            warmup_epochs=0.0,
            schedule_length=1.05,
            scaler_init_scale=2.0**10,
            clip_value=100.0,
            eval_every=10,
            mining="none",
            workers=_WORKERS,
        ),
        model="lrfr",
        loss="triplet",
        query_input=InputConfig((384, 384)),
        reference_input=InputConfig((384, 384)),
        split="test",
        augmentation=Augmentation("drone", flip_p=0.5, rotate=True),
        image_augmentation="published",
        notes=(
            "batches of distinct buildings; satellite and drone flipped together (p 0.5), the "
            "satellite also turned by a random quarter; the published per-image augmentations",
            "linear schedule sized for int(1.05 T) steps (ends at ~4.8% of the peak); float16 "
            "loss scale from 2**10",
            "scored both ways: the official protocol and the papers' (distractors dropped)",
        ),
    )


_DEMO_COLOUR = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "channel_gain": 0.1}


def _demo(name: str, dataset: str, locations: int, query: InputConfig, reference: InputConfig,
          **train) -> Recipe:  # fmt: skip
    return Recipe(
        name=name,
        dataset=dataset,  # type: ignore[arg-type]
        source=DEMO,
        train=TrainConfig(
            **{"batch_size": 64, "lr": 2e-3, "schedule": "cosine", "workers": 0, **train}
        ),
        model="demo",
        loss="infonce",
        query_input=query,
        reference_input=reference,
        split="test" if dataset == "university1652" else "val",
        augmentation=Augmentation("polar", flip_p=0.5, rotate=True, **_DEMO_COLOUR),
        in_memory=True,
        demo_locations=locations,
    )


_PANORAMA = InputConfig((32, 128))
_TILE_AS_PANORAMA = InputConfig((32, 128), view_transform="polar")

RECIPES: dict[str, Recipe] = {
    # the defaults are the recipes the published numbers came from (docs/training.md)
    "cvusa": _sample4geo("cvusa", "cvusa"),
    "cvact": _sample4geo("cvact", "cvact"),
    "university1652": _lrfr_university("university1652"),
    "sample4geo-cvusa": _sample4geo("sample4geo-cvusa", "cvusa"),
    "sample4geo-cvact": _sample4geo("sample4geo-cvact", "cvact"),
    "lrfr-university1652": _lrfr_university("lrfr-university1652"),
    # LRFR's loss in Sample4Geo's recipe (LRFR's public code covers University-1652 only)
    "lrfr-cvusa": _sample4geo("lrfr-cvusa", "cvusa", loss="triplet"),
    "lrfr-cvact": _sample4geo("lrfr-cvact", "cvact", loss="triplet"),
    # the demos: tiles polar-transformed into panoramas (SAFA-style), so both views are
    # panoramas of one size; whole batches flipped, rolled and colour-changed together
    "cvusa-demo": _demo(
        "cvusa-demo",
        "cvusa",
        500,
        _PANORAMA,
        _TILE_AS_PANORAMA,
        epochs=6,
        warmup_epochs=0.3,
        eval_every=6,
        mining="none",
    ),
    # the paper's pipeline on the demo data: raw 64 x 64 tiles against 32 x 128 panoramas,
    # one GSRA per view, a SmallConvNeXt trunk whose receptive field covers a whole tile
    # (docs/synthetic-benchmark.md); the tile turns by quarter turns, the panorama rolls to match
    "cvusa-raw-demo": _demo(
        "cvusa-raw-demo",
        "cvusa",
        500,
        _PANORAMA,
        InputConfig((64, 64)),
        epochs=32,
        warmup_epochs=1.6,
        eval_every=32,
        mining="none",
    ).replace(
        model="demo-convnext",
        augmentation=Augmentation("panorama", flip_p=0.5, rotate=True, **_DEMO_COLOUR),
    ),
    "cvact-demo": _demo(
        "cvact-demo",
        "cvact",
        300,
        _PANORAMA,
        _TILE_AS_PANORAMA,
        epochs=12,
        warmup_epochs=0.6,
        eval_every=12,
        mining="gps",
    ),
    # drone views polar-transformed whole, tiles after a centre crop to 0.7 of their side
    # (what a drone view covers), so a drone's turn is a horizontal roll
    "university1652-demo": _demo(
        "university1652-demo",
        "university1652",
        200,
        InputConfig((32, 128), view_transform="polar"),
        InputConfig((32, 128), view_transform="polar", polar_crop=0.7),
        epochs=16,
        warmup_epochs=0.8,
        eval_every=16,
        mining="none",
    ),
}
