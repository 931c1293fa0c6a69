"""What GSRA and SALAD bring on the synthetic CVUSA, at equal CPU time, through the library's loop.

Variants (one shared trunk, as in LRFR; ``docs/synthetic-benchmark.md`` has the tables):

- ``gsra+salad``: GSRA per view + SALAD (the paper's design);
- ``salad``: SALAD without GSRA;
- ``gsra+gem``: GSRA + GeM pooling;
- ``gem``: trunk + GeM pooling (Sample4Geo's design: no attention, no optimal transport);
- ``gsra+salad-small``: the paper's design with SALAD's descriptor as small as GeM's
  (``channels`` values), so that descriptor size is not what decides;
- ``polar``: the polar-transformed pipeline (the tile turned into a panorama, SAFA-style) with
  the paper's design, as a reference point (``--setting raw`` only).

Settings: ``raw`` (the normal synthetic CVUSA, raw 64 x 64 satellite tiles against 32 x 128
panoramas) and ``hard`` (a limited field of view at an unknown heading, one-view objects,
``gsra_salad.data.synthetic.HardSetting``). Every run trains with ``gsra_salad.training.fit``
(the demo recipe's optimizer, cosine schedule with its warmup share, clipping by value 100,
InfoNCE, paired flip/turn augmentation and colour jitter) for the same budget of process
CPU-seconds (``resource.getrusage``; the evaluations' own time excluded), with the schedule
sized from a measured cost per step; a callback records R@k against CPU-seconds and stops the
run when the budget is spent. The steps reached are reported. Measure with ``--threads 1`` so
that runs on a shared machine do not compete for cores inside one process.

Run: ``python -m benchmarks.ablation_synthetic --setting raw --threads 1`` (see the docs for the
budgets and the merge of parallel runs), ``--quick`` for a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks._common import RESULTS, environment
from gsra_salad import (
    SALAD,
    CrossViewGeoLocalizer,
    GlobalSpatialRelationAttention,
    InputConfig,
    recipes,
)
from gsra_salad.data import synthetic
from gsra_salad.data.synthetic import HardSetting, write_cvusa
from gsra_salad.models import SmallConvNeXt, TinyCNN
from gsra_salad.recipes import build_loss, load_data
from gsra_salad.training import Callback, TrainConfig, TrainData, fit
from gsra_salad.training import evaluate as evaluate_tasks

VARIANTS = {
    # name: (GSRA?, aggregation, pipeline)
    "gsra+salad": (True, "salad", "raw"),
    "salad": (False, "salad", "raw"),
    "gsra+gem": (True, "gem", "raw"),
    "gem": (False, "gem", "raw"),
    "gsra+salad-small": (True, "salad-small", "raw"),
    "polar": (True, "salad", "polar"),
}

TRUNKS = {
    # name: (channels) -> trunk; "convnext-abc" is SmallConvNeXt with depths (a, b, c)
    "tiny": lambda channels: TinyCNN(channels, width=16),
    "convnext": lambda channels: SmallConvNeXt((channels // 4, channels // 2, channels)),
    **{
        f"convnext-{a}{b}{c}": (
            lambda channels, d=(a, b, c): SmallConvNeXt((channels // 4, channels // 2, channels), d)
        )
        for a, b, c in ((1, 1, 2), (1, 1, 1), (0, 1, 2), (0, 0, 2), (0, 1, 1), (1, 2, 2))
    },
}


@dataclass
class Config:
    """Everything that defines one run (written to the JSON)."""

    setting: str = "raw"
    budget_cpu_s: float = 120.0
    eval_every_cpu_s: float = 20.0
    trunk: str = "convnext"
    channels: int = 64
    groups: int = 8
    num_clusters: int = 16
    cluster_dim: int = 16
    num_train: int = 2000
    num_val: int = 1000
    tile_size: int = 128
    pano_size: tuple[int, int] = (64, 256)
    query_size: tuple[int, int] = (32, 128)  # the demo's panorama
    reference_size: int = 64  # the raw tile's side
    fov_degrees: float = 180.0  # hard setting
    one_view_objects: tuple[int, int] | None = None  # hard setting, each view (None: default)
    data_seed: int = 0
    batch_size: int = 64
    lr: float | None = None  # None: the demo recipe's


class GeM(nn.Module):
    """Generalised-mean pooling (learnable exponent p): (B, C, H, W) -> (B, C)."""

    def __init__(self, channels: int, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps, self.output_dim = eps, channels

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


# -- the setting: data and recipe -----------------------------------------------------------------


def hard_setting(cfg: Config) -> HardSetting | None:
    if cfg.setting != "hard":
        return None
    extra = {}
    if cfg.one_view_objects is not None:
        lo_hi = tuple(int(v) for v in cfg.one_view_objects)
        extra = {"ground_only_objects": lo_hi, "satellite_only_objects": lo_hi}
    return HardSetting(fov_degrees=cfg.fov_degrees, **extra)


def data_root(cfg: Config, data_dir: Path | None) -> Path:
    setting = hard_setting(cfg)
    key = (
        f"{cfg.setting}-cvusa-t{cfg.num_train}-v{cfg.num_val}-s{cfg.tile_size}"
        f"-p{cfg.pano_size[0]}x{cfg.pano_size[1]}-seed{cfg.data_seed}"
    )
    if setting is not None:
        objects = (
            "default" if cfg.one_view_objects is None else "-".join(map(str, cfg.one_view_objects))
        )
        key += f"-fov{cfg.fov_degrees:g}-obj{objects}"
    root = (data_dir or RESULTS / "data") / key
    if (root / "written.json").exists():
        return root
    # written aside and renamed: parallel runs (one process per seed) never read a half-written
    # data set; the first rename wins, the others discard their identical copy
    tmp = root.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_cvusa(
        tmp, cfg.num_train, cfg.num_val, tile_size=cfg.tile_size, pano_size=cfg.pano_size,
        seed=cfg.data_seed, hard=setting,
    )  # fmt: skip
    (tmp / "written.json").write_text(json.dumps(asdict(cfg)))
    try:
        tmp.rename(root)
    except OSError:  # written by a parallel run meanwhile (or a stale folder without the mark)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "written.json").exists():
            raise
    return root


def query_size(cfg: Config) -> tuple[int, int]:
    """The ground view at the model's input: the demo's panorama, or in the hard setting the
    limited field of view at the tile's height (its aspect kept, width a multiple of 16; 64 x
    128 at 180 degrees, a 4 x 8 feature map: SALAD's 16 clusters need 16 features or more)."""
    if cfg.setting != "hard":
        return cfg.query_size
    h = cfg.reference_size
    width = hard_setting(cfg).ground_width(cfg.pano_size[1])  # type: ignore[union-attr]
    return h, max(16, round(h * width / cfg.pano_size[0] / 16) * 16)


def recipe(cfg: Config, pipeline: str) -> recipes.Recipe:
    """The demo recipe of the pipeline (raw tiles or polar-transformed ones) at this setting's
    sizes; in the hard setting the heading is unknown, so only the tile turns (drone mode)."""
    polar = recipes.get("cvusa-demo")
    if pipeline == "polar":
        return polar.replace(batch_size=cfg.batch_size, lr=cfg.lr or polar.train.lr)
    base = recipes.get("cvusa-raw-demo")
    mode = "drone" if cfg.setting == "hard" else "panorama"
    return base.replace(
        batch_size=cfg.batch_size,
        lr=cfg.lr or base.train.lr,
        query_input=InputConfig(query_size(cfg)),
        reference_input=InputConfig((cfg.reference_size, cfg.reference_size)),
        augmentation=dataclasses.replace(base.augmentation, mode=mode),
    )


def build_model(variant: str, cfg: Config) -> CrossViewGeoLocalizer:
    """Shared trunk and aggregation; one GSRA per view when the views' feature maps differ."""
    use_gsra, aggregation, pipeline = VARIANTS[variant]
    r = recipe(cfg, pipeline)
    trunk = TRUNKS[cfg.trunk](cfg.channels)
    stride = trunk.stride
    q_map = (r.query_input.image_size[0] // stride, r.query_input.image_size[1] // stride)
    r_map = (r.reference_input.image_size[0] // stride, r.reference_input.image_size[1] // stride)
    attention = reference_attention = None
    if use_gsra:
        attention = GlobalSpatialRelationAttention(cfg.channels, q_map, groups=cfg.groups)
        if r_map != q_map:
            reference_attention = GlobalSpatialRelationAttention(
                cfg.channels, r_map, groups=cfg.groups
            )
    if aggregation == "gem":
        pool: nn.Module = GeM(cfg.channels)
    else:
        dim = cfg.cluster_dim if aggregation == "salad" else cfg.channels // cfg.num_clusters
        pool = SALAD(cfg.channels, cfg.num_clusters, dim, token_dim=0, dropout=0.0)
    return CrossViewGeoLocalizer(
        trunk, attention, pool, share_weights=True, reference_attention=reference_attention,
        input_config={"query": r.query_input, "reference": r.reference_input},
    )  # fmt: skip


# -- training and evaluation ----------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def step_cost(model: nn.Module, loss: nn.Module, data: TrainData, batch_size: int) -> float:
    """CPU-seconds of one training step (forward, backward, AdamW), measured on a copy."""
    import copy

    model, loss = copy.deepcopy(model).train(), copy.deepcopy(loss)
    params = list(model.parameters()) + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    idx = torch.arange(batch_size) % len(data.pairs)
    items = [data.pairs[int(i)] for i in idx]
    q = torch.stack([it[0] for it in items]).float().div(255)
    r = torch.stack([it[1] for it in items]).float().div(255)
    labels = torch.arange(batch_size)
    times = []
    for _ in range(4):
        start = _cpu_seconds()
        opt.zero_grad()
        a, b = model(q, r)
        loss(a, b, labels=labels).backward()
        opt.step()
        times.append(_cpu_seconds() - start)
    return statistics.median(times[1:])


class Curve(Callback):
    """R@k every ``eval_every`` CPU-seconds of training (the evaluations' own time excluded);
    asks the run to stop when ``budget`` CPU-seconds are spent or ``steps`` are done."""

    def __init__(self, tasks, budget: float, eval_every: float, steps: int, name: str) -> None:
        self.tasks, self.budget, self.eval_every, self.steps = tasks, budget, eval_every, steps
        self.name, self.losses, self.points, self.eval_cpu = name, [], [], 0.0
        self.start_cpu, self.next_eval = 0.0, eval_every

    def on_fit_start(self, state) -> None:
        self.start_cpu = _cpu_seconds()

    def training_cpu(self) -> float:
        return _cpu_seconds() - self.start_cpu - self.eval_cpu

    def on_step_end(self, state, loss) -> None:
        self.losses.append(float(loss))
        spent = self.training_cpu()
        done = spent >= self.budget or state.step >= self.steps
        if self.eval_every and spent >= self.next_eval and not done:
            self.next_eval += self.eval_every
            cpu0 = _cpu_seconds()
            point = {"step": state.step, "cpu_s": spent, **evaluate(state.model, self.tasks)}
            self.points.append(point)
            self.eval_cpu += _cpu_seconds() - cpu0
            print(
                f"  {self.name}: step {state.step}, {spent:.0f} CPU s: R@1 {point['R@1']:.1f} "
                f"(loss {statistics.mean(self.losses[-20:]):.3f})",
                flush=True,
            )
        if done:
            state.request_stop()


def evaluate(model: nn.Module, tasks) -> dict[str, float]:
    config = TrainConfig(workers=0, progress=False, eval_batch_size=500)
    metrics = next(iter(evaluate_tasks(model, tasks, config).values()))
    return {k: float(v) for k, v in metrics.items() if k.startswith("R@")}


_DATA: dict[str, object] = {}


def run_data(cfg: Config, pipeline: str, root: Path):
    """The pipeline's preloaded pairs and evaluation task, read once per process."""
    if pipeline not in _DATA:
        _DATA[pipeline] = load_data(recipe(cfg, pipeline), root)
    return _DATA[pipeline]


def train_one(variant: str, cfg: Config, seed: int, root: Path) -> dict[str, object]:
    """One variant trained by ``fit`` for ``cfg.budget_cpu_s`` CPU-seconds."""
    pipeline = VARIANTS[variant][2]
    r = recipe(cfg, pipeline)
    data = run_data(cfg, pipeline, root)
    torch.manual_seed(seed)
    model = build_model(variant, cfg)
    loss = build_loss(r)
    train = TrainData(data.train.pairs, r.augmentation.build(seed), None)
    cost = step_cost(model, loss, train, cfg.batch_size)
    steps = max(1, int(cfg.budget_cpu_s / cost))
    per_epoch = len(train.pairs) // cfg.batch_size
    epochs = -(-steps // per_epoch)
    demo = r.train
    config = dataclasses.replace(
        demo, epochs=epochs, warmup_epochs=epochs * demo.warmup_epochs / demo.epochs,
        eval_every=epochs, seed=seed, workers=0, progress=False, output_dir=None,
    )  # fmt: skip
    curve = Curve(data.tasks, cfg.budget_cpu_s, cfg.eval_every_cpu_s, steps, f"{variant} {seed}")
    start = time.perf_counter()
    result = fit(model, loss, train, data.tasks, config, callbacks=[curve])
    train_cpu = curve.training_cpu()
    metrics = next(iter(result.metrics.values()))
    final = {k: float(v) for k, v in metrics.items() if k.startswith("R@")}
    curve.points.append({"step": result.state.step, "cpu_s": train_cpu, **final})
    return {
        "variant": variant,
        "seed": seed,
        **final,
        "steps": result.state.step,
        "planned_steps": steps,
        "step_cost_cpu_s": cost,
        "final_loss": statistics.mean(curve.losses[-20:]),
        "curve": curve.points,
        "train_wall_s": time.perf_counter() - start,
        "train_cpu_s": train_cpu,
        "descriptor_dim": int(model.aggregation.output_dim),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def histogram_baseline(cfg: Config, root: Path) -> dict[str, float]:
    """R@k of colour histograms of the raw evaluation images (appearance alone)."""
    from gsra_salad.evaluation import evaluate_retrieval

    data = run_data(cfg, VARIANTS[next(iter(VARIANTS))][2], root)
    q, r = data.tasks[0].queries, data.tasks[0].references

    def describe(images: Tensor) -> Tensor:
        return torch.cat(
            [
                synthetic.colour_histogram_descriptors(images[i : i + 200]).float()
                for i in range(0, len(images), 200)
            ]
        )

    return evaluate_retrieval(
        describe(q.images), describe(r.images), q.labels, r.labels, ks=(1, 5, 10),
        protocol="cvusa",
    )  # fmt: skip


# -- tables ---------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == variant]
        entry: dict[str, float] = {"runs": len(rows)}
        for key in ("R@1", "R@5", "R@1%", "steps", "train_cpu_s"):
            values = [float(r[key]) for r in rows]  # type: ignore[arg-type]
            entry[f"{key} mean"] = statistics.mean(values)
            entry[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key} min"], entry[f"{key} max"] = min(values), max(values)
        entry["descriptor_dim"] = rows[0]["descriptor_dim"]  # type: ignore[assignment]
        entry["parameters"] = rows[0]["parameters"]  # type: ignore[assignment]
        table[variant] = entry
    return table


def format_table(table: dict[str, dict[str, float]], baseline: dict[str, float]) -> str:
    lines = [
        "| variant | D | R@1 mean ± std | R@1 min-max | R@5 mean ± std | R@1% mean | steps "
        "| CPU-s | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in table.items():
        lines.append(
            f"| {name} | {e['descriptor_dim']} | {e['R@1 mean']:.1f} ± {e['R@1 std']:.1f} | "
            f"{e['R@1 min']:.1f}-{e['R@1 max']:.1f} | {e['R@5 mean']:.1f} ± {e['R@5 std']:.1f} "
            f"| {e['R@1% mean']:.1f} | {e['steps mean']:.0f} | {e['train_cpu_s mean']:.0f} "
            f"| {e['runs']} |"
        )
    lines.append(
        f"| colour histogram | - | {baseline['R@1']:.1f} | - | {baseline['R@5']:.1f} | "
        f"{baseline['R@1%']:.1f} | - | - | - |"
    )
    return "\n".join(lines)


def format_curves(runs: list[dict[str, object]]) -> str:
    """R@1 (mean over seeds) against training CPU-seconds: one column per curve point."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    curves = {v: [r["curve"] for r in runs if r["variant"] == v] for v in variants}
    n = min(len(c) for cs in curves.values() for c in cs)
    at = [statistics.mean(float(c[i]["cpu_s"]) for cs in curves.values() for c in cs)
          for i in range(n)]  # fmt: skip
    lines = [
        "| variant | " + " | ".join(f"~{t:.0f} CPU-s" for t in at) + " |",
        "|---|" + "---|" * n,
    ]
    for v, cs in curves.items():
        cells = []
        for i in range(n):
            values = [float(c[i]["R@1"]) for c in cs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> dict[str, object]:
    """One table from several result files of the same configuration."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("config", "histogram_baseline"):
        if any(part[key] != parts[0][key] for part in parts):
            raise ValueError(f"--merge: the files differ in {key!r}; merge runs of one setup only")
    runs = [run for part in parts for run in part["runs"]]
    table = summarise(runs)
    print(format_table(table, parts[0]["histogram_baseline"]))
    print(format_curves(runs))
    result = {**parts[0], "table": table, "runs": runs, "merged_from": [str(p) for p in paths]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"written {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data, a few CPU-s (smoke run)")
    p.add_argument("--setting", choices=("raw", "hard"), default="raw")
    p.add_argument("--budget", type=float, default=None, help="CPU-seconds of training per run")
    p.add_argument("--eval-every", type=float, default=None, help="curve point every N CPU-s")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--trunk", choices=list(TRUNKS), default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: the demo recipe's")
    p.add_argument("--train-locations", type=int, default=None)
    p.add_argument("--val-locations", type=int, default=None)
    p.add_argument("--fov", type=float, default=None, help="hard setting: field of view (deg)")
    p.add_argument(
        "--one-view-objects", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="hard setting: objects seen in one view only, per view",
    )  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="where the data set is cached")
    p.add_argument("--json", type=Path, default=None, help="results file")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: CPU-seconds comparable between parallel runs)",
    )  # fmt: skip
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
    cfg = Config(setting=args.setting)
    if args.quick:
        cfg = dataclasses.replace(
            cfg, budget_cpu_s=0.3, eval_every_cpu_s=0.15, num_train=32, num_val=16, batch_size=8,
            channels=32, num_clusters=4, cluster_dim=4,
        )  # fmt: skip
        args.seeds = args.seeds[:1]
    for name, value in (
        ("budget_cpu_s", args.budget), ("eval_every_cpu_s", args.eval_every),
        ("trunk", args.trunk), ("channels", args.channels), ("batch_size", args.batch_size),
        ("lr", args.lr), ("num_train", args.train_locations),
        ("num_val", args.val_locations), ("fov_degrees", args.fov),
        ("one_view_objects", args.one_view_objects),
    ):  # fmt: skip
        if value is not None:
            setattr(cfg, name, value)
    variants = args.variants or [v for v in VARIANTS if cfg.setting == "raw" or v != "polar"]
    if cfg.setting == "hard" and "polar" in variants:
        p.error("the polar pipeline needs full panoramas: not in the hard setting")
    if args.quick and args.data_dir is None:
        import atexit
        import shutil
        import tempfile

        args.data_dir = Path(tempfile.mkdtemp(prefix="gsra_salad_ablation_"))
        atexit.register(shutil.rmtree, args.data_dir, ignore_errors=True)
    root = data_root(cfg, args.data_dir)
    baseline = histogram_baseline(cfg, root)
    print(f"{cfg.setting} synthetic CVUSA at {root}: {cfg.num_train} train, {cfg.num_val} val "
          f"locations; colour-histogram R@1 {baseline['R@1']:.1f}%", flush=True)  # fmt: skip
    env = environment("cpu")  # before training: the commit that ran, not the one at the end
    out = args.json or RESULTS / (
        "ablation_synthetic_quick.json" if args.quick else f"ablation_{cfg.setting}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, object]] = []
    for seed in args.seeds:
        for variant in variants:
            run = train_one(variant, cfg, seed, root)
            runs.append(run)
            print(
                f"{variant:18s} seed {seed}: R@1 {run['R@1']:.1f}  R@5 {run['R@5']:.1f}  "
                f"{run['steps']} steps, {run['train_cpu_s']:.0f} CPU s "
                f"({run['train_wall_s']:.0f} s wall)",
                flush=True,
            )
            result = {
                "benchmark": "ablation_synthetic",
                "environment": env,
                "config": asdict(cfg),
                "query_size": query_size(cfg),
                "histogram_baseline": baseline,
                "table": summarise(runs),
                "runs": runs,
                "torch_threads": torch.get_num_threads(),
            }
            out.write_text(json.dumps(result, indent=1, default=str))  # after every run
    print(format_table(result["table"], baseline))  # type: ignore[arg-type]
    print(format_curves(runs))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
