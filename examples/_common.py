"""What the three example scripts share: the command line, the model, the run and its JSON line.

Each script (train_cvusa.py, train_cvact.py, train_university.py) describes its dataset in a
:class:`Recipe` (published defaults, demo defaults, how to read the data) and calls :func:`main`.
Everything else lives in the library (:mod:`gsra_salad.training`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention, InputConfig
from gsra_salad.data import PairedBatchAugmentation, synthetic
from gsra_salad.evaluation import evaluate_retrieval
from gsra_salad.losses import InfoNCELoss, SoftMarginTripletLoss
from gsra_salad.models import TinyCNN
from gsra_salad.training import (
    RetrievalTask,
    TrainConfig,
    TrainData,
    barrier,
    cleanup_distributed,
    evaluate,
    fit,
    init_distributed,
    seed_everything,
)

Size = tuple[int, int]


# CVUSA and CVACT: Sample4Geo's published recipe and sizes (LRFR's code covers only
# University-1652), with LRFR's model and loss; each script adds its hard-negative mining.
SAMPLE4GEO_SOURCE = "Sample4Geo's recipe with LRFR's model and loss"
SAMPLE4GEO_PUBLISHED = {
    "epochs": 40,
    "batch_size": 128,
    "lr": 1e-3,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "eval_every": 4,
    "loss": "triplet",
    "query_size": (140, 768),
    "reference_size": (384, 384),
    "demo_locations": None,
}


@dataclass
class Data:
    """What a recipe's ``load`` returns: the training pairs (``None`` for --eval-only), the
    images to embed for hard-negative mining, the evaluation tasks, the split's name, the
    augmentation applied to whole training batches (if any) and the InputConfig per view the
    data was built from (the model records it)."""

    train: Any
    mining: Any
    tasks: list[RetrievalTask]
    split: str
    augmentation: Any = None
    input_config: dict[str, InputConfig] | None = None  # what the data was built from (--demo)


@dataclass
class Recipe:
    """One dataset's defaults and readers.

    ``published`` holds the defaults for ``--data-root`` (the published recipe, named in
    ``source``), ``demo`` those for ``--demo``; both are dicts of command-line option names
    (``epochs``, ``batch_size``, ``lr``, ``schedule``, ``warmup_epochs``, ``eval_every``,
    ``mining``, ``loss``, ``query_size``, ``reference_size``, ``demo_locations``).
    ``write_demo(root, locations, seed, args)`` writes the synthetic layout; ``load(args, root,
    query_size, reference_size, train)`` reads it (or the real one).
    """

    name: str
    title: str
    source: str
    published: dict[str, Any]
    demo: dict[str, Any]
    write_demo: Callable[..., Path]
    load: Callable[..., Data]
    protocol: str = "cvusa"
    extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    notes: list[str] = field(default_factory=list)


class UsageError(Exception):
    """A problem with the command line or the files: reported in one line, no traceback."""


def parser(recipe: Recipe) -> argparse.ArgumentParser:
    pub, demo = recipe.published, recipe.demo

    def default(key: str) -> str:
        return f"default: {pub[key]} ({recipe.source}); --demo: {demo[key]}"

    p = argparse.ArgumentParser(
        description=f"Train (or evaluate) a cross-view geo-localizer on {recipe.title}. "
        f"Defaults follow {recipe.source}. Ends by printing one JSON line with the final "
        "recall" + (" per direction." if recipe.protocol == "university1652" else "."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", type=Path, help=f"the {recipe.title} directory")
    source.add_argument(
        "--demo",
        action="store_true",
        help="write a synthetic dataset in the same layout to a temporary folder and train a "
        "small model on it (CPU, minutes)",
    )
    p.add_argument("--output-dir", type=Path, help=f"default: runs/{recipe.name}[-demo]")
    p.add_argument("--epochs", type=int, help=default("epochs"))
    p.add_argument(
        "--batch-size", type=int, help=default("batch_size") + "; pairs per step over all processes"
    )
    p.add_argument("--lr", type=float, help=default("lr"))
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), help=default("schedule"))
    p.add_argument("--warmup-epochs", type=float, help=default("warmup_epochs"))
    p.add_argument("--eval-every", type=int, help=default("eval_every"))
    p.add_argument(
        "--mining",
        choices=("none", "gps", "embedding", "gps+embedding"),
        help=default("mining") + "; hard negatives from GPS or embedding neighbours",
    )
    p.add_argument("--loss", choices=("triplet", "infonce"), help=default("loss"))
    p.add_argument("--seed", type=int, default=1, help="default: 1")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: 4; --demo: 0)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "amp", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto (default): mixed precision as published (float16 autocast + GradScaler) on "
        "CUDA, float32 on CPU; amp: float16 + GradScaler on CUDA, bfloat16 on CPU",
    )
    p.add_argument("--clip-value", type=float, default=100.0, help="default: 100 (both recipes)")
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations (less memory)"
    )
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/last")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a save_pretrained directory or a published LRFR checkpoint file (--eval-only)",
    )
    p.add_argument(
        "--backbone-weights",
        type=Path,
        help="ImageNet ConvNeXt-T weights file (default: torchvision's cache or download)",
    )
    p.add_argument(
        "--demo-locations",
        type=int,
        help=f"--demo: evaluation locations (default: {demo['demo_locations']}; training "
        "locations scale with it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if recipe.extra_arguments is not None:
        recipe.extra_arguments(p)
    return p


def _resolve(args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    defaults = recipe.demo if args.demo else recipe.published
    values = dict(defaults)
    for key in defaults:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    if args.workers is None:
        args.workers = 0 if args.demo else 4
    return values


def demo_augmentation(seed: int) -> PairedBatchAugmentation:
    """The --demo batch augmentation: both views are panoramas (the tiles polar-transformed at
    loading), flipped and rolled together, each with its own colour change; seeded."""
    return PairedBatchAugmentation(
        "polar",
        flip_p=0.5,
        rotate=True,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        channel_gain=0.1,
        generator=torch.Generator().manual_seed(seed),
    )


def demo_model(
    query_size: Size,
    reference_size: Size,
    channels: int = 64,
    *,
    input_config: dict[str, InputConfig] | None = None,
) -> CrossViewGeoLocalizer:
    """The --demo model: a small shared trunk, one GSRA per view, a shared SALAD; it records
    ``input_config`` (the recipe's preprocessing per view), so its checkpoints know it."""
    stride = TinyCNN.stride
    q_map = (query_size[0] // stride, query_size[1] // stride)
    r_map = (reference_size[0] // stride, reference_size[1] // stride)
    clusters = min(16, q_map[0] * q_map[1], r_map[0] * r_map[1])
    reference_attention = (
        None if r_map == q_map else GlobalSpatialRelationAttention(channels, r_map, groups=8)
    )
    return CrossViewGeoLocalizer(
        TinyCNN(channels, width=16),
        GlobalSpatialRelationAttention(channels, q_map, groups=8),
        SALAD(channels, num_clusters=clusters, cluster_dim=16, token_dim=0, dropout=0.0),
        reference_attention=reference_attention,
        input_config=input_config,
    )


def paper_model(args, query_size: Size, reference_size: Size) -> CrossViewGeoLocalizer:
    """LRFR's model (ConvNeXt-T trunk, GSRA per view size, SALAD), ImageNet-initialised."""
    weights: Any = args.backbone_weights if args.backbone_weights is not None else True
    if args.backbone_weights is not None and not args.backbone_weights.is_file():
        raise UsageError(f"--backbone-weights {args.backbone_weights}: no such file")
    kwargs = {} if query_size == reference_size else {"query_img_size": query_size}
    try:
        return CrossViewGeoLocalizer.lrfr(
            img_size=reference_size, pretrained_backbone=weights, **kwargs
        )
    except RuntimeError as err:  # ImageNet weights neither cached nor downloadable
        raise UsageError(f"{err} (or pass --backbone-weights PATH)") from err


def load_checkpoint(path: Path, query_size: Size, reference_size: Size) -> CrossViewGeoLocalizer:
    if path.is_dir():
        return CrossViewGeoLocalizer.from_pretrained(path)
    if path.is_file():
        kwargs = {} if query_size == reference_size else {"query_img_size": query_size}
        return CrossViewGeoLocalizer.from_lrfr_checkpoint(path, img_size=reference_size, **kwargs)
    raise UsageError(f"--checkpoint {path}: no such file or directory")


def build_loss(name: str, gather: bool) -> torch.nn.Module:
    if name == "infonce":
        return InfoNCELoss(temperature=0.07, learnable=True, label_smoothing=0.1, gather=gather)
    return SoftMarginTripletLoss(alpha=10.0, negatives="semi-hard", gather=gather)


def histogram_baseline(task: RetrievalTask, protocol: str) -> float:
    """R@1 of colour histograms on the raw images of a task (what appearance alone gives)."""

    def descriptors(dataset):
        if isinstance(getattr(dataset, "images", None), torch.Tensor):  # in memory, uint8
            raw, labels = dataset.images, torch.as_tensor(dataset.labels)
        else:
            items = [dataset[i] for i in range(len(dataset))]
            raw = torch.stack([_raw(image) for image, _ in items])
            labels = torch.tensor([label for _, label in items])
        return synthetic.colour_histogram_descriptors(raw).float(), labels

    q, ql = descriptors(task.queries)
    r, rl = descriptors(task.references)
    return float(evaluate_retrieval(q, r, ql, rl, protocol=protocol)["R@1"])


def _raw(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of an evaluation image into [0, 1]."""
    from gsra_salad.data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() * std + mean).clamp(0, 1)


def _demo_root(recipe: Recipe, locations: int, args, context, stack) -> Path:
    """Rank 0 writes the synthetic dataset; the other ranks get its path."""
    path = [None]
    if context.is_main:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gsra_salad_demo_")))
        recipe.write_demo(root, locations, args.seed, args)
        path = [str(root)]
    if context.distributed:
        torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0])


def run(args: argparse.Namespace, recipe: Recipe) -> list[dict[str, Any]]:
    """One run: data, model, training (or evaluation only), the final JSON line(s)."""
    values = _resolve(args, recipe)
    context = init_distributed(args.device)
    log = print if context.is_main else (lambda *a, **k: None)
    if context.is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output_dir or Path("runs") / (recipe.name + ("-demo" if args.demo else ""))
    query_size, reference_size = tuple(values["query_size"]), tuple(values["reference_size"])
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if args.demo:
                locations = args.demo_locations or values["demo_locations"]
                root = _demo_root(recipe, locations, args, context, stack)
                log(
                    f"wrote a synthetic {recipe.title} ({locations} evaluation locations) in "
                    f"{time.perf_counter() - start:.1f} s"
                )
            else:
                root = args.data_root
                if not root.is_dir():
                    raise UsageError(f"--data-root {root}: no such directory")
            data = recipe.load(args, root, query_size, reference_size, not args.eval_only)
            seed_everything(args.seed)
            if args.eval_only:
                if args.checkpoint is None:
                    raise UsageError("--eval-only needs --checkpoint PATH")
                model = load_checkpoint(args.checkpoint, query_size, reference_size)
            elif args.demo:
                model = demo_model(query_size, reference_size, input_config=data.input_config)
            else:
                model = paper_model(args, query_size, reference_size)
            seed_everything(args.seed + context.rank)
            config = TrainConfig(
                epochs=values["epochs"],
                batch_size=values["batch_size"],
                lr=values["lr"],
                schedule=values["schedule"],
                warmup_epochs=values["warmup_epochs"],
                clip_value=args.clip_value if args.clip_value > 0 else None,
                precision=args.precision,
                grad_checkpointing=args.grad_checkpointing,
                eval_every=values["eval_every"],
                mining=values["mining"],
                seed=args.seed,
                workers=args.workers,
                output_dir=str(output),
                progress=not args.no_progress,
            )
            if args.eval_only:
                model.to(context.device)
                metrics = evaluate(model, data.tasks, config, context)
            else:
                loss = build_loss(values["loss"], gather=context.distributed)
                log(
                    f"training on {len(data.train)} pairs, {context.world_size} process(es) on "
                    f"{context.device}; checkpoints in {output}"
                )
                result = fit(
                    model, loss, TrainData(data.train, data.augmentation, data.mining),
                    data.tasks, config, context=context, resume=args.resume,
                )  # fmt: skip
                metrics = result.metrics
            baseline = {}
            if args.demo and context.is_main:
                baseline = {t.name: histogram_baseline(t, t.protocol) for t in data.tasks}
            barrier()  # nobody reads the demo folder any more: rank 0 may delete it
    finally:
        cleanup_distributed()
    lines = []
    for task in data.tasks:
        m = metrics[task.name]
        line: dict[str, Any] = {"dataset": recipe.name, "split": data.split}
        if recipe.protocol == "university1652":
            line["direction"] = task.name
        line.update(
            {"queries": m["queries"], "references": m["references"],
             "world_size": context.world_size}
        )  # fmt: skip
        line.update({k: round(m[k], 2) for k in ("R@1", "R@5", "R@10", "R@1%", "AP") if k in m})
        if task.name in baseline:
            log(
                f"{task.name}: R@1 {m['R@1']:.2f}% (colour-histogram baseline: "
                f"{baseline[task.name]:.2f}%)"
            )
            line["baseline_R@1"] = round(baseline[task.name], 2)
        lines.append(line)
    log(f"done in {time.perf_counter() - start:.1f} s")
    if context.is_main:
        for line in lines:
            print(json.dumps(line), flush=True)
    return lines


def main(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Parses the command line and runs; problems with files or options are one-line errors."""
    p = parser(recipe)
    args = p.parse_args(argv)
    if args.resume and args.eval_only:
        p.error("--resume and --eval-only exclude each other")
    try:
        run(args, recipe)
    except (UsageError, FileNotFoundError, NotADirectoryError, ValueError, KeyError,
            ImportError) as err:  # fmt: skip
        if os.environ.get("GSRA_SALAD_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{p.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
