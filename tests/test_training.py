"""gsra_salad.training: schedules, clipping, precision, RNG states, atomic checkpoints, fit()."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention
from gsra_salad.losses import InfoNCELoss
from gsra_salad.models import TinyCNN
from gsra_salad.training import (
    RetrievalTask,
    TrainConfig,
    TrainData,
    WarmupSchedule,
    autocast,
    build_optimizer,
    build_scheduler,
    checkpoint,
    clip_gradients,
    fit,
    get_rng_state,
    grad_scaler,
    load_training_state,
    recover,
    resolve_precision,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

# -- schedules, optimizer, clipping ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(kind):
    f = WarmupSchedule(kind, total_steps=110, warmup_steps=10)
    assert [f(s) for s in range(11)] == pytest.approx([s / 10 for s in range(11)])
    expected = {
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: 1 - p,
        "constant": lambda p: 1.0,
    }[kind]
    for step in (10, 35, 60, 85, 110, 200):
        assert f(step) == pytest.approx(expected(min(1.0, (step - 10) / 100)))


def test_schedule_without_warmup_starts_at_full_lr_and_scheduler_follows_it():
    model = nn.Linear(3, 1)
    opt = build_optimizer(model, lr=0.5)
    sched = build_scheduler(opt, "linear", total_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])


@pytest.mark.parametrize(
    "args", [("warm", 10, 0), ("cosine", 0, 0), ("cosine", 10, 11), ("linear", 10, -1)]
)
def test_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        WarmupSchedule(*args)


def test_optimizer_covers_model_and_loss_once_and_uses_adamw_default_decay():
    model, loss = nn.Linear(2, 2), InfoNCELoss()
    opt = build_optimizer([model, loss, model], lr=1e-3)
    params = opt.param_groups[0]["params"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01
    assert len(params) == 3  # weight, bias, the loss's logit scale
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.ReLU(), lr=1e-3)


def test_clip_by_value_and_by_norm():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([150.0, -3.0, -120.0])
    clip_gradients([p], value=100.0)
    assert torch.equal(p.grad, torch.tensor([100.0, -3.0, -100.0]))
    q = nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, 4.0])
    clip_gradients([q], norm=1.0)
    assert q.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError):
        clip_gradients([q], value=0.0)


# -- precision -------------------------------------------------------------------------------


def test_precision_resolution_and_autocast():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("amp", "cpu") == "bf16"
    assert resolve_precision("amp", "cuda") == "fp16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("half", "cpu")
    x = torch.ones(2, 2)
    with autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
    assert not grad_scaler("cpu", "bf16").is_enabled()


# -- RNG states ------------------------------------------------------------------------------


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    seed_everything(5)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


# -- checkpoints -----------------------------------------------------------------------------


def _model(channels: int = 16) -> CrossViewGeoLocalizer:
    return CrossViewGeoLocalizer(
        TinyCNN(channels), None, SALAD(channels, 4, 4, token_dim=0, dropout=0.0)
    )


def test_checkpoint_round_trip_and_permissions(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 3}, "x": torch.ones(2)})
    loaded = load_training_state(tmp_path / "last")
    assert loaded["state"]["next_epoch"] == 3 and torch.equal(loaded["x"], torch.ones(2))
    again = CrossViewGeoLocalizer.from_pretrained(tmp_path / "last").state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "last").stat().st_mode & 0o777 != 0o700  # not mkdtemp's private mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary left


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 1}})

    def broken(directory):
        (directory / "partial").write_text("half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 2}})
    assert load_training_state(tmp_path / "last")["state"]["next_epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    model = _model()
    save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 1}})
    real_replace, calls = checkpoint.os.replace, []

    def dies_on_second(src, dst):  # os.replace is global: count only the directory swaps
        if str(dst).endswith(("last", ".last.old")):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 2}})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not (tmp_path / "last").exists()  # only .last.old holds the previous checkpoint
    assert load_training_state(tmp_path / "last")["state"]["next_epoch"] == 1  # recovered
    save_checkpoint(tmp_path / "last", model, {"state": {"next_epoch": 2}})
    assert load_training_state(recover(tmp_path / "last"))["state"]["next_epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_resume_without_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"training_state\.pt"):
        load_training_state(tmp_path / "last")


# -- fit ---------------------------------------------------------------------------------------


class _Pairs(Dataset):
    """A learnable toy task: the reference is the query flipped, plus noise."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.noise = 0.05 * torch.randn(n, 3, 32, 32, generator=g)
        self.labels = np.arange(n)
        self.positions = np.stack([np.arange(n), np.zeros(n)], 1).astype(float)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.images[i].flip(-1) + self.noise[i], int(self.labels[i])


class _Side(Dataset):
    def __init__(self, pairs: _Pairs, view: int) -> None:
        self.pairs, self.view = pairs, view

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        item = self.pairs[i]
        return item[self.view], item[2]


def _task(pairs):
    return [RetrievalTask("val", _Side(pairs, 0), _Side(pairs, 1))]


def _config(tmp_path, **kw):
    base = dict(
        epochs=3, batch_size=8, lr=3e-3, eval_every=1, workers=0, progress=False,
        output_dir=str(tmp_path), warmup_epochs=0.5,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_writes_metrics_and_best(tmp_path):
    seed_everything(0)
    pairs = _Pairs(32)
    model = _model(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, epochs=4))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.state.next_epoch == 4 and result.state.step == 4 * 4
    assert result.metrics["val"]["R@1"] > 3 * 100 / 32  # well above chance
    best = json.loads(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[result.state.best_epoch]
    )
    assert best["metrics"]["val"]["R@1"] == result.state.best_metric
    assert (tmp_path / "best" / "config.json").is_file()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


class _InMemoryPairs(_Pairs):
    """Serves its own batches, like gsra_salad.data.PreloadedPairs."""

    def batches(self, sampler, augmentation=None):
        for indices in sampler:
            index = torch.as_tensor(indices)
            q, r = self.images[index], self.images[index].flip(-1) + self.noise[index]
            if augmentation is not None:
                q, r = augmentation(q, r)
            yield q, r, torch.as_tensor(self.labels[indices])


class _Jitter:
    """A batch augmentation with its own generator (its state must be checkpointed)."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(7)

    def __call__(self, q, r):
        return q + 0.1 * torch.rand(q.shape, generator=self.generator), r


class _RandomPairs(_Pairs):
    """Random augmentation inside __getitem__: in DataLoader workers, it draws from the
    workers' seeds."""

    def __getitem__(self, i):
        q, r, label = super().__getitem__(i)
        return q + 0.1 * torch.rand(q.shape), r, label


@pytest.mark.parametrize("source", ["dataloader", "batches", "workers"])
def test_fit_resume_in_process_matches_uninterrupted(tmp_path, monkeypatch, source):
    from gsra_salad.training import loop

    pairs = {"dataloader": _Pairs, "batches": _InMemoryPairs, "workers": _RandomPairs}[source](24)
    workers = 2 if source == "workers" else 0

    def run(directory, resume=False):
        seed_everything(1)
        model, loss = _model(), InfoNCELoss()
        config = _config(directory, epochs=3, mining="gps", eval_every=2, workers=workers)
        fit(model, loss, TrainData(pairs, _Jitter()), _task(pairs), config, resume=resume)
        return model, loss

    full, full_loss = run(tmp_path / "a")
    real, calls = loop.train_one_epoch, []

    def dies_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    assert load_training_state(tmp_path / "b" / "last")["progress"]["next_epoch"] == 2
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "stale": true}\n')  # as if killed after writing this line
    torch.manual_seed(12345)  # a different global RNG state: resume restores the saved one
    resumed, resumed_loss = run(tmp_path / "b", resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert torch.equal(full_loss.logit_scale, resumed_loss.logit_scale)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert "stale" not in lines[-1]


def test_fit_bf16_autocast_on_cpu_with_gsra(tmp_path):
    model = CrossViewGeoLocalizer(
        TinyCNN(32),
        GlobalSpatialRelationAttention(32, (2, 2), groups=8),
        SALAD(32, 4, 4, token_dim=0, dropout=0.0),
    )
    pairs = _Pairs(16)
    result = fit(
        model, InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, epochs=1, precision="bf16")
    )
    assert math.isfinite(result.state.history[-1]["loss"])
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "lr"),
        (dict(mining="random"), "mining"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_fit_explains_missing_positions_and_mining_set(tmp_path):
    pairs = _Pairs(16)
    pairs.positions = None
    with pytest.raises(ValueError, match="positions"):
        fit(_model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, mining="gps"))
    with pytest.raises(ValueError, match="mining_set"):
        fit(_model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, mining="embedding"))
    with pytest.raises(ValueError, match="batch"):
        fit(_model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, batch_size=32))


def test_embedding_mining_rebuilds_batches_from_neighbours(tmp_path):
    pairs = _Pairs(24)
    fit(
        _model(), InfoNCELoss(), TrainData(pairs, mining_set=_Side(pairs, 1)), _task(pairs),
        _config(tmp_path, epochs=2, mining="embedding", eval_every=1, mining_neighbours=5),
    )  # fmt: skip
    sampler = load_training_state(tmp_path / "last")["sampler"]
    assert sampler["neighbours"] is not None and sampler["neighbours"].shape == (24, 5)


def test_sample4geo_mining_gps_first_then_query_to_reference_neighbours(tmp_path):
    pairs = _Pairs(24)
    config = _config(
        tmp_path, epochs=2, mining="gps+embedding", mining_from="query", eval_every=1,
        mining_neighbours=6, neighbours_per_anchor=4, mining_nearest=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="mining_queries"):
        fit(_model(), InfoNCELoss(), TrainData(pairs, mining_set=_Side(pairs, 1)),
            _task(pairs), config)  # fmt: skip
    data = TrainData(pairs, mining_set=_Side(pairs, 1), mining_queries=_Side(pairs, 0))
    model = _model()
    fit(model, InfoNCELoss(), data, _task(pairs), config)
    neighbours = load_training_state(tmp_path / "last")["sampler"]["neighbours"].numpy()
    # the last evaluation's ground->satellite neighbours, the own reference left out
    model.eval()
    with torch.no_grad():
        queries = torch.stack([model.embed(x[None], view="query")[0] for x, _ in _Side(pairs, 0)])
        refs = torch.stack([model.embed(x[None], view="reference")[0] for x, _ in _Side(pairs, 1)])
    scores = queries @ refs.T
    scores.fill_diagonal_(-float("inf"))
    assert neighbours.shape == (24, 6)
    assert (neighbours != np.arange(24)[:, None]).all()
    assert np.array_equal(neighbours[:, 0], scores.argmax(1).numpy())


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path):
    class Exploding(nn.Module):
        def forward(self, q, r, *, labels=None):
            return (q * r).sum() * float("nan")

    pairs = _Pairs(16)
    with pytest.raises(FloatingPointError, match="learning rate"):
        fit(_model(), Exploding(), pairs, _task(pairs), _config(tmp_path, epochs=1))


def test_nothing_below_training_imports_it():
    """Layering: training sits on top; ops, layers, models, data, losses, evaluation never
    import it (only the recipes and the command line, above it, do)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "gsra_salad"
    for path in package.rglob("*.py"):
        parts = set(path.relative_to(package).parts)
        if {"training", "recipes", "cli", "cli.py", "__main__.py"} & parts:
            continue  # the layers above training: recipes and the command lines
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            assert not any(n.split(".")[-1] == "training" or ".training" in n for n in names), (
                path,
                names,
            )


def test_evaluate_on_a_gallery_smaller_than_k():
    from gsra_salad.training import evaluate

    pairs = _Pairs(3)
    metrics = evaluate(_model(), _task(pairs), TrainConfig(workers=0, progress=False))["val"]
    assert set(metrics) == {"R@1", "R@5", "R@10", "R@1%", "queries", "references"}
    assert metrics["R@5"] == metrics["R@10"] == 100.0  # every match is within 3 places
    assert metrics["references"] == 3


def test_no_training_function_takes_more_than_six_stateful_arguments():
    """The run state travels as one TrainState: no function of gsra_salad/training juggles the
    optimizer, scheduler, scaler, sampler... one by one (switches and the config not counted)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "gsra_salad" / "training"
    crowded = []
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            stateful = [
                a.arg for a in args
                if a.arg not in ("self", "cls", "config")
                and not (isinstance(a.annotation, ast.Name) and a.annotation.id in ("bool", "int"))
            ]  # fmt: skip
            if len(stateful) > 6:
                crowded.append(f"{path.name}:{node.name} {stateful}")
    assert not crowded, crowded
