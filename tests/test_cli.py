"""The recipes and the command line, in-process (no subprocess): one source for every default,
an honest resume, a checkpoint's own preprocessing, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gsra_salad import CrossViewGeoLocalizer, InputConfig, recipes
from gsra_salad.cli import main, train_main
from gsra_salad.training import TrainConfig

pytest.importorskip("PIL")
pytest.importorskip("torchvision")

TINY = ["--demo", "--demo-locations", "16", "--batch-size", "8", "--no-progress"]


def _train(capsys, *args, dataset="cvusa"):
    code = train_main(dataset, list(args), prog="train")
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return code, lines, err.strip()


# -- recipes -----------------------------------------------------------------------------------


def test_every_recipe_is_importable_typed_and_consistent():
    for name in recipes.names():
        recipe = recipes.get(name)
        assert isinstance(recipe.train, TrainConfig)
        assert isinstance(recipe.query_input, InputConfig)
        assert recipe.name == name and recipe.demo == name.endswith("-demo")
        assert recipes.Recipe.from_dict(recipe.as_dict()) == recipe
    # the defaults are the published recipes, under the dataset's name
    for dataset, named in (
        ("cvusa", "sample4geo-cvusa"),
        ("cvact", "sample4geo-cvact"),
        ("university1652", "lrfr-university1652"),
    ):
        assert recipes.get(dataset) == dataclasses.replace(recipes.get(named), name=dataset)
    assert recipes.get("cvusa").train.mining == "gps+embedding"
    assert recipes.get("lrfr-cvusa").loss == "triplet" and recipes.get("cvusa").loss == "infonce"
    lrfr = recipes.get("university1652").train
    assert (lrfr.batch_size, lrfr.lr, lrfr.schedule, lrfr.warmup_epochs) == (32, 1e-4, "linear", 0)


def test_recipe_replace_routes_fields_and_refuses_unknown_ones():
    recipe = recipes.get("cvusa-demo").replace(epochs=2, loss="triplet", reference_size=(16, 64))
    assert recipe.train.epochs == 2 and recipe.loss == "triplet"
    assert recipe.reference_input == InputConfig((16, 64), view_transform="polar")
    assert recipes.get("cvusa-demo").train.epochs == 6  # the catalogue is unchanged
    plain = dataclasses.replace(recipes.get("cvusa"), loss="infonce")
    assert plain.loss == "infonce"
    with pytest.raises(TypeError, match=r"unknown field.*'epoch'"):
        recipes.get("cvusa").replace(epoch=3)
    with pytest.raises(KeyError, match="known recipes: cvact"):
        recipes.get("kitti")


def test_the_demo_recipe_builds_a_model_that_records_its_inputs():
    model = recipes.build_model(recipes.get("university1652-demo"))
    assert model.input_config["reference"].polar_crop == 0.7
    assert type(recipes.build_loss(recipes.get("cvusa-demo"))).__name__ == "InfoNCELoss"


def test_help_shows_every_default_with_its_source(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "university1652", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    published, demo = recipes.get("university1652"), recipes.get("university1652-demo")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("output_dir", "progress"):
            continue
        flag = "--" + field.name.replace("_", "-")
        assert flag in shown, flag
    assert f"default: 0.0001 ({published.source}); --demo: {demo.train.lr}" in shown
    assert "default: 384 x 384" in shown and "--demo: 32 x 128" in shown


# -- runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo run (1 epoch) that the tests below resume, extend or evaluate."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = train_main("cvusa", [*TINY, "--epochs", "1", "--output-dir", str(out)], prog="train")
    assert code == 0
    return out


def test_the_raw_tile_demo_trains_the_papers_pipeline(capsys, tmp_path):
    """--demo --raw: raw 64 x 64 tiles, SmallConvNeXt, one GSRA per view; recorded so that the
    checkpoint rebuilds with from_pretrained."""
    out = tmp_path / "raw"
    args = [*TINY, "--raw", "--epochs", "1", "--warmup-epochs", "0", "--output-dir", str(out)]
    code, lines, err = _train(capsys, *args)
    assert code == 0, err
    assert len(lines) == 1 and 0.0 <= lines[0]["R@1"] <= 100.0
    saved = recipes.Recipe.from_dict(json.loads((out / "recipe.json").read_text()))
    assert saved.name == "cvusa-raw-demo" and saved.model == "demo-convnext"
    model = CrossViewGeoLocalizer.from_pretrained(out / "best")
    assert model.input_config["reference"] == InputConfig((64, 64))
    assert type(model.backbone).__name__ == "SmallConvNeXt"
    assert model.reference_attention is not None  # 4 x 4 tile map, 2 x 8 panorama map
    code, _, err = _train(capsys, "--data-root", str(tmp_path), "--raw")
    assert code == 2 and "--raw only applies to --demo" in err


def test_the_run_folder_holds_the_resolved_recipe(demo_run):
    saved = recipes.Recipe.from_dict(json.loads((demo_run / "recipe.json").read_text()))
    assert saved.name == "cvusa-demo" and saved.train.epochs == 1 and saved.train.batch_size == 8
    assert saved.demo_locations == 16


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--batch-size", "4"], "--batch-size was 8, now 4"),
        (["--lr", "0.01"], "--lr was 0.002, now 0.01"),
        (["--loss", "triplet"], "loss was 'infonce', now 'triplet'"),
        (["--demo-locations", "20"], "demo_locations was 16, now 20"),
    ],
)
def test_resume_with_a_changed_flag_is_one_line_naming_it(capsys, demo_run, flags, named):
    before = {p: p.stat().st_mtime_ns for p in demo_run.rglob("*")}
    args = [*TINY, "--epochs", "1", "--output-dir", str(demo_run), "--resume"]
    args = [a for a in args if a not in ("--batch-size", "8", "--demo-locations", "16")] + [
        "--batch-size", "8", "--demo-locations", "16",
    ]  # fmt: skip
    for flag, value in zip(flags[::2], flags[1::2]):
        i = args.index(flag) if flag in args else None
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    code, _, err = _train(capsys, *args)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert named in err and "nothing was written" in err
    assert {p: p.stat().st_mtime_ns for p in demo_run.rglob("*")} == before


def test_a_fresh_run_into_a_run_folder_is_refused_with_the_way_out(capsys, demo_run):
    code, _, err = _train(capsys, *TINY, "--epochs", "1", "--output-dir", str(demo_run))
    assert code == 2 and "already holds a run" in err
    assert "--resume" in err and "--overwrite" in err


def test_extension_and_resume_continue_the_run(capsys, demo_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    code, lines, err = _train(
        capsys, *TINY, "--epochs", "2", "--output-dir", str(run), "--resume", "--workers", "0"
    )
    assert code == 0, err
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and lines[0]["queries"] == 16


def test_eval_only_on_another_folder_uses_the_checkpoints_preprocessing(capsys, demo_run, tmp_path):
    from gsra_salad.data import synthetic

    root = synthetic.write_cvusa(tmp_path / "other", num_train=2, num_val=12, seed=9)
    args = ["--eval-only", "--checkpoint", str(demo_run / "last"), "--data-root", str(root)]
    code, lines, err = _train(capsys, *args, "--workers", "0", "--no-progress")
    assert code == 0, err
    assert lines[0]["queries"] == 12
    # the same images scored by hand with the checkpoint's own transforms agree
    from gsra_salad.data import CVUSA, create_transform
    from gsra_salad.evaluation import evaluate_retrieval

    model = CrossViewGeoLocalizer.from_pretrained(demo_run / "last")
    data = CVUSA(
        root,
        "val",
        query_transform=create_transform(model, "query"),
        reference_transform=create_transform(model, "reference"),
    )
    q = torch.stack([data[i][0] for i in range(len(data))])
    r = torch.stack([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        metrics = evaluate_retrieval(
            model.embed(q, "query"), model.embed(r, "reference"), data.labels, data.labels
        )
    assert round(metrics["R@1"], 2) == lines[0]["R@1"]
    # a size that contradicts the checkpoint is one clear line
    code, _, err = _train(capsys, *args, "--query-size", "140", "768")
    assert code == 2 and "contradicts the checkpoint" in err and "32 x 128" in err


def test_checkpoint_without_eval_only_fine_tunes_from_it(capsys, demo_run, tmp_path):
    start = CrossViewGeoLocalizer.from_pretrained(demo_run / "last").state_dict()
    seen = {}

    from gsra_salad.training import loop

    real = loop.train_one_epoch

    def spy(module, state, *args, **kwargs):
        seen.update({k: v.clone() for k, v in state.model.state_dict().items()})
        return real(module, state, *args, **kwargs)

    loop.train_one_epoch = spy
    try:
        code, _, err = _train(
            capsys, *TINY, "--epochs", "1", "--checkpoint", str(demo_run / "last"),
            "--output-dir", str(tmp_path / "tuned"),
        )  # fmt: skip
    finally:
        loop.train_one_epoch = real
    assert code == 0, err
    for key, value in start.items():  # training started from the checkpoint's weights
        assert torch.equal(seen[key], value), key


def test_a_corrupted_last_is_named_not_restarted(capsys, demo_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "last" / "training_state.pt").write_bytes(b"\x00" * 10)
    code, _, err = _train(capsys, *TINY, "--epochs", "2", "--output-dir", str(run), "--resume")
    assert code == 2 and len(err.splitlines()) == 1
    assert "training_state.pt" in err and "truncated or corrupt" in err and "best" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--clip-value", "0"], "--clip-value must be > 0"),
        (["--seed", "-5"], "--seed must be >= 0"),
        (["--device", "tpu"], "--device tpu"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--grad-checkpointing"], "grad_checkpointing=True: this model does not support"),
        (["--eval-only"], "--eval-only needs --checkpoint"),
        (["--resume", "--overwrite"], "exclude each other"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, tmp_path, args, named):
    code, _, err = _train(capsys, *TINY, "--output-dir", str(tmp_path / "x"), *args)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert named in err, err


def test_clip_value_none_turns_clipping_off(capsys):
    import argparse

    from gsra_salad.cli._train import add_arguments, resolve_recipe

    parser = argparse.ArgumentParser()
    add_arguments(parser, "cvusa")
    args = parser.parse_args(["--demo", "--clip-value", "none"])
    args.dataset = "cvusa"
    assert resolve_recipe(args).train.clip_value is None
    args = parser.parse_args(["--demo"])
    args.dataset = "cvusa"
    assert resolve_recipe(args).train.clip_value == 100.0


def test_demo_with_data_root_is_the_demo_recipe_on_that_folder(capsys, tmp_path):
    import argparse

    from gsra_salad.cli._train import add_arguments, resolve_recipe

    parser = argparse.ArgumentParser()
    add_arguments(parser, "cvusa")
    args = parser.parse_args(["--demo", "--data-root", str(tmp_path)])
    args.dataset = "cvusa"
    assert resolve_recipe(args) == recipes.get("cvusa-demo").replace(progress=True)
    code, _, err = _train(capsys, "--output-dir", str(tmp_path / "x"))
    assert code == 2 and err == "train: error: one of --data-root and --demo is required"
    code, _, err = _train(capsys, *TINY, "--data-root", str(tmp_path), "--output-dir",
                          str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "--demo-locations only applies to --demo without --data-root" in err
    code, _, err = _train(capsys, "--demo", "--data-root", str(tmp_path / "none"))
    assert code == 2 and "--data-root" in err and "no such directory" in err


def test_stale_demo_data_of_killed_runs_is_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from gsra_salad.cli import _train

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f"gsra_salad_demo_{dead}_abc"
    alive = tmp_path / f"gsra_salad_demo_{__import__('os').getpid()}_def"
    other = tmp_path / "gsra_salad_demo_unrelated"
    for folder in (stale, alive, other):
        folder.mkdir()
    _train._clean_stale_demos()
    assert not stale.exists() and alive.exists() and other.exists()


def test_a_missing_extra_is_one_line_with_the_whole_install_command(capsys, tmp_path, monkeypatch):
    """An ImportError from an optional dependency keeps its closing quote: the pip command can
    be pasted as printed."""
    import sys

    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2.functional", None)
    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2", None)
    code, _, err = _train(capsys, *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "x"))
    assert code == 2 and err.startswith("train: error: torchvision.transforms.v2")
    assert err.endswith("pip install 'gsra-salad[torchvision]'")
