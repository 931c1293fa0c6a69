"""The region flow of the README: a region with a training split, the demo recipe trained on it,
``index`` of its tiles, ``locate`` of its panoramas with the error summary; ``index --dataset``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from gsra_salad.cli import main

pytest.importorskip("PIL")
pytest.importorskip("torchvision")

TINY_REGION = {"grid": (3, 3), "num_queries": 5, "tile_size": 32, "stride": 16,
               "pano_size": (16, 64)}  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny region with a training split and the demo recipe trained on it for one epoch."""
    from gsra_salad.data.synthetic import write_region

    tmp = tmp_path_factory.mktemp("region-flow")
    root = write_region(tmp / "region", num_train=16, num_val=10, **TINY_REGION)
    run = tmp / "run"
    status = main(["train", "cvusa", "--demo", "--data-root", str(root), "--output-dir",
                   str(run), "--epochs", "1", "--batch-size", "8", "--no-progress", "--workers",
                   "0"])  # fmt: skip
    assert status == 0
    return root, run / "best"


def test_the_training_split_is_cvusa_drawn_from_the_region(tmp_path):
    from gsra_salad.data import CVUSA
    from gsra_salad.data.synthetic import write_region

    plain = write_region(tmp_path / "plain", **TINY_REGION)
    root = write_region(tmp_path / "r", num_train=6, num_val=3, **TINY_REGION)
    # the split is added beside the region: the tiles and the queries stay the same files
    for name in ("tiles.csv", "queries.csv", "tiles/r001_c002.jpg", "queries/q0003.jpg"):
        assert (plain / name).read_bytes() == (root / name).read_bytes()
    train, val = CVUSA(root, "train"), CVUSA(root, "val")
    assert (len(train), len(val)) == (6, 3)
    assert set(train.labels).isdisjoint(val.labels)
    positions = _rows(root / "positions.csv")
    assert positions[0] == ["path", "x", "y"] and len(positions) == 1 + 9
    assert [p[0] for p in positions[1:]] == [
        str(p.relative_to(root)) for p in train.reference_paths + val.reference_paths
    ]
    xy = np.array([[float(x), float(y)] for _, x, y in positions[1:]])
    size = 2 * 16 + 32  # (3 - 1) * stride + tile_size
    assert (xy >= 16).all() and (xy <= size - 16).all()  # tiles lie inside the map
    meta = json.loads((root / "region.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["pair_offset"]) == (6, 3, 8)  # stride // 2
    with pytest.raises(ValueError, match="both 0"):
        write_region(tmp_path / "bad", num_train=4, **TINY_REGION)
    with pytest.raises(ValueError, match="pair_offset must be >= 0"):
        write_region(tmp_path / "bad", num_train=4, num_val=2, pair_offset=-1, **TINY_REGION)


def test_pair_offset_moves_the_tile_not_the_panorama(tmp_path):
    from gsra_salad.data.synthetic import write_region

    centred = write_region(tmp_path / "a", num_train=8, num_val=2, pair_offset=0, **TINY_REGION)
    moved = write_region(tmp_path / "b", num_train=8, num_val=2, pair_offset=6, **TINY_REGION)
    a = np.array([[float(x), float(y)] for _, x, y in _rows(centred / "positions.csv")[1:]])
    b = np.array([[float(x), float(y)] for _, x, y in _rows(moved / "positions.csv")[1:]])
    shift = np.abs(a - b)
    assert shift.max() <= 6 and shift.max() > 0


def test_train_index_locate_with_the_error_summary(trained, tmp_path, capsys):
    root, checkpoint = trained
    index = tmp_path / "region-index"
    status, out, err = _run(capsys, "index", "--checkpoint", checkpoint, "--tiles",
                            root / "tiles.csv", "--out", index)  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["tiles"] == 9
    photos = sorted((root / "queries").glob("*.jpg"))
    summary_file = tmp_path / "summary.json"
    status, out, err = _run(capsys, "locate", "--index", index, *photos, "--truth",
                            root / "queries.csv", "--summary", summary_file)  # fmt: skip
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(photos) == 5  # stdout: one JSON line per photo, nothing else
    assert all({"x", "y", "confidence", "top", "error_m"} <= set(line) for line in lines)
    errors = np.array([line["error_m"] for line in lines])
    summary = json.loads(summary_file.read_text())
    assert summary["photos"] == 5 and summary["within_m"] == 50.0
    assert summary["median_error_m"] == pytest.approx(np.median(errors), abs=0.01)
    assert summary["share_within"] == pytest.approx((errors <= 50).mean())
    # the random tile: every (photo, tile) distance
    truth = {r[0]: (float(r[1]), float(r[2])) for r in _rows(root / "queries.csv")[1:]}
    tiles = np.array([[float(r[1]), float(r[2])] for r in _rows(root / "tiles.csv")[1:]])
    d = np.concatenate([np.hypot(*(tiles - truth[f"queries/{p.name}"]).T) for p in photos])
    assert summary["random_tile"]["median_error_m"] == pytest.approx(np.median(d), abs=0.01)
    assert summary["random_tile"]["share_within"] == pytest.approx((d <= 50).mean(), abs=1e-4)
    assert summary["random_tile"]["tiles"] == 9
    (line,) = [e for e in err.splitlines() if "median error" in e]
    assert f"median error {summary['median_error_m']:.1f} m" in line
    assert "within 50 m; a random tile: median" in line


def test_summary_needs_truth_and_a_positive_threshold(trained, tmp_path, capsys):
    root, _ = trained
    photo = root / "queries" / "q0000.jpg"
    status, _, err = _run(capsys, "locate", "--index", tmp_path / "ix", photo, "--summary",
                          tmp_path / "s.json")  # fmt: skip
    assert status == 2 and "--summary needs --truth" in err
    status, _, err = _run(capsys, "locate", "--index", tmp_path / "ix", photo, "--truth",
                          root / "queries.csv", "--within-m", "0")  # fmt: skip
    assert status == 2 and "--within-m must be > 0" in err


def test_index_a_datasets_split(trained, tmp_path, capsys):
    from gsra_salad.data.synthetic import write_cvact, write_university1652

    root, checkpoint = trained
    # CVUSA's layout records no positions: a clear error, nothing written
    status, _, err = _run(capsys, "index", "--checkpoint", checkpoint, "--dataset", "cvusa",
                          "--data-root", root, "--out", tmp_path / "a")  # fmt: skip
    assert status == 2 and "CVUSA's official layout records no positions" in err
    assert not (tmp_path / "a").exists()
    # ... unless they are given: the region's training split lists them
    status, out, err = _run(capsys, "index", "--checkpoint", checkpoint, "--dataset", "cvusa",
                            "--data-root", root, "--split", "val", "--positions",
                            root / "positions.csv", "--out", tmp_path / "b")  # fmt: skip
    assert status == 0, err
    assert (json.loads(out)["tiles"], json.loads(out)["metric"]) == (10, "euclidean")
    from gsra_salad.localization import GalleryIndex

    index = GalleryIndex.load(tmp_path / "b")
    positions = {r[0]: (float(r[1]), float(r[2])) for r in _rows(root / "positions.csv")[1:]}
    np.testing.assert_allclose(index.positions, [positions[p] for p in index.paths])
    assert index.paths[0].startswith("bingmap/19/")
    # CVACT: UTM metres from ACT_data.mat
    cvact = write_cvact(tmp_path / "cvact", num_train=4, num_val=6, num_test=0, tile_size=32,
                        pano_size=(16, 64))  # fmt: skip
    status, out, err = _run(capsys, "index", "--checkpoint", checkpoint, "--dataset", "cvact",
                            "--data-root", cvact, "--out", tmp_path / "c")  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["tiles"] == 6 and json.loads(out)["metric"] == "euclidean"
    # University-1652: no positions either
    u1652 = write_university1652(tmp_path / "u", num_train=2, num_test=3, num_distractors=1,
                                 drones_per_building=1, tile_size=32)  # fmt: skip
    status, _, err = _run(capsys, "index", "--checkpoint", checkpoint, "--dataset",
                          "university1652", "--data-root", u1652, "--out",
                          tmp_path / "d")  # fmt: skip
    assert status == 2 and "University-1652's official layout records no positions" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "cvusa"], "--dataset cvusa needs --data-root DIR"),
        (["--dataset", "cvusa", "--data-root", "{root}", "--split", "test"],
         "--split test: cvusa has the splits train, val"),
        (["--dataset", "cvact", "--data-root", "{root}"], "ACT_data.mat"),
        (["--tiles", "{root}/tiles.csv", "--split", "val"], "--split goes with --dataset"),
    ],
)  # fmt: skip
def test_index_dataset_bad_input(trained, tmp_path, capsys, argv, message):
    root, checkpoint = trained
    argv = [a.format(root=root) for a in argv]
    status, out, err = _run(capsys, "index", "--checkpoint", checkpoint, *argv, "--out",
                            tmp_path / "ix")  # fmt: skip
    assert status == 2 and message in err and out == ""
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ix").exists()


def test_train_region_refuses_a_region_without_a_training_split(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gsra_salad.data.synthetic import write_region

    repo = Path(__file__).resolve().parents[1]
    root = write_region(tmp_path / "region", **TINY_REGION)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, str(repo / "examples" / "train_region.py"), "--region", str(root)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "holds a region without a training split" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_index_under_torchrun_shards_and_equals_one_process(trained, tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gsra_salad.localization import GalleryIndex
    from tests._helpers import free_port

    root, checkpoint = trained
    status, _, err = _run(capsys, "index", "--checkpoint", checkpoint, "--tiles",
                          root / "tiles.csv", "--out", tmp_path / "one")  # fmt: skip
    assert status == 0, err
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "gsra_salad", "index", "--checkpoint",
        str(checkpoint), "--tiles", str(root / "tiles.csv"), "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # only rank 0 saves and prints
    one, two = GalleryIndex.load(tmp_path / "one"), GalleryIndex.load(tmp_path / "two")
    assert one.paths == two.paths
    # the same model on other batch shards: equal up to float32 rounding, which float16
    # storage may turn into one unit in the last place (2**-10 relative)
    np.testing.assert_allclose(
        np.asarray(one.descriptors, np.float32), np.asarray(two.descriptors, np.float32),
        rtol=2 * 2**-10, atol=2**-24,
    )  # fmt: skip
    np.testing.assert_array_equal(one.positions, two.positions)
