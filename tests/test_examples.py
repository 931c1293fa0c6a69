"""The example scripts end to end, at a reduced size: each --demo, kill-and-resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._helpers import free_port

pytest.importorskip("PIL")
pytest.importorskip("scipy")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--demo-locations", "16", "--batch-size", "8", "--no-progress", "--workers", "0"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("GSRA_SALAD_DEBUG", None)
    return env


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        cwd=ROOT,
    )


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from gsra_salad import CrossViewGeoLocalizer

    return CrossViewGeoLocalizer.from_pretrained(directory).state_dict()


KEYS = {"dataset", "split", "queries", "references", "world_size", "R@1", "R@5", "R@10", "R@1%"}


@pytest.mark.parametrize(
    "script, dataset, extra",
    [
        ("train_cvusa.py", "cvusa", []),
        ("train_cvact.py", "cvact", ["--split", "test"]),
        ("train_university.py", "university1652", []),
    ],
)
def test_demo_runs_end_to_end(tmp_path, script, dataset, extra):
    out = tmp_path / "run"
    result = _run(script, "--demo", *TINY, "--epochs", "2", "--output-dir", str(out), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _json_lines(result.stdout)
    assert result.stdout.strip().splitlines()[-1].startswith("{")
    if dataset == "university1652":
        assert [line["direction"] for line in lines] == ["drone->satellite", "satellite->drone"]
        assert all("AP" in line for line in lines)
        # both scorings, each labelled: official (distractors kept) and the papers' (dropped)
        for line in lines:
            assert line["scoring"].startswith("official")
            assert "dropped" in line["papers"]["scoring"]
            assert line["papers"]["references"] <= line["references"]
            assert {"R@1", "R@1%", "AP"} <= set(line["papers"])
        # the distractors are satellite-only buildings: only drone->satellite drops some
        assert lines[0]["papers"]["references"] < lines[0]["references"]
        assert "[official University-1652 protocol" in result.stdout
    else:
        assert len(lines) == 1
    for line in lines:
        assert KEYS <= set(line)
        assert line["dataset"] == dataset and line["world_size"] == 1
        assert 0.0 <= line["R@1"] <= line["R@5"] <= line["R@10"] <= 100.0
    assert lines[0]["split"] == (
        "test" if extra else ("test" if dataset == "university1652" else "val")
    )
    assert "colour-histogram baseline" in result.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (out / "last" / "training_state.pt").is_file()
    assert (out / "best" / "config.json").is_file()
    # the checkpoint knows its inputs: the demo's reference tiles are polar-transformed
    from gsra_salad import CrossViewGeoLocalizer, InputConfig

    recorded = CrossViewGeoLocalizer.from_pretrained(out / "best").input_config
    crop = 0.7 if dataset == "university1652" else 1.0
    assert recorded["reference"] == InputConfig((32, 128), view_transform="polar", polar_crop=crop)
    assert recorded["query"].image_size == (32, 128)


def test_kill_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    args = ["--demo", *TINY, "--epochs", "4", "--seed", "3"]
    straight = tmp_path / "straight"
    result = _run("train_cvusa.py", *args, "--output-dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "train_cvusa.py"), *args, "--output-dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300
        while not (killed / "last" / "training_state.pt").exists():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    state = torch.load(killed / "last" / "training_state.pt", weights_only=True)
    assert state["progress"]["next_epoch"] < 4

    resumed = _run("train_cvusa.py", *args, "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(straight / "last"), _weights(killed / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _json_lines(resumed.stdout) == _json_lines(result.stdout)
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # no line twice, even if the kill fell after one was written

    # --eval-only on the saved checkpoint reproduces the run's final numbers
    evaluated = _run(
        "train_cvusa.py", *args, "--eval-only", "--checkpoint", str(straight / "last"),
        "--output-dir", str(tmp_path / "eval"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    keep = ("R@1", "R@5", "queries")
    assert [{k: x[k] for k in keep} for x in _json_lines(evaluated.stdout)] == [
        {k: x[k] for k in keep} for x in _json_lines(result.stdout)
    ]


def test_two_process_torchrun_on_cpu(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(EXAMPLES / "train_cvusa.py"),
        "--demo", *TINY, "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _json_lines(result.stdout)
    assert len(lines) == 1, result.stdout  # only rank 0 prints
    assert lines[0]["world_size"] == 2 and lines[0]["queries"] == 16
    assert (tmp_path / "ddp" / "last" / "config.json").is_file()
    # the sharded evaluation (2 ranks) agrees with a single-process one of the same weights
    single = _run(
        "train_cvusa.py", "--demo", *TINY, "--eval-only", "--checkpoint",
        str(tmp_path / "ddp" / "last"), "--output-dir", str(tmp_path / "eval"),
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    (line,) = _json_lines(single.stdout)
    keep = ("queries", "references", "R@1", "R@5", "R@10")
    assert {k: line[k] for k in keep} == {k: lines[0][k] for k in keep}


def test_wrong_data_root_is_a_one_line_error(tmp_path):
    scripts = ["train_cvusa.py", "train_cvact.py", "train_university.py"]
    processes = [  # in parallel: each is mostly the interpreter starting and importing torch
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / s), "--data-root", str(tmp_path / "missing")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for s in scripts
    ]
    for script, process in zip(scripts, processes):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, script
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "missing" in lines[0], (script, stderr)


def test_missing_image_is_a_one_line_error(tmp_path):
    from gsra_salad.data import synthetic

    root = synthetic.write_cvusa(tmp_path / "cvusa", num_train=4, num_val=2, tile_size=32)
    next((root / "streetview" / "panos").iterdir()).unlink()
    result = _run("train_cvusa.py", "--data-root", str(root), "--epochs", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [x for x in result.stderr.splitlines() if "error:" in x]  # (+ INFO log lines)
    assert len(errors) == 1 and "not found" in errors[0], result.stderr


def test_custom_models_doc_snippets_run(tmp_path):
    """docs/custom-models.md's code blocks run as written, in order, in one namespace."""
    import re

    text = (ROOT / "docs" / "custom-models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    namespace: dict = {"__name__": "custom_models_doc"}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "docs/custom-models.md", "exec"), namespace)
    assert namespace["descriptors"].shape == (4, 160)
    assert torch.allclose(namespace["descriptors"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert set(namespace["result"].metrics["val"]) >= {"R@1", "queries", "references"}
    assert (Path(namespace["config"].output_dir) / "last" / "model_state.pt").is_file()


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_stopped_demo_removes_its_data_and_says_how_to_continue(tmp_path, sig, code, word):
    import tempfile

    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "train_cvusa.py"), "--demo", *TINY, "--epochs", "50",
         "--output-dir", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
    )  # fmt: skip
    pattern = f"gsra_salad_demo_{process.pid}_*"
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "last" / "training_state.pt").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert list(Path(tempfile.gettempdir()).glob(pattern))  # the demo's data, in use
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert not list(Path(tempfile.gettempdir()).glob(pattern))  # removed on the way out
    assert "Traceback" not in stderr  # the log lines, then one line that says how to go on
    last = stderr.strip().splitlines()[-1]
    assert word in last and "--resume" in last, stderr
