"""Ablation on the hard synthetic CVUSA: GSRA on/off and SALAD vs GeM, over seeds, fixed steps.

The same small model (a shared ``TinyCNN`` trunk, optionally ``GlobalSpatialRelationAttention``,
one per view where the feature maps differ in size, then ``SALAD`` or GeM pooling; shared weights
as in LRFR) is trained for a fixed number of optimizer STEPS (not wall time: the result does not
depend on the machine's load) by the library's own loop (``gsra_salad.training.fit``, with the
demo recipe's schedule, warmup share and clipping by value 100, and a callback for the learning
curves) with ``gsra_salad.losses.InfoNCELoss`` on the hard setting
(limited field of view at an unknown heading, one-view objects; docs/synthetic-benchmark.md),
then evaluated on the 2,000-location validation split with ``evaluate_retrieval`` (R@1, R@5,
R@1%). The colour-histogram baseline is reported beside it.

Run: ``python -m benchmarks.ablation_synthetic`` (about 15 minutes on a quiet 2-core CPU),
``--quick`` for a smoke run of seconds. The data set is written once per parameter set into
``--data-dir`` (default ``benchmarks/results/data/hard-cvusa-*``) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks._common import RESULTS, environment
from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention, recipes
from gsra_salad.data import CVUSA, PairedBatchAugmentation, PreloadedImages, PreloadedPairs
from gsra_salad.data.synthetic import HardSetting, colour_histogram_descriptors, write_cvusa
from gsra_salad.evaluation import evaluate_retrieval
from gsra_salad.losses import InfoNCELoss
from gsra_salad.models import TinyCNN
from gsra_salad.training import Callback, RetrievalTask, TrainConfig, TrainData, fit
from gsra_salad.training import evaluate as evaluate_tasks

VARIANTS = {
    # name: (GSRA?, aggregation)
    "gsra+salad": (True, "salad"),
    "salad (no gsra)": (False, "salad"),
    "gsra+gem": (True, "gem"),
}


@dataclass
class Config:
    """Everything that defines one run (written to the JSON)."""

    steps: int = 1500
    batch_size: int = 64
    image_size: int = 64  # ground view height and satellite side at the model's input
    channels: int = 128
    width: int = 16
    groups: int = 8
    num_clusters: int = 16
    cluster_dim: int = 16
    num_train: int = 6000
    num_val: int = 2000
    tile_size: int = 128
    pano_size: tuple[int, int] = (64, 256)
    fov_degrees: float = 180.0
    data_seed: int = 0
    label_smoothing: float = 0.1


class GeM(nn.Module):
    """Generalised-mean pooling (learnable exponent p): (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def input_sizes(cfg: Config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(ground (H, W), satellite (S, S)) at the model's input: the ground view keeps its aspect."""
    h = cfg.image_size
    width = HardSetting(fov_degrees=cfg.fov_degrees).ground_width(cfg.pano_size[1])
    return (h, round(h * width / cfg.pano_size[0])), (h, h)


def build_model(variant: str, cfg: Config) -> CrossViewGeoLocalizer:
    """The small model: shared trunk and aggregation, one GSRA per view when the views' feature
    maps differ in size (the 180-degree ground view is 4 x 8, the satellite 4 x 4)."""
    use_gsra, aggregation = VARIANTS[variant]
    trunk = TinyCNN(cfg.channels, width=cfg.width)
    maps = [(-(-h // TinyCNN.stride), -(-w // TinyCNN.stride)) for h, w in input_sizes(cfg)]
    attention = reference_attention = None
    if use_gsra:
        attention = GlobalSpatialRelationAttention(cfg.channels, maps[0], groups=cfg.groups)
        if maps[1] != maps[0]:
            reference_attention = GlobalSpatialRelationAttention(
                cfg.channels, maps[1], groups=cfg.groups
            )
    if aggregation == "salad":
        pool: nn.Module = SALAD(
            cfg.channels, cfg.num_clusters, cfg.cluster_dim, token_dim=0, dropout=0.0
        )
    else:
        pool = GeM()
    return CrossViewGeoLocalizer(
        trunk, attention, pool, share_weights=True, reference_attention=reference_attention
    )


def make_loss(cfg: Config) -> nn.Module:
    return InfoNCELoss(temperature=0.07, learnable=True, label_smoothing=cfg.label_smoothing)


# -- data -----------------------------------------------------------------------------------------


def hard_setting(cfg: Config) -> HardSetting:
    return HardSetting(fov_degrees=cfg.fov_degrees)


def data_root(cfg: Config, data_dir: Path | None) -> Path:
    setting = hard_setting(cfg)
    key = (
        f"hard-cvusa-fov{cfg.fov_degrees:g}-t{cfg.num_train}-v{cfg.num_val}-s{cfg.tile_size}"
        f"-p{cfg.pano_size[0]}x{cfg.pano_size[1]}-seed{cfg.data_seed}"
    )
    root = (data_dir or RESULTS / "data") / key
    meta = root / "hard_setting.json"
    if meta.exists() and json.loads(meta.read_text())["setting"] == json.loads(
        json.dumps(asdict(setting))
    ):
        return root
    return write_cvusa(
        root, cfg.num_train, cfg.num_val, tile_size=cfg.tile_size, pano_size=cfg.pano_size,
        seed=cfg.data_seed, hard=setting,
    )  # fmt: skip


def load_split(
    root: Path, split: str, sizes: tuple[tuple[int, int], tuple[int, int]] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Every (ground, satellite, id) of a split, read once by the CVUSA reader, as uint8,
    resized to ``sizes`` (``None``: as written). Normalisation happens per batch."""
    dataset = CVUSA(root, split)  # type: ignore[arg-type]
    grounds, satellites, labels = zip(*(dataset[i] for i in range(len(dataset))))
    views = [torch.stack(grounds), torch.stack(satellites)]
    if sizes:
        from torchvision.transforms import v2  # the 'torchvision' extra, as eval_transform

        for k, size in enumerate(sizes):
            resize = v2.Resize(list(size), antialias=True)
            views[k] = torch.cat(
                [resize(views[k][i : i + 256]) for i in range(0, len(labels), 256)]
            )
    return views[0], views[1], torch.tensor(labels)


# -- training and evaluation ----------------------------------------------------------------------


class _Tensors(torch.utils.data.Dataset):
    """(uint8 ground, uint8 satellite, id) items of tensors held in memory."""

    def __init__(self, split: tuple[Tensor, Tensor, Tensor]) -> None:
        self.grounds, self.satellites, labels = split
        self.labels = labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.grounds[i], self.satellites[i], int(self.labels[i])


def tasks(val: tuple[Tensor, Tensor, Tensor]) -> list[RetrievalTask]:
    """The validation split as the library's retrieval task (normalised per batch)."""
    return [
        RetrievalTask(
            "val", PreloadedImages(val[0], labels=val[2]), PreloadedImages(val[1], labels=val[2])
        )
    ]


def evaluate(model: CrossViewGeoLocalizer, val: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    config = TrainConfig(workers=0, progress=False, eval_batch_size=500)
    metrics = evaluate_tasks(model, tasks(val), config)["val"]
    return {k: v for k, v in metrics.items() if k.startswith("R@")}


def recalls(q: Tensor, r: Tensor) -> dict[str, float]:
    """Recall@k (percent) of query i whose match is reference i (CVUSA protocol)."""
    labels = torch.arange(len(q))
    return evaluate_retrieval(q, r, labels, labels, ks=(1, 5, 10), protocol="cvusa")


def histogram_baseline(root: Path) -> dict[str, float]:
    """The colour-histogram baseline on the validation split, on the images as written."""
    grounds, satellites, _ = load_split(root, "val", None)

    def describe(images: Tensor) -> Tensor:  # in chunks: the histogram's index tensor is int64
        return torch.cat(
            [colour_histogram_descriptors(images[i : i + 200]) for i in range(0, len(images), 200)]
        )

    return recalls(describe(grounds), describe(satellites))


def train_config(cfg: Config, steps_per_epoch: int, seed: int) -> TrainConfig:
    """The demo recipe's schedule and clipping (``recipes.get("cvusa-demo")``), sized in epochs
    to cover ``cfg.steps`` optimizer steps; the warmup is the recipe's share of the run."""
    recipe = recipes.get("cvusa-demo").train
    epochs = -(-cfg.steps // steps_per_epoch)
    return dataclasses.replace(
        recipe,
        epochs=epochs,
        batch_size=cfg.batch_size,
        warmup_epochs=epochs * recipe.warmup_epochs / recipe.epochs,
        eval_every=epochs,
        seed=seed,
        workers=0,
        progress=False,
        output_dir=None,
    )


class Curve(Callback):
    """Records the loss, and R@k every ``eval_every`` steps with the CPU seconds of training
    spent so far (the evaluations' own time excluded); asks the run to stop after ``steps``."""

    def __init__(self, val, steps: int, eval_every: int, log_every: int, name: str) -> None:
        self.val, self.steps, self.eval_every, self.log_every = val, steps, eval_every, log_every
        self.name, self.losses, self.points, self.eval_cpu = name, [], [], 0.0
        self.start_cpu = _cpu_seconds()

    def training_cpu(self) -> float:
        return _cpu_seconds() - self.start_cpu - self.eval_cpu

    def on_step_end(self, state, loss) -> None:
        self.losses.append(float(loss))
        step = state.step
        if self.log_every and step % self.log_every == 0:
            recent = statistics.mean(self.losses[-self.log_every :])
            print(f"  {self.name} step {step}: loss {recent:.3f}", flush=True)
        if self.eval_every and step % self.eval_every == 0 and step < self.steps:
            cpu0 = _cpu_seconds()
            point = {"step": step, "cpu_s": self.training_cpu(), **evaluate(state.model, self.val)}
            self.points.append(point)
            self.eval_cpu += _cpu_seconds() - cpu0
            print(
                f"  {self.name} step {step}: R@1 {point['R@1']:.1f} R@5 {point['R@5']:.1f} "
                f"({point['cpu_s']:.0f} CPU s)",
                flush=True,
            )
        if step >= self.steps:
            state.request_stop()


def train_one(
    variant: str, cfg: Config, seed: int, train: tuple[Tensor, Tensor, Tensor],
    val: tuple[Tensor, Tensor, Tensor], *, log_every: int = 0, eval_every: int = 0,
) -> dict[str, object]:  # fmt: skip
    """One variant trained by the library's ``fit`` (the recipe's schedule, clipping and
    InfoNCE), in memory, the tile turned freely (heading unknown) and flipped with its view."""
    torch.manual_seed(seed)
    model = build_model(variant, cfg)
    pairs = PreloadedPairs(_Tensors(train))
    augmentation = PairedBatchAugmentation("drone", generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(train[2]) // cfg.batch_size
    config = train_config(cfg, steps_per_epoch, seed)
    curve = Curve(val, cfg.steps, eval_every, log_every, f"{variant} seed {seed}")
    start = time.perf_counter()
    result = fit(
        model, make_loss(cfg), TrainData(pairs, augmentation), tasks(val), config,
        callbacks=[curve],
    )  # fmt: skip
    train_cpu = curve.training_cpu()
    metrics = {k: v for k, v in result.metrics["val"].items() if k.startswith("R@")}
    return {
        "variant": variant,
        "seed": seed,
        **metrics,
        "steps": result.state.step,
        "final_loss": statistics.mean(curve.losses[-20:]),
        "curve": curve.points,
        "train_wall_s": time.perf_counter() - start,
        "train_cpu_s": train_cpu,
        "descriptor_dim": model.descriptor_dim if hasattr(model, "descriptor_dim") else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]
        entry: dict[str, float] = {"runs": len(rows)}
        for key in ("R@1", "R@5", "R@1%"):
            values = [float(r[key]) for r in rows]  # type: ignore[arg-type]
            entry[f"{key} mean"] = statistics.mean(values)
            entry[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key} min"], entry[f"{key} max"] = min(values), max(values)
        table[variant] = entry
    return table


def format_table(table: dict[str, dict[str, float]], baseline: dict[str, float]) -> str:
    lines = [
        "| variant | R@1 (mean ± std) | R@1 min-max | R@5 (mean ± std) | R@1% (mean) |",
        "|---|---|---|---|---|",
    ]
    for name, e in table.items():
        lines.append(
            f"| {name} | {e['R@1 mean']:.1f} ± {e['R@1 std']:.1f} | "
            f"{e['R@1 min']:.1f}-{e['R@1 max']:.1f} | {e['R@5 mean']:.1f} ± {e['R@5 std']:.1f} | "
            f"{e['R@1% mean']:.1f} |"
        )
    lines.append(
        f"| colour histogram | {baseline['R@1']:.1f} | - | {baseline['R@5']:.1f} | "
        f"{baseline['R@1%']:.1f} |"
    )
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> dict[str, object]:
    """One table from several result files of the same configuration."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("config", "setting", "histogram_baseline"):
        if any(part[key] != parts[0][key] for part in parts):
            raise ValueError(f"--merge: the files differ in {key!r}; merge runs of one setup only")
    runs = [run for part in parts for run in part["runs"]]
    table = summarise(runs)
    print(format_table(table, parts[0]["histogram_baseline"]))
    result = {**parts[0], "table": table, "runs": runs, "merged_from": [str(p) for p in paths]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"written {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data and few steps (CI smoke run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--fov", type=float, default=None, help="ground field of view in degrees")
    p.add_argument("--data-dir", type=Path, default=None, help="where the data set is cached")
    p.add_argument("--json", type=Path, default=None, help="results file")
    p.add_argument("--log-every", type=int, default=0, help="print the mean loss every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps")
    p.add_argument("--image-size", type=int, default=None, help="ground height, satellite side")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--merge", type=Path, nargs="+", default=None, metavar="JSON",
        help="no training: merge the runs of these result files (e.g. one per seed, run in "
        "parallel processes) into one table and --json",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json or RESULTS / "ablation_synthetic.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config()
    if args.quick:
        cfg = Config(steps=4, batch_size=16, num_train=64, num_val=64)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.fov is not None:
        cfg.fov_degrees = args.fov
    if args.image_size is not None:
        cfg.image_size = args.image_size
    if args.quick and args.data_dir is None:
        import tempfile

        args.data_dir = Path(tempfile.mkdtemp())
    root = data_root(cfg, args.data_dir)
    sizes = input_sizes(cfg)
    cache = root / f"u8-{sizes[0][0]}x{sizes[0][1]}-{sizes[1][0]}.pt"
    if cache.exists():
        train, val = torch.load(cache)
    else:
        train, val = load_split(root, "train", sizes), load_split(root, "val", sizes)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save((train, val), partial)
        partial.replace(cache)  # atomic: parallel runs never read a half-written cache
    baseline = histogram_baseline(root)
    print(f"hard CVUSA at {root}: {len(train[2])} train, {len(val[2])} val locations; "
          f"colour-histogram R@1 {baseline['R@1']:.1f}%", flush=True)  # fmt: skip
    env = environment("cpu")  # before training: the commit that ran, not the one at the end
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            run = train_one(
                variant, cfg, seed, train, val, log_every=args.log_every, eval_every=args.eval_every
            )
            runs.append(run)
            print(
                f"{variant:16s} seed {seed}: R@1 {run['R@1']:.1f}  R@5 {run['R@5']:.1f}  "
                f"loss {run['final_loss']:.3f}  {run['train_wall_s']:.0f} s wall, "
                f"{run['train_cpu_s']:.0f} s CPU ({cfg.steps / run['train_wall_s']:.2f} steps/s)",
                flush=True,
            )
    table = summarise(runs)
    print(format_table(table, baseline))
    result = {
        "benchmark": "ablation_synthetic",
        "environment": env,
        "config": asdict(cfg),
        "setting": asdict(hard_setting(cfg)),
        "histogram_baseline": baseline,
        "table": table,
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "loss": type(make_loss(cfg)).__name__,
    }
    out = args.json or (
        RESULTS / ("ablation_synthetic_quick.json" if args.quick else "ablation_synthetic.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
