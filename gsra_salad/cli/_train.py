"""``gsra-salad train DATASET``: a run of a recipe, its command line generated from the recipe.

Every training option is a field of :class:`~gsra_salad.training.TrainConfig` or of
:class:`~gsra_salad.recipes.Recipe`; ``--help`` shows the published and the demo value of each
with their source. The run folder gets ``recipe.json`` (the resolved recipe, like timm's
``args.yaml``); ``--resume`` compares it with the new command line before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import recipes
from ..training import FREE_ON_RESUME, TrainConfig
from ..training.loop import PAPERS_SUFFIX

__all__ = ["add_parser", "run", "train_main"]

DATASETS = {"cvusa": "CVUSA", "cvact": "CVACT", "university1652": "University-1652"}
RECIPE_FILE = "recipe.json"
DEMO_PREFIX = "gsra_salad_demo_"
OFFICIAL_SCORING = (
    "official University-1652 protocol: distractor buildings kept, R@1% = CMC[floor(G/100) - 1]"
)
PAPERS_SCORING = (
    "as LRFR's and Sample4Geo's code scores (the published tables): distractor buildings "
    "dropped, R@1% = CMC[round(G/100)]"
)

# TrainConfig fields that are not options of their own (--output-dir, --no-progress are)
_NOT_OPTIONS = {"output_dir", "progress"}
_HELP = {
    "epochs": "training epochs",
    "batch_size": "pairs per optimizer step over all processes",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule after the warmup",
    "warmup_epochs": "linear warmup length in epochs",
    "schedule_length": "the schedule's length as a multiple of the run's steps (1: decays to 0 "
    "at the last step; LRFR's 1.05 ends at ~4.8%% of the peak)",
    "scaler_init_scale": "initial scale of the float16 GradScaler",
    "clip_value": "clip each gradient element to [-v, v] ('none': no clipping)",
    "clip_norm": "clip the total gradient norm ('none': no clipping)",
    "precision": "auto: float16 + GradScaler on CUDA, float32 on CPU; amp: float16 on CUDA, "
    "bfloat16 on CPU",
    "grad_checkpointing": "recompute the backbone's activations in backward (less memory)",
    "eval_every": "evaluate every N epochs (and after the last)",
    "eval_batch_size": "images per batch when embedding for evaluation",
    "mining": "batches of hard negatives from GPS or embedding neighbours",
    "mining_neighbours": "neighbours kept per sample for mining",
    "neighbours_per_anchor": "neighbours of an anchor that join its batch (at most)",
    "mining_nearest": "none: an anchor's neighbours join in order; N: the N nearest plus "
    "(neighbours-per-anchor - N) drawn from the rest of the pool (Sample4Geo: 32 of 64)",
    "mining_from": "embedding neighbours of an anchor's reference, or of its query "
    "(Sample4Geo: ground->satellite)",
    "best_metric": "the metric that picks best/: R@1 (first task) or TASK/METRIC",
    "seed": "seeds the batches, the augmentation, dropout and the demo data",
    "workers": "DataLoader worker processes",
}


class UsageError(Exception):
    """A problem with the command line or the files: reported in one line, no traceback."""


# -- the command line --------------------------------------------------------------------------


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " x ".join(str(v) for v in value)
    return str(value)


def _add_recipe_options(parser: argparse.ArgumentParser, dataset: str) -> None:
    """One option per training field, each with its published and demo default."""
    published, demo = recipes.get(dataset), recipes.get(f"{dataset}-demo")
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group(
        "training options",
        f"defaults with --data-root: {published.source}; with --demo: {demo.source}",
    )

    def default(get) -> str:
        return (
            f"default: {_shown(get(published))} ({published.source}); --demo: {_shown(get(demo))}"
        )

    for f in dataclasses.fields(TrainConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        text = f"{_HELP[f.name]}; " + default(lambda r, n=f.name: getattr(r.train, n))
        args = typing.get_args(hint)
        given = {"default": argparse.SUPPRESS, "help": text}  # absent unless given
        if hint is bool:
            group.add_argument(flag, action="store_const", const=True, **given)
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=args, **given)
        elif type(None) in args:  # float | None: 'none' turns it off
            kind = next(a for a in args if a is not type(None))
            group.add_argument(flag, type=_none_or(kind), metavar=kind.__name__.upper(), **given)
        else:
            group.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **given)
    _add_recipe_fields(group, dataset, default, demo)


def _add_recipe_fields(group, dataset: str, default, demo: recipes.Recipe) -> None:
    """The options of the recipe's own fields (loss, augmentation, sizes, split, demo size)."""
    group.add_argument(
        "--loss",
        choices=("triplet", "infonce"),
        help="triplet: soft-margin, semi-hard, alpha 10 (LRFR); infonce: temperature 0.07, "
        "label smoothing 0.1 (Sample4Geo); " + default(lambda r: r.loss),
    )
    group.add_argument(
        "--image-augmentation",
        choices=("library", "published"),
        help="per-image training augmentations: this library's set, or LRFR's and Sample4Geo's "
        "(JPEG, colour jitter, blur or sharpen, grid or coarse dropout); "
        + default(lambda r: r.image_augmentation),
    )
    for view, what in (("query", "query view (ground panorama or drone)"),
                       ("reference", "reference view (satellite)")):  # fmt: skip
        group.add_argument(
            f"--{view}-size",
            type=int,
            nargs=2,
            metavar=("H", "W"),
            help=f"input size of the {what}; "
            + default(lambda r, v=view: getattr(r, f"{v}_input").image_size),
        )
    if dataset == "cvact":
        group.add_argument(
            "--split",
            choices=("val", "test"),
            help="evaluation split; " + default(lambda r: r.split),
        )
    group.add_argument(
        "--demo-locations",
        type=int,
        help=f"--demo: evaluation locations (default: {demo.demo_locations}; training "
        "locations scale with it)",
    )


def add_arguments(parser: argparse.ArgumentParser, dataset: str) -> None:
    """The options of ``train DATASET`` (also those of ``examples/train_<dataset>.py``)."""
    title = DATASETS[dataset]
    source = parser.add_argument_group("data (one of --data-root and --demo, or both)")
    source.add_argument("--data-root", type=Path, help=f"the {title} directory")
    source.add_argument(
        "--demo",
        action="store_true",
        help="write a synthetic dataset in the same layout to a temporary folder and train a "
        "small model on it (CPU, minutes); with --data-root: the demo recipe on that folder "
        "(e.g. a synthetic region's training split)",
    )
    if f"{dataset}-raw-demo" in recipes.names():
        parser.add_argument(
            "--raw",
            action="store_true",
            help=f"with --demo: the {dataset}-raw-demo recipe (the paper's pipeline: raw "
            "satellite tiles, one GSRA per view, a SmallConvNeXt trunk; CPU, a few minutes) "
            "instead of the tiles polar-transformed into panoramas; its own defaults "
            f"(gsra_salad.recipes.get('{dataset}-raw-demo'), e.g. 32 epochs)",
        )
    run = parser.add_argument_group("run options")
    run.add_argument(
        "--output-dir", type=Path, help=f"where last/, best/ and metrics.jsonl go "
        f"(default: runs/{dataset}, --demo: runs/{dataset}-demo)",
    )  # fmt: skip
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir exactly"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in --output-dir and start afresh (without it, a folder that holds "
        "a run is refused)",
    )
    run.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training")
    run.add_argument(
        "--checkpoint",
        type=Path,
        help="a save_pretrained directory or a published LRFR checkpoint file: evaluated with "
        "--eval-only, else the starting point of the training (fine-tuning); its recorded "
        "input sizes and view transforms are used",
    )
    run.add_argument(
        "--backbone-weights",
        type=Path,
        help="ImageNet ConvNeXt-T weights file (default: torchvision's cache or download)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    named = _named_recipes(dataset)
    run.add_argument(
        "--recipe",
        choices=named,
        metavar="NAME",
        help="the recipe whose values are the defaults (with --data-root): "
        + "; ".join(f"{name}: {recipes.get(name).source}" for name in named)
        + f" (default: {dataset}, the same as {_alias(dataset)})",
    )
    _add_recipe_options(parser, dataset)


def _named_recipes(dataset: str) -> list[str]:
    """The published recipes of ``dataset`` (not the demo), the default first."""
    others = [
        name
        for name in recipes.names()
        if name != dataset and recipes.get(name).dataset == dataset and not recipes.get(name).demo
    ]
    return [dataset, *others]


def _alias(dataset: str) -> str:
    """The named recipe that the dataset's default recipe equals."""
    default = recipes.get(dataset)
    for name in _named_recipes(dataset)[1:]:
        if dataclasses.replace(recipes.get(name), name=default.name) == default:
            return name
    return dataset


def add_parser(commands) -> None:
    """``train DATASET`` under the ``gsra-salad`` command line."""
    train = commands.add_parser(
        "train",
        help="train (or evaluate) on CVUSA, CVACT or University-1652",
        description="Train (or evaluate) a cross-view geo-localizer with a dataset's recipe.",
    )
    datasets = train.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for dataset, title in DATASETS.items():
        p = datasets.add_parser(
            dataset,
            help=f"{title} ({recipes.get(dataset).source})",
            description=_description(dataset),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p, dataset)
        p.set_defaults(run=run_command, parser=p)


def _description(dataset: str) -> str:
    recipe = recipes.get(dataset)
    text = (
        f"Train (or evaluate) a cross-view geo-localizer on {DATASETS[dataset]}. Defaults "
        f"follow {recipe.source}. Ends by printing one JSON line with the final recall"
        + (" per direction." if dataset == "university1652" else ".")
    )
    return "\n".join([text, *(f"  - {note}" for note in recipe.notes)])


def train_main(dataset: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """``train DATASET`` as a script of its own (what ``examples/train_<dataset>.py`` call).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_description(dataset),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, dataset)
    args = parser.parse_args(argv)
    args.dataset = dataset
    return run_command(args, parser)


# -- resolving the command line into a recipe --------------------------------------------------


def resolve_recipe(args: argparse.Namespace) -> recipes.Recipe:
    """The dataset's published (or demo) recipe with the options given on the command line."""
    name = getattr(args, "recipe", None)
    if name is not None and args.demo:
        raise UsageError(
            f"--recipe {name} reads a real dataset; --demo trains the demo recipe on synthetic "
            "data: drop one of them"
        )
    if getattr(args, "raw", False) and not args.demo:
        raise UsageError("--raw only applies to --demo")
    recipe = recipes.get(name or _recipe_name(args))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _NOT_OPTIONS and hasattr(args, f.name):  # given on the command line
            changes[f.name] = getattr(args, f.name)
    for name in ("loss", "split", "demo_locations", "image_augmentation"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    for view in ("query", "reference"):
        size = getattr(args, f"{view}_size", None)
        if size is not None:
            changes[f"{view}_size"] = tuple(size)
    changes["progress"] = not args.no_progress
    if not args.demo and args.data_root is None:
        raise UsageError("one of --data-root and --demo is required")
    if args.demo_locations is not None and (not args.demo or args.data_root is not None):
        raise UsageError("--demo-locations only applies to --demo without --data-root")
    try:
        return recipe.replace(**changes)
    except ValueError as err:
        raise UsageError(_flag_names(str(err))) from err


def _recipe_name(args: argparse.Namespace) -> str:
    if not args.demo:
        return args.dataset
    return args.dataset + ("-raw-demo" if getattr(args, "raw", False) else "-demo")


def _flag_names(message: str) -> str:
    """'clip_value must be > 0' -> '--clip-value must be > 0' (field names as the user typed)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)] + ["demo_locations", "split"]
    for name in names:
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message


def _recipe_changes(saved: dict[str, Any], recipe: recipes.Recipe) -> list[str]:
    """What differs between a run's saved recipe and the new one, ignoring what may change."""
    new = recipe.as_dict()
    free = FREE_ON_RESUME | {"epochs"}
    # a field added since the run was saved counts with its default (what the run used)
    defaults = _defaults(recipes.Recipe)
    train_defaults = _defaults(TrainConfig)
    changes = []
    for key in sorted(set(saved) | set(new)):
        if key == "train":
            old_train, new_train = saved.get(key, {}), new[key]
            for name in sorted(set(old_train) | set(new_train)):
                old = old_train.get(name, train_defaults.get(name))
                if name in free or old == new_train.get(name):
                    continue
                changes.append(
                    f"--{name.replace('_', '-')} was {old!r}, now {new_train.get(name)!r}"
                )
            continue
        old = saved.get(key, defaults.get(key))
        if old != new.get(key) and key not in ("name", "source"):
            changes.append(f"{key} was {old!r}, now {new.get(key)!r}")
    return changes


def _defaults(cls) -> dict[str, Any]:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _check_output(output: Path, args: argparse.Namespace, recipe: recipes.Recipe) -> None:
    """Refuse early (before any data is read) what fit would refuse later."""
    from ..training.checkpoint import holds_run

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.resume and args.checkpoint is not None:
        raise UsageError(
            "--resume continues the run in --output-dir; --checkpoint starts a new one from a "
            "checkpoint: pick one"
        )
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output-dir {output} exists and is not a directory")
    found = holds_run(output) if output.is_dir() else []
    if found and not args.resume and not args.overwrite:
        raise UsageError(
            f"--output-dir {output} already holds a run ({', '.join(found)}); add --resume to "
            "continue it, --overwrite to replace it, or pick another --output-dir"
        )
    if args.resume:
        if not (output / "last").is_dir() and not (output / ".last.old").is_dir():
            raise UsageError(
                f"--resume: no checkpoint in {output / 'last'} (a run writes it after its first "
                "epoch); run without --resume to start one"
            )
        path = output / RECIPE_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError as err:
                raise UsageError(f"--resume: {path} is corrupt ({err})") from err
            changes = _recipe_changes(saved, recipe)
            if changes:
                raise UsageError(
                    "--resume: the run was started with other settings: "
                    + "; ".join(changes)
                    + " (only --workers, --eval-every, --eval-batch-size, --best-metric, "
                    "--no-progress and --epochs may change; nothing was written)"
                )


# -- the run -----------------------------------------------------------------------------------


def _write_recipe(output: Path, recipe: recipes.Recipe) -> None:
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps(recipe.as_dict(), indent=2) + "\n")
    os.replace(tmp, output / RECIPE_FILE)


def _clean_stale_demos() -> None:
    """Removes the demo folders of killed runs (their process is gone) from the temp dir."""
    for path in Path(tempfile.gettempdir()).glob(DEMO_PREFIX + "*"):
        match = re.match(rf"{DEMO_PREFIX}(\d+)_", path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _demo_root(recipe: recipes.Recipe, seed: int, context, stack) -> Path:
    """Rank 0 writes the synthetic dataset; the other ranks get its path."""
    path = [None]
    if context.is_main:
        _clean_stale_demos()
        prefix = f"{DEMO_PREFIX}{os.getpid()}_"
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        recipes.write_demo(recipe, root, seed)
        path = [str(root)]
    if context.distributed:
        torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0])


def _load_model(args, recipe: recipes.Recipe):
    """The model: the checkpoint's (with its own preprocessing), or the recipe's."""
    from .. import CrossViewGeoLocalizer

    path = args.checkpoint
    if path is None:
        if args.eval_only:
            raise UsageError("--eval-only needs --checkpoint PATH")
        weights: Any = True
        if args.backbone_weights is not None:
            if not args.backbone_weights.is_file():
                raise UsageError(f"--backbone-weights {args.backbone_weights}: no such file")
            weights = args.backbone_weights
        try:
            return recipes.build_model(recipe, backbone_weights=weights)
        except RuntimeError as err:  # ImageNet weights neither cached nor downloadable
            raise UsageError(f"{err} (or pass --backbone-weights PATH)") from err
    if path.is_dir():
        model = CrossViewGeoLocalizer.from_pretrained(path)
    elif path.is_file():
        query, reference = recipe.query_input.image_size, recipe.reference_input.image_size
        kwargs = {} if query == reference else {"query_img_size": query}
        model = CrossViewGeoLocalizer.from_lrfr_checkpoint(path, img_size=reference, **kwargs)
    else:
        raise UsageError(f"--checkpoint {path}: no such file or directory")
    recorded = model.input_config
    if recorded is None:  # saved by an older version: the recipe's (or the options') sizes
        logging.getLogger(__name__).warning(
            "%s does not record its input preprocessing: using the recipe's sizes", path
        )
        model.input_config = {"query": recipe.query_input, "reference": recipe.reference_input}
        return model
    for view in ("query", "reference"):
        given = getattr(args, f"{view}_size", None)
        if given is not None and tuple(given) != recorded[view].image_size:
            raise UsageError(
                f"--{view}-size {given[0]} {given[1]} contradicts the checkpoint, which was "
                f"trained on {view} images of {_shown(recorded[view].image_size)}: drop the "
                "option (the checkpoint's own preprocessing is used)"
            )
    return model


def _histogram_baseline(task) -> float | None:
    """R@1 of colour histograms on the raw images of an in-memory task (what appearance alone
    gives), or None when the images are not in memory."""
    from ..data import synthetic
    from ..evaluation import evaluate_retrieval

    sides = []
    for dataset in (task.queries, task.references):
        images = getattr(dataset, "images", None)
        if not isinstance(images, torch.Tensor):
            return None
        descriptors = synthetic.colour_histogram_descriptors(images).float()
        sides.append((descriptors, torch.as_tensor(dataset.labels)))
    (q, ql), (r, rl) = sides
    with warnings.catch_warnings():  # coarse histograms tie by design; ties count against
        warnings.simplefilter("ignore", UserWarning)  # the true match, as for any descriptor
        return float(evaluate_retrieval(q, r, ql, rl, protocol=task.protocol)["R@1"])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run: checks, data, model, training (or evaluation only); returns the JSON lines."""
    from ..training import (
        barrier,
        cleanup_distributed,
        evaluate,
        fit,
        init_distributed,
        seed_everything,
    )

    recipe = resolve_recipe(args)
    output = args.output_dir or Path("runs") / recipe.name
    if not args.eval_only:
        _check_output(output, args, recipe)
    elif args.resume or args.overwrite:
        raise UsageError("--eval-only writes no run: drop --resume / --overwrite")
    if args.data_root is not None and not args.data_root.is_dir():
        raise UsageError(f"--data-root {args.data_root}: no such directory")
    context = _init(args.device, init_distributed)
    log = print if context.is_main else (lambda *a, **k: None)
    if context.is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    config = dataclasses.replace(recipe.train, output_dir=str(output))
    try:
        with contextlib.ExitStack() as stack:
            model = None
            if args.checkpoint is not None:  # its own inputs decide how the data is read
                seed_everything(config.seed)
                model = _load_model(args, recipe)
                recipe = dataclasses.replace(
                    recipe,
                    query_input=model.input_config["query"],
                    reference_input=model.input_config["reference"],
                )
            if args.demo and args.data_root is None:
                root = _demo_root(recipe, config.seed, context, stack)
                log(
                    f"wrote a synthetic {DATASETS[recipe.dataset]} ({recipe.demo_locations} "
                    f"evaluation locations) in {time.perf_counter() - start:.1f} s"
                )
            else:
                root = args.data_root
            data = recipes.load_data(recipe, root, train=not args.eval_only, seed=config.seed)
            if model is None:  # built after the data: a missing file fails before a download
                seed_everything(config.seed)
                model = _load_model(args, recipe)
            if args.eval_only:
                model.to(context.device)
                metrics = evaluate(model, data.tasks, config, context)
            else:
                if context.is_main:
                    _write_recipe(output, recipe)
                loss = recipes.build_loss(recipe, gather=context.distributed)
                log(
                    f"training on {len(data.train.pairs)} pairs, {context.world_size} "
                    f"process(es) on {context.device}; checkpoints in {output}"
                )
                result = fit(
                    model, loss, data.train, data.tasks, config, context=context,
                    resume=args.resume, overwrite=args.overwrite,
                )  # fmt: skip
                metrics = result.metrics
            baseline = {}
            if args.demo and context.is_main:
                baseline = {t.name: _histogram_baseline(t) for t in data.tasks}
            barrier()  # nobody reads the demo folder any more: rank 0 may delete it
    finally:
        cleanup_distributed()
    lines = [_result_line(recipe, data.split, task, metrics, baseline, context, log)
             for task in data.tasks]  # fmt: skip
    log(f"done in {time.perf_counter() - start:.1f} s")
    if context.is_main:
        for line in lines:
            print(json.dumps(line), flush=True)
    return lines


def _result_line(recipe, split, task, metrics, baseline, context, log) -> dict[str, Any]:
    """One task's JSON line (and, for a demo, its baseline's log line)."""
    m = metrics[task.name]
    line: dict[str, Any] = {"dataset": recipe.dataset, "split": split}
    if recipe.dataset == "university1652":
        line["direction"] = task.name
    line.update(
        {"queries": m["queries"], "references": m["references"], "world_size": context.world_size}
    )
    papers = metrics.get(task.name + PAPERS_SUFFIX)
    if papers is not None:
        line["scoring"] = OFFICIAL_SCORING
    line.update({k: round(m[k], 2) for k in ("R@1", "R@5", "R@10", "R@1%", "AP") if k in m})
    if papers is not None:
        line["papers"] = {
            "scoring": PAPERS_SCORING,
            "references": papers["references"],
            **{k: round(papers[k], 2) for k in ("R@1", "R@5", "R@10", "R@1%", "AP") if k in papers},
        }
        for values, scoring in ((m, OFFICIAL_SCORING), (papers, PAPERS_SCORING)):
            log(
                f"{task.name} [{scoring}]: R@1 {values['R@1']:.2f}, AP {values['AP']:.2f}, "
                f"R@1% {values['R@1%']:.2f}"
            )
    if baseline.get(task.name) is not None:
        log(
            f"{task.name}: R@1 {m['R@1']:.2f}% (colour-histogram baseline: "
            f"{baseline[task.name]:.2f}%)"
        )
        line["baseline_R@1"] = round(baseline[task.name], 2)
    return line


def _init(device: str, init_distributed):
    """The process group and device, with a one-line error for a device this machine lacks."""
    if device == "auto":
        return init_distributed(device)
    try:
        wanted = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from err
    if wanted.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if wanted.type == "cuda" and wanted.index is not None:
        if wanted.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    return init_distributed(device)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary folders are cleaned up."""


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs ``train`` and turns expected problems into one line on standard error."""
    from ..training import CheckpointError, ResumeError

    owner = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != owner:  # a forked worker (e.g. the demo writer's pool): just end
            os._exit(128 + signum)
        raise _Terminated

    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, terminate)
    output = args.output_dir or Path("runs") / _recipe_name(args)
    try:
        run(args)
    except (KeyboardInterrupt, _Terminated) as err:
        what = "interrupted" if isinstance(err, KeyboardInterrupt) else "terminated"
        hint = (
            ""
            if args.eval_only
            else (f"; continue with the same command and --resume (checkpoint: {output / 'last'})")
        )
        print(f"{parser.prog}: {what}{hint}", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 143
    except (UsageError, ResumeError, CheckpointError, FileNotFoundError, NotADirectoryError,
            ValueError, KeyError, ImportError) as err:  # fmt: skip
        if os.environ.get("GSRA_SALAD_DEBUG"):
            raise
        # a KeyError's str() is the repr of its key: its message is args[0]
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        message = " ".join(text.split()) or type(err).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
