"""Packaging: licence, what the sdist ships, test helpers, API docs of methods, benchmarks.

The build itself (wheel + sdist, the sdist's file list, the wheel in a fresh environment) runs
in .ci/run (.ci/check_dist.py); these tests check the inputs it depends on.
"""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_licence_file_and_spdx_expression():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "gsra-salad developers" in licence
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    # an SPDX expression (PEP 639), not the deprecated table; needs setuptools >= 77
    assert re.search(r'^license = "MIT"$', pyproject, flags=re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, flags=re.M)
    assert int(re.search(r'"setuptools>=(\d+)', pyproject).group(1)) >= 77
    assert re.search(r'^dev = \[.*"build>=', pyproject, flags=re.M)


def test_sdist_manifest_ships_tests_docs_examples_and_benchmarks():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for folder in ("tests", "docs", "examples", "benchmarks", ".ci"):
        assert folder in manifest, folder
    for name in ("LICENSE", "CHANGELOG.md", "README.md"):
        assert name in manifest, name
    # what the CI check demands exists in the checkout (else the check could never pass)
    required = _load(ROOT / ".ci" / "check_dist.py").SDIST_MUST_HOLD
    assert "tests/_helpers.py" in required and "tests/conftest.py" in required
    assert all((ROOT / path).is_file() for path in required), required


def test_git_ignores_what_the_examples_and_benchmarks_write():
    gitignore = ROOT / ".gitignore"
    if not gitignore.is_file():
        pytest.skip("not a git checkout (an unpacked sdist)")
    import subprocess

    def ignored(path: str) -> bool:
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        return done.returncode == 0

    assert ignored("runs/cvusa-demo/metrics.jsonl")  # the examples' default --output-dir
    assert ignored("benchmarks/results/bench_eval.json")  # what a benchmark writes
    assert ignored("region-index/meta.json")  # the README's localisation flow
    # the result files behind docs/synthetic-benchmark.md's tables are tracked
    assert not ignored("benchmarks/results/ablation_raw.json")


def test_no_test_imports_conftest():
    """pytest's conftest is not an importable module outside pytest's own path handling."""
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "conftest", f"{path.name}: import from tests._helpers"
            elif isinstance(node, ast.Import):
                assert all(a.name != "conftest" for a in node.names), path.name


def test_ci_builds_checks_and_installs_the_wheel_outside_the_checkout():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert "python -m build" in ci and "check_dist.py sdist" in ci
    assert 'venv "$dist/venv"' in ci and 'check_dist.py" smoke' in ci
    assert 'python -m "benchmarks.$name" --quick' in ci


def test_api_docs_list_the_methods_of_classes():
    pytest.importorskip("torchvision")  # gen_api imports every documented module
    text = _load(ROOT / "docs" / "gen_api.py").render()
    for method in (
        "lrfr",
        "from_lrfr_checkpoint",
        "save_pretrained",
        "from_pretrained",
        "embed",
        "set_grad_checkpointing",
        "descriptor_dim",
    ):
        assert f"#### `CrossViewGeoLocalizer.{method}`" in text, method
    assert "classmethod CrossViewGeoLocalizer.from_pretrained(directory" in text  # no cls
    assert "def CrossViewGeoLocalizer.embed(images" in text  # no self
    assert "#### `NeighbourBatchSampler.from_positions`" in text
    assert "CrossViewGeoLocalizer.forward" not in text  # nn.Module hooks stay out


BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_benchmarks_are_a_package_without_path_hacks():
    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    for name in ["_common", *BENCHMARKS]:
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert "sys.path" not in source, name
        assert "python benchmarks/" not in source, name
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert "python benchmarks/" not in performance
    assert all(f"python -m benchmarks.{name}" in performance for name in BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_import_as_modules(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
    assert "benchmarks._common" in sys.modules
