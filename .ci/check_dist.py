"""CI packaging check: the sdist carries what the tests and the README need; the wheel works.

python .ci/check_dist.py sdist DIST_DIR   # the sdist's file list (run anywhere)
python .ci/check_dist.py smoke            # run by the fresh venv holding only the wheel

``smoke`` must run outside the checkout: it fails if ``gsra_salad`` imports from a source tree
instead of an installed wheel.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

# paths relative to the sdist's top folder; a trailing "/" means "a folder with files in it"
SDIST_MUST_HOLD = [
    "LICENSE",
    "README.md",
    "CHANGELOG.md",
    "pyproject.toml",
    "gsra_salad/py.typed",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/_helpers.py",
    "tests/test_package.py",
    "docs/gen_api.py",
    "docs/api.md",
    "docs/performance.md",
    "examples/train_cvusa.py",
    "benchmarks/__init__.py",
    "benchmarks/_common.py",
]


def check_sdist(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [path for path in SDIST_MUST_HOLD if path not in names]
    tests = [n for n in names if n.startswith("tests/test_") and n.endswith(".py")]
    stray = [n for n in names if "__pycache__" in n or n.startswith(("build/", "dist/"))]
    if missing or len(tests) < 5 or stray:
        sys.exit(f"{sdist.name}: missing {missing}, {len(tests)} test files, stray files {stray}")
    print(f"{sdist.name}: {len(names)} files, {len(tests)} test files, all required paths present")


def smoke() -> None:
    import torch

    import gsra_salad
    from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention

    if "site-packages" not in Path(gsra_salad.__file__).parts:
        sys.exit(f"gsra_salad imported from {gsra_salad.__file__}, not from the installed wheel")
    for name in gsra_salad.__all__:
        getattr(gsra_salad, name)
    x = torch.randn(2, 32, 6, 6)
    y = GlobalSpatialRelationAttention(32, 6, groups=4)(x)
    desc = SALAD(num_channels=32, num_clusters=8, cluster_dim=4, token_dim=0)(y)
    assert y.shape == x.shape and desc.shape == (2, 32), (y.shape, desc.shape)
    assert torch.isfinite(desc).all()
    assert issubclass(CrossViewGeoLocalizer, torch.nn.Module)
    # the command line: the console script and python -m, from the wheel alone
    import subprocess

    script = Path(sys.executable).with_name("gsra-salad")
    for command in ([str(script)], [sys.executable, "-m", "gsra_salad"]):
        shown = subprocess.run(
            [*command, "train", "cvusa", "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "--batch-size" in shown and "Sample4Geo" in shown, shown
    print(f"wheel gsra_salad {gsra_salad.__version__} from {Path(gsra_salad.__file__).parent}: ok")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sdist"] and len(sys.argv) == 3:
        check_sdist(Path(sys.argv[2]))
    elif sys.argv[1:] == ["smoke"]:
        smoke()
    else:
        sys.exit(__doc__)
