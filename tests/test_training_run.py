"""The run around the step: one run state, an honest resume, callbacks, the metric that picks
best/, and everything that fit checks before its first step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gsra_salad import SALAD, CrossViewGeoLocalizer
from gsra_salad.data import UniqueLabelBatchSampler
from gsra_salad.losses import InfoNCELoss, SoftMarginTripletLoss
from gsra_salad.models import TinyCNN
from gsra_salad.training import (
    Callback,
    CheckpointError,
    ResumeError,
    RetrievalTask,
    TrainConfig,
    TrainData,
    TrainState,
    WarmupSchedule,
    build_train_state,
    fit,
    load_training_state,
    resume_changes,
    seed_everything,
)

from .test_training import _config, _model, _Pairs, _Side, _task


def _run(directory, pairs, *, model=None, loss=None, resume=False, overwrite=False, **kw):
    seed_everything(1)
    model = model if model is not None else _model()
    loss = loss if loss is not None else InfoNCELoss()
    config = _config(directory, **{"epochs": 2, "eval_every": 2, **kw})
    result = fit(model, loss, pairs, _task(pairs), config, resume=resume, overwrite=overwrite)
    return model, result


def _snapshot(directory):
    """Every file of a run folder with its bytes (to prove that nothing was touched)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- the output folder -------------------------------------------------------------------------


def test_a_fresh_run_into_a_folder_that_holds_a_run_is_refused_and_touches_nothing(tmp_path):
    pairs = _Pairs(16)
    _run(tmp_path, pairs)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run.*resume=True.*overwrite=True"):
        _run(tmp_path, pairs, epochs=1)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_the_run(tmp_path):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=2)
    (tmp_path / "notes.txt").write_text("mine")  # not a run file: kept
    _run(tmp_path, pairs, epochs=1, eval_every=1, overwrite=True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run.json").read_text())["config"]["epochs"] == 1


def test_an_output_dir_that_is_a_file_or_not_writable_fails_before_training(tmp_path):
    pairs = _Pairs(16)
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        _run(target, pairs)
    with pytest.raises(ValueError, match="is not writable"):  # its parent is a file
        _run(target / "run", pairs)


def test_leftovers_of_an_interrupted_save_are_cleaned_by_the_next_run(tmp_path):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=1, eval_every=1)
    stale = tmp_path / ".last.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _run(tmp_path, pairs, epochs=2, eval_every=1, resume=True)
    assert not stale.exists()


# -- an honest resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"batch_size": 4}, "batch_size was 8, now 4"),
        ({"lr": 1e-3}, "lr was 0.003, now 0.001"),
        ({"schedule": "linear"}, "schedule was 'cosine', now 'linear'"),
        ({"clip_value": 5.0}, "clip_value was 100.0, now 5.0"),
        ({"seed": 2}, "seed was 1, now 2"),
    ],
)
def test_resume_with_a_changed_setting_names_it_and_writes_nothing(tmp_path, change, named):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=1, eval_every=1)
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeError, match=named):
        _run(tmp_path, pairs, epochs=2, eval_every=1, resume=True, **change)
    assert _snapshot(tmp_path) == before


def test_resume_names_every_changed_field_at_once():
    saved = TrainConfig(epochs=4).as_dict()
    with pytest.raises(ResumeError) as err:
        resume_changes(saved, TrainConfig(epochs=4, lr=1e-4, batch_size=64), trained_epochs=2)
    message = str(err.value)
    assert "batch_size was 128, now 64" in message and "lr was 0.001, now 0.0001" in message
    assert "\n" not in message


def test_resume_with_another_loss_or_model_or_data_is_refused(tmp_path):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=1, eval_every=1)
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeError, match="the loss was InfoNCELoss"):
        _run(tmp_path, pairs, loss=SoftMarginTripletLoss(), resume=True, eval_every=1)
    other = CrossViewGeoLocalizer(TinyCNN(8), None, SALAD(8, 4, 4, token_dim=0, dropout=0.0))
    with pytest.raises(ResumeError, match="the model was"):
        _run(tmp_path, pairs, model=other, resume=True, eval_every=1)
    with pytest.raises(ResumeError, match="training pairs was 16, now 24"):
        _run(tmp_path, _Pairs(24), resume=True, eval_every=1)
    assert _snapshot(tmp_path) == before


def test_resume_may_change_workers_eval_cadence_and_progress(tmp_path):
    pairs = _Pairs(16)
    _, full = _run(tmp_path / "full", pairs, epochs=2, eval_every=1)
    _run(tmp_path / "split", pairs, epochs=1, eval_every=1)
    model, _ = _run(
        tmp_path / "split", pairs, epochs=2, eval_every=2, resume=True, progress=False,
        eval_batch_size=3,
    )  # fmt: skip
    for key, value in full.state.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_an_extension_trains_as_if_planned_that_long(tmp_path):
    """2 epochs, then resumed to 4: the steps of epochs 3-4 use the 4-epoch schedule."""
    pairs = _Pairs(16)
    _, short = _run(tmp_path, pairs, epochs=2, eval_every=1, warmup_epochs=0.5)
    steps = short.state.step
    lrs = []

    class LearningRates(Callback):
        def on_step_end(self, state, loss):
            lrs.append((state.step, state.optimizer.param_groups[0]["lr"]))

    seed_everything(1)
    model = _model()
    config = _config(tmp_path, epochs=4, eval_every=1, warmup_epochs=0.5)
    result = fit(
        model, InfoNCELoss(), pairs, _task(pairs), config, resume=True,
        callbacks=[LearningRates()],
    )  # fmt: skip
    schedule = WarmupSchedule("cosine", 2 * steps, round(0.5 * steps / 2))
    assert lrs[0][0] == steps + 1 and len(lrs) == steps
    for step, lr in lrs:  # the lr after step s is lr_max * schedule(s)
        assert math.isclose(lr, 3e-3 * schedule(step), rel_tol=1e-12), step
    assert result.state.next_epoch == 4 and lrs[-1][1] == 0.0


def test_resume_cannot_go_below_the_epochs_already_trained(tmp_path):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=2, eval_every=1)
    with pytest.raises(ResumeError, match="epochs 1 is fewer than the 2"):
        _run(tmp_path, pairs, epochs=1, eval_every=1, resume=True)


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete_weights", "corrupt_weights"])
def test_a_damaged_last_checkpoint_is_named_never_restarted(tmp_path, damage):
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=1, eval_every=1)
    last = tmp_path / "last"
    state_file = last / "training_state.pt"
    weights = next(p for p in last.iterdir() if p.name not in ("config.json", state_file.name))
    if damage == "truncate":
        state_file.write_bytes(state_file.read_bytes()[:100])
    elif damage == "empty":
        state_file.write_bytes(b"")
    elif damage == "delete_weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    lines = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises((CheckpointError, FileNotFoundError)) as err:
        _run(tmp_path, pairs, epochs=2, eval_every=1, resume=True)
    message = str(err.value)
    assert str(last) in message or str(weights) in message
    assert (tmp_path / "metrics.jsonl").read_text() == lines  # nothing restarted


def test_resume_without_a_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"training_state\.pt"):
        _run(tmp_path, _Pairs(16), resume=True)


# -- seeds -------------------------------------------------------------------------------------


def test_two_identical_fit_calls_give_identical_weights_with_dropout(tmp_path):
    pairs = _Pairs(16)

    def once(directory):
        torch.manual_seed(0)
        model = CrossViewGeoLocalizer(TinyCNN(16), None, SALAD(16, 4, 4, token_dim=0, dropout=0.3))
        torch.manual_seed(999 if directory.name == "b" else 5)  # fit must not depend on this
        fit(model, InfoNCELoss(), pairs, _task(pairs), _config(directory, epochs=2, seed=3))
        return model.state_dict()

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- callbacks and best/ -----------------------------------------------------------------------


def test_callbacks_see_every_event_in_order(tmp_path):
    events = []

    class Recorder(Callback):
        def on_fit_start(self, state):
            events.append(("start", state.next_epoch))

        def on_step_end(self, state, loss):
            assert loss.dim() == 0 and not loss.requires_grad
            events.append(("step", state.step))

        def on_evaluate_end(self, state, metrics):
            events.append(("evaluate", sorted(metrics)))

        def on_epoch_end(self, state, record):
            assert (tmp_path / "last" / "training_state.pt").is_file()
            events.append(("epoch", record["epoch"]))

        def on_fit_end(self, state, result):
            events.append(("end", result.state is state))

    pairs = _Pairs(16)
    fit(
        _model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, epochs=2, eval_every=2),
        callbacks=[Recorder()],
    )  # fmt: skip
    assert events == [
        ("start", 0), ("step", 1), ("step", 2), ("epoch", 1), ("step", 3), ("step", 4),
        ("evaluate", ["val"]), ("epoch", 2), ("end", True),
    ]  # fmt: skip


def test_callbacks_must_be_callback_objects(tmp_path):
    pairs = _Pairs(16)
    with pytest.raises(TypeError, match="Callback"):
        fit(_model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path), callbacks=[print])


def test_best_metric_picks_the_task_and_metric(tmp_path):
    pairs = _Pairs(16)
    tasks = [*_task(pairs), RetrievalTask("swapped", _Side(pairs, 1), _Side(pairs, 0))]
    config = _config(tmp_path, epochs=3, eval_every=1, best_metric="swapped/R@5")
    result = fit(_model(), InfoNCELoss(), pairs, tasks, config)
    values = [r["metrics"]["swapped"]["R@5"] for r in result.history]
    assert result.state.best_metric == max(values)
    assert result.state.best_epoch == values.index(max(values))
    with pytest.raises(ValueError, match="no task 'nope'"):
        fit(
            _model(), InfoNCELoss(), pairs, tasks,
            _config(tmp_path / "x", epochs=1, best_metric="nope/R@1"),
        )  # fmt: skip


# -- checked before the first step -------------------------------------------------------------


class _Unregistered(nn.Module):
    def forward(self, x):
        return x.mean((-2, -1), keepdim=True).expand(-1, -1, 4, 4).repeat(1, 4, 1, 1)


def test_a_model_that_cannot_be_saved_fails_before_training(tmp_path):
    model = CrossViewGeoLocalizer(_Unregistered(), None, SALAD(12, 4, 4, token_dim=0))
    pairs = _Pairs(16)
    with pytest.raises(ValueError, match=r"cannot be saved.*before training"):
        fit(model, InfoNCELoss(), pairs, _task(pairs), _config(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_query_without_reference_fails_before_training(tmp_path):
    pairs = _Pairs(16)
    references = _Side(pairs, 1)
    references.labels = [*range(1, 16), 99]
    queries = _Side(pairs, 0)
    queries.labels = list(range(16))
    task = [RetrievalTask("val", queries, references)]
    with pytest.raises(ValueError, match=r"1 query label.*no reference.*\[0\]"):
        fit(_model(), InfoNCELoss(), pairs, task, _config(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_grad_checkpointing_on_a_model_without_it_is_a_clear_error(tmp_path):
    pairs = _Pairs(16)
    with pytest.raises(ValueError, match="grad_checkpointing=True: this model does not support"):
        fit(
            _model(), InfoNCELoss(), pairs, _task(pairs), _config(tmp_path, grad_checkpointing=True)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_value": 0}, "clip_value must be > 0"),
        ({"clip_norm": -1.0}, "clip_norm must be > 0"),
        ({"seed": -5}, "seed must be >= 0"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"warmup_epochs": 5, "epochs": 2}, "warmup_epochs must be in"),
        ({"best_metric": "a/b/c"}, "best_metric"),
    ],
)
def test_config_names_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# -- the run state -----------------------------------------------------------------------------


def test_train_state_round_trips_through_its_state_dict():
    torch.manual_seed(0)
    model, loss = nn.Linear(3, 3), InfoNCELoss()
    sampler = UniqueLabelBatchSampler(list(range(8)), 4)
    config = TrainConfig(epochs=2, batch_size=4)
    state = build_train_state(model, loss, sampler, config)
    model(torch.ones(3)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step, state.next_epoch, state.best_metric = 1, 1, 12.5
    state.sampler.set_epoch(1)
    saved = state.state_dict()
    torch.save(saved, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and values only

    other_model = nn.Linear(3, 3)
    other = build_train_state(
        other_model, InfoNCELoss(), UniqueLabelBatchSampler(list(range(8)), 4), config
    )
    other.load_state_dict(saved)
    assert isinstance(other, TrainState)
    assert (other.step, other.next_epoch, other.best_metric) == (1, 1, 12.5)
    assert other.sampler.epoch == 1
    assert torch.equal(other_model.weight, model.weight)
    assert other.scheduler.last_epoch == state.scheduler.last_epoch
    assert other.optimizer.state_dict()["state"][0]["step"] == 1


def test_last_checkpoint_of_an_older_version_still_resumes(tmp_path):
    """A training state of format 1 (before TrainState had a state dict) loads."""
    pairs = _Pairs(16)
    _run(tmp_path, pairs, epochs=1, eval_every=1)
    path = tmp_path / "last" / "training_state.pt"
    new = load_training_state(tmp_path / "last")
    old = {
        "format": 1,
        "state": new["progress"],
        "config": new["config"],
        "optimizer": new["optimizer"],
        "scheduler": new["scheduler"],
        "scaler": new["scaler"],
        "loss": new["loss"],
        "sampler": new["sampler"],
        "rng": new["rng"],
        "augmentation_rng": None,
    }
    torch.save(old, path)
    (tmp_path / "run.json").unlink()  # older runs had none
    _, result = _run(tmp_path, pairs, epochs=2, eval_every=1, resume=True)
    assert result.state.next_epoch == 2


def test_fit_takes_train_data_with_mining_set(tmp_path):
    pairs = _Pairs(16)
    data = TrainData(pairs, mining_set=_Side(pairs, 1))
    config = _config(tmp_path, epochs=2, eval_every=1, mining="embedding", mining_neighbours=3)
    result = fit(_model(), InfoNCELoss(), data, _task(pairs), config)
    assert result.state.sampler.neighbours.shape == (16, 3)


def test_a_callback_can_stop_the_run_after_a_step(tmp_path):
    class StopAt(Callback):
        def on_step_end(self, state, loss):
            if state.step == 3:
                state.request_stop()

    pairs = _Pairs(16)  # 2 steps per epoch
    result = fit(
        _model(), InfoNCELoss(), pairs, _task(pairs),
        _config(tmp_path, epochs=5, eval_every=5), callbacks=[StopAt()],
    )  # fmt: skip
    assert result.state.step == 3 and result.state.next_epoch == 2
    assert "R@1" in result.history[-1]["metrics"]["val"]  # the cut epoch was evaluated
    assert load_training_state(tmp_path / "last")["progress"]["step"] == 3
