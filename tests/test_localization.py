"""Gallery index, localize, the index/locate command functions and the synthetic region."""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import gsra_salad.localization._backends as backends
from gsra_salad import SALAD, CrossViewGeoLocalizer
from gsra_salad.evaluation import evaluate_retrieval, search
from gsra_salad.localization import (
    GalleryIndex,
    Localization,
    TileMatch,
    estimate_position,
    localize,
    model_fingerprint,
)
from gsra_salad.localization import index as index_module
from gsra_salad.localization.cli import (
    add_index_arguments,
    add_locate_arguments,
    run_index,
    run_locate,
)
from gsra_salad.models import TinyCNN


def unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def grid_positions(n, spacing=10.0):
    side = math.ceil(math.sqrt(n))
    return np.array([(spacing * (i % side), spacing * (i // side)) for i in range(n)], float)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = CrossViewGeoLocalizer(
        TinyCNN(16, width=8), None, SALAD(16, num_clusters=4, cluster_dim=4, token_dim=0)
    )
    return model.eval()


@pytest.fixture
def small_blocks(monkeypatch):
    """Gallery blocks of 7 rows and query chunks of 3: every streaming path is taken."""
    monkeypatch.setattr(backends, "_BLOCK_ELEMENTS", 7 * 32)
    monkeypatch.setattr(backends, "_SCORE_ELEMENTS", 3 * 7)


# ---------------------------------------------------------------------------------------------
# the index: round trip, search, storage
# ---------------------------------------------------------------------------------------------


def test_round_trip_memory_mapped_add_and_exact_search_equal_evaluate(tmp_path, small_blocks):
    first, second = unit(40, 32, seed=1), unit(25, 32, seed=2)
    pos = grid_positions(65)
    index = GalleryIndex(first, pos[:40], [f"t{i}" for i in range(40)], metric="euclidean")
    assert index.dtype == np.float32
    index.save(tmp_path / "index")
    loaded = GalleryIndex.load(tmp_path / "index")
    assert isinstance(loaded.descriptors, np.memmap)
    loaded.add_descriptors(second, pos[40:], [f"t{i}" for i in range(40, 65)])
    assert len(loaded) == 65 and loaded.paths[64] == "t64"
    np.testing.assert_array_equal(loaded.positions, pos)

    gallery = torch.cat([first, second])
    queries = torch.nn.functional.normalize(gallery[::3] + 0.3 * unit(22, 32, seed=3), dim=1)
    scores, ids = loaded.search(queries, k=5)
    ref_scores, ref_ids = search(queries, gallery, k=5)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(scores, ref_scores)
    # the ranks evaluate_retrieval counts agree with this ranking
    labels = torch.arange(65)
    truth = labels[::3].contiguous()
    expected = evaluate_retrieval(queries, gallery, truth, labels, ks=(1, 5))
    assert expected["R@1"] == 100.0 * (ids[:, 0] == truth).float().mean().item()
    assert expected["R@5"] == 100.0 * (ids == truth[:, None]).any(1).float().mean().item()

    # saved again (from the memory map plus the added part) and reloaded: the same index
    loaded.save(tmp_path / "index")
    again = GalleryIndex.load(tmp_path / "index", mmap=False)
    np.testing.assert_array_equal(again.descriptors, gallery.numpy())
    assert again.paths == loaded.paths
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_float16_storage_ranks_as_evaluate_retrieval_on_the_stored_values(small_blocks):
    gallery = unit(50, 32, seed=4)
    index = GalleryIndex(gallery.half(), grid_positions(50), list(map(str, range(50))),
                         metric="euclidean")  # fmt: skip
    assert index.dtype == np.float16
    queries = unit(9, 32, seed=5)
    _, ids = index.search(queries, k=3)
    _, ref = search(queries, gallery.half(), k=3)
    torch.testing.assert_close(ids, ref, rtol=0, atol=0)


def test_build_from_a_model_and_add_more_tiles():
    model = tiny_model()
    tiles = torch.rand(6, 3, 32, 32)
    index = GalleryIndex.build(model, TensorDataset(tiles[:4], torch.arange(4)),
                               grid_positions(4), metric="euclidean", progress=False)  # fmt: skip
    with torch.no_grad():
        expected = model.embed(tiles, "reference")
    np.testing.assert_allclose(index.descriptors.astype(np.float32), expected[:4].numpy(),
                               atol=2e-3)  # fmt: skip
    index.add(model, TensorDataset(tiles[4:], torch.arange(2)), grid_positions(6)[4:],
              paths=["e", "f"], progress=False)  # fmt: skip
    assert len(index) == 6 and index.paths[-2:] == ["e", "f"]
    np.testing.assert_allclose(index.descriptors[4:].astype(np.float32), expected[4:].numpy(),
                               atol=2e-3)  # fmt: skip


def test_build_from_paths_with_a_transform(tmp_path):
    from gsra_salad.data.synthetic import write_region

    root = write_region(tmp_path / "r", grid=(2, 2), num_queries=0, tile_size=32, stride=16)
    paths = sorted((root / "tiles").glob("*.jpg"))
    index = GalleryIndex.build(tiny_model(), paths, grid_positions(4), metric="euclidean",
                               transform=lambda x: x.float() / 255, progress=False)  # fmt: skip
    assert index.paths == [str(p) for p in paths]


def test_without_a_transform_the_error_says_what_to_pass(tmp_path, monkeypatch):
    import gsra_salad.data as data

    monkeypatch.delattr(data, "create_transform", raising=False)
    with pytest.raises(ValueError, match="pass transform="):
        GalleryIndex.build(tiny_model(), [str(tmp_path / "a.jpg")], [[0.0, 0.0]],
                           metric="euclidean", progress=False)  # fmt: skip


def test_faiss_backends_agree_with_exact():
    pytest.importorskip("faiss")
    # clustered descriptors of low intrinsic dimension, like a trained model's
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=g) * 3
    members = torch.randint(0, 20, (3000,), generator=g)
    latent = centres[members] + torch.randn(3000, 16, generator=g)
    basis = torch.linalg.qr(torch.randn(64, 16, generator=g)).Q
    gallery = torch.nn.functional.normalize(latent @ basis.T + 0.05 * torch.randn(3000, 64), dim=1)
    queries = torch.nn.functional.normalize(gallery[:200] + 0.05 * torch.randn(200, 64), dim=1)
    index = GalleryIndex(gallery.half(), grid_positions(3000), list(map(str, range(3000))),
                         metric="euclidean")  # fmt: skip
    _, exact = index.search(queries, k=5)
    _, flat = index.search(queries, k=5, backend="faiss-exact")
    assert (flat[:, 0] == exact[:, 0]).float().mean() >= 0.99
    params = index.build_approximate(encoding="sq8")
    assert params["nlist"] == 64 and params["pca_dim"] == 64
    scores, approx = index.search(queries, k=5, backend="faiss-ivf")
    assert (approx[:, 0] == exact[:, 0]).float().mean() >= 0.9
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # exact re-scoring, in order
    exact_scores = (queries @ gallery.half().float().T).gather(1, approx)
    torch.testing.assert_close(scores, exact_scores)
    _, reranked = index.search(queries, k=5, backend="faiss-ivf", rerank=64)
    agreement = (approx[:, 0] == exact[:, 0]).float().mean()
    assert (reranked[:, 0] == exact[:, 0]).float().mean() >= agreement
    assert index.nbytes()["approximate"] > 0


def test_approximate_parameters_follow_the_gallery_size():
    p = backends.approximate_parameters(1_000_000, 8192)
    assert p == {"pca_dim": 256, "nlist": 1024, "nprobe": 64, "train_size": 65536}
    assert backends.approximate_parameters(20_000, 256)["nprobe"] == 32  # nlist 128
    small = backends.approximate_parameters(100, 16)
    assert small["nlist"] == 2  # at most N / 39 cells
    assert small["pca_dim"] == 16 and small["train_size"] == 100


def test_the_approximate_index_is_saved_and_loaded(tmp_path):
    pytest.importorskip("faiss")
    gallery = unit(500, 32, seed=6)
    index = GalleryIndex(gallery, grid_positions(500), list(map(str, range(500))),
                         metric="euclidean")  # fmt: skip
    index.build_approximate(encoding="pq", pca_dim=16)
    before = index.search(gallery[:20], k=3, backend="faiss-ivf")
    loaded = GalleryIndex.load(index.save(tmp_path / "ix"))
    after = loaded.search(gallery[:20], k=3, backend="faiss-ivf")
    torch.testing.assert_close(after, before)


def test_spacing_is_computed_and_saved(tmp_path):
    index = GalleryIndex(unit(9, 4), grid_positions(9, spacing=25.0), list("abcdefghi"),
                         metric="euclidean")  # fmt: skip
    assert index.tile_spacing_m() == 25.0
    assert GalleryIndex.load(index.save(tmp_path / "ix"))._spacing == 25.0


def test_haversine_spacing():
    pos = [[47.0, 8.0], [47.0, 8.001], [47.001, 8.0]]
    index = GalleryIndex(unit(3, 4), pos, list("abc"), metric="haversine")
    assert index.tile_spacing_m() == pytest.approx(75.8, abs=0.5)  # 0.001 deg of lon at 47 N


# ---------------------------------------------------------------------------------------------
# the model fingerprint
# ---------------------------------------------------------------------------------------------


def test_fingerprint_follows_config_and_weights(tmp_path):
    model = tiny_model()
    fp = model_fingerprint(model)
    assert fp.startswith("sha256:") and fp == model_fingerprint(model.embed)
    reloaded = CrossViewGeoLocalizer.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert model_fingerprint(reloaded) == fp
    with torch.no_grad():
        reloaded.aggregation.dust_bin.add_(1e-3)
    assert model_fingerprint(reloaded) != fp
    assert model_fingerprint(tiny_model(seed=1)) != fp
    assert model_fingerprint(lambda x: x) is None


def test_querying_with_another_model_is_a_clear_error_with_an_override():
    model, other = tiny_model(), tiny_model(seed=1)
    tiles = TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4))
    index = GalleryIndex.build(model, tiles, grid_positions(4), metric="euclidean",
                               progress=False)  # fmt: skip
    photos = torch.rand(2, 3, 16, 64)
    with pytest.raises(ValueError, match=r"built by sha256:.*check_fingerprint=False"):
        localize(other, index, photos, k=2)
    with pytest.raises(ValueError, match="plain callable"):
        localize(lambda x: model.embed(x, "query"), index, photos, k=2)
    assert len(localize(other, index, photos, k=2, check_fingerprint=False)) == 2
    with pytest.raises(ValueError, match="built by"):
        index.add(other, tiles, grid_positions(4))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_positions_and_descriptors():
    d = unit(4, 8)
    pos = grid_positions(4)
    pos[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"missing \(NaN or inf\) for 1 tile\(s\), at rows \[2\]"):
        GalleryIndex(d, pos, list("abcd"), metric="euclidean")
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        GalleryIndex(d, grid_positions(3), list("abcd"), metric="euclidean")
    with pytest.raises(ValueError, match="positions are missing; pass positions"):
        GalleryIndex(d, None, list("abcd"), metric="euclidean")
    with pytest.raises(ValueError, match="out of range"):
        GalleryIndex(d, [[0, 0], [0, 0], [91, 0], [0, 0]], list("abcd"), metric="haversine")
    with pytest.raises(ValueError, match="metric must be"):
        GalleryIndex(d, grid_positions(4), list("abcd"), metric="utm")
    with pytest.raises(ValueError, match="3 paths for 4 tiles"):
        GalleryIndex(d, grid_positions(4), list("abc"), metric="euclidean")
    with pytest.raises(ValueError, match="non-empty"):
        GalleryIndex(np.zeros((0, 8)), np.zeros((0, 2)), [], metric="euclidean")
    index = GalleryIndex(d, grid_positions(4), list("abcd"), metric="euclidean")
    with pytest.raises(ValueError, match="D = 5, the index holds D = 8"):
        index.add_descriptors(unit(1, 5), [[0.0, 0.0]], ["e"])
    with pytest.raises(ValueError, match="D = 5, the index holds D = 8"):
        index.search(unit(1, 5))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        index.search(unit(1, 8), k=5)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match="backend must be one of"):
        index.search(unit(1, 8), backend="annoy")


def test_bad_index_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)
    index = GalleryIndex(unit(4, 8), grid_positions(4), list("abcd"), metric="euclidean")
    good = index.save(tmp_path / "ix")
    meta = json.loads((good / "meta.json").read_text())

    broken = tmp_path / "broken"
    index.save(broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        GalleryIndex.load(broken)
    (broken / "meta.json").write_text(json.dumps({**meta, "count": 0}))
    with pytest.raises(ValueError, match="empty"):
        GalleryIndex.load(broken)
    (broken / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="upgrade gsra_salad"):
        GalleryIndex.load(broken)
    (broken / "meta.json").write_text(json.dumps(meta))
    data = (broken / "descriptors.npy").read_bytes()
    (broken / "descriptors.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        GalleryIndex.load(broken)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a gallery index"):
        index.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_failed_save_keeps_the_old_index(tmp_path, monkeypatch):
    old = GalleryIndex(unit(4, 8), grid_positions(4), list("abcd"), metric="euclidean")
    old.save(tmp_path / "ix")
    new = GalleryIndex(unit(5, 8), grid_positions(5), list("abcde"), metric="euclidean")

    def crash(self, directory):
        (directory / "descriptors.npy").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(index_module.GalleryIndex, "_write", crash)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "ix")
    assert len(GalleryIndex.load(tmp_path / "ix")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


# ---------------------------------------------------------------------------------------------
# estimates and results
# ---------------------------------------------------------------------------------------------


def test_estimates_and_confidence():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.9, 0.89, 0.88, 0.87]])
    positions = torch.tensor([
        [[0.0, 0.0], [20.0, 0.0], [1000.0, 0.0], [0.0, 10.0]],
        [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]],
    ])  # fmt: skip
    top1, conf = estimate_position(scores, positions, "euclidean", radius_m=50, estimate="top1")
    assert top1.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # row 0: the best tile farther than 50 m scores 0.7; row 1: none: margin to the last
    torch.testing.assert_close(conf, torch.tensor([0.2, 0.03]))
    weighted, _ = estimate_position(scores, positions, "euclidean", radius_m=50, temperature=0.1)
    w = torch.exp((torch.tensor([0.9, 0.8, 0.6], dtype=torch.float64) - 0.9) / 0.1)
    expected = (float(w[1] * 20.0 / w.sum()), float(w[2] * 10.0 / w.sum()))
    assert weighted[0].tolist() == pytest.approx(expected)
    # default: margin weights, score - 0.7 (the best elsewhere) for tiles within the radius
    margin, _ = estimate_position(scores, positions, "euclidean", radius_m=50)
    w = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)  # the 0.6 tile scores below 0.7
    assert margin[0].tolist() == pytest.approx([float(w[1] * 20.0 / w.sum()), 0.0])
    # row 1, nobody far: weights against the last candidate, 0.87
    w = torch.tensor([0.03, 0.02, 0.01, 0.0], dtype=torch.float64)
    assert margin[1].tolist() == pytest.approx([float((w[1] * 5) / w.sum()),
                                                float((w[2] * 5) / w.sum())])  # fmt: skip
    with pytest.raises(ValueError, match="estimate must be one of"):
        estimate_position(scores, positions, "euclidean", radius_m=50, estimate="mean")


def test_localize_returns_json_ready_dataclasses():
    model = tiny_model()
    index = GalleryIndex.build(model, TensorDataset(torch.rand(9, 3, 32, 32), torch.arange(9)),
                               [[47.0 + i * 1e-4, 8.0] for i in range(9)], metric="haversine",
                               progress=False)  # fmt: skip
    results = localize(model, index, torch.rand(2, 3, 16, 64), k=3, photos=["a.jpg", "b.jpg"])
    assert all(isinstance(r, Localization) and isinstance(r.top[0], TileMatch) for r in results)
    line = json.loads(results[0].to_json())
    assert set(line) >= {"photo", "lat", "lon", "confidence", "top"}
    assert line["photo"] == "a.jpg" and len(line["top"]) == 3
    assert set(line["top"][0]) == {"path", "score", "lat", "lon"}
    assert line["radius_m"] == pytest.approx(2 * 11.12, abs=0.05)  # twice 1e-4 deg of latitude
    assert [t["score"] for t in line["top"]] == sorted((t["score"] for t in line["top"]),
                                                       reverse=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the command functions on a tiny synthetic region
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def region(tmp_path):
    pytest.importorskip("torchvision")
    from gsra_salad.data.synthetic import write_region

    root = write_region(tmp_path / "region", grid=(4, 4), num_queries=4, tile_size=32,
                        stride=16, pano_size=(16, 64))  # fmt: skip
    checkpoint = tiny_model().save_pretrained(tmp_path / "model")
    return root, checkpoint


def index_args(*argv):
    parser = argparse.ArgumentParser()
    add_index_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def locate_args(*argv):
    parser = argparse.ArgumentParser()
    add_locate_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def build_region_index(region, out, capsys):
    root, checkpoint = region
    args = index_args("--checkpoint", checkpoint, "--tiles", root / "tiles.csv", "--out", out,
                      "--image-size", 32)  # fmt: skip
    assert run_index(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"index": str(out), "tiles": 16, "dim": 16, "metric": "euclidean"}
    return out


def test_index_then_locate_json_lines_and_pictures(region, tmp_path, capsys):
    from PIL import Image

    root, _ = region
    out = build_region_index(region, tmp_path / "ix", capsys)
    photos = sorted((root / "queries").glob("*.jpg"))
    args = locate_args("--index", out, *photos, "--k", 3, "--image-size", "16,64",
                       "--grid", tmp_path / "grid.png", "--map", tmp_path / "map.png",
                       "--truth", root / "queries.csv")  # fmt: skip
    assert run_locate(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["photo"] for line in lines] == [str(p) for p in photos]
    for line in lines:
        assert {"x", "y", "confidence", "top", "error_m"} <= set(line)
        assert len(line["top"]) == 3 and set(line["top"][0]) == {"path", "score", "x", "y"}
        assert line["top"][0]["path"].startswith("tiles/") and math.isfinite(line["error_m"])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * (128 + 12) + 4, 4 * (128 + 12) + 4)
        assert len(np.unique(np.asarray(grid.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    with Image.open(tmp_path / "map.png") as picture:
        assert picture.size == (4 * 360, 360)
        pixels = np.asarray(picture.convert("RGB"))
        assert (pixels == (220, 0, 0)).all(-1).any()  # an estimate was drawn
        assert (pixels == (30, 90, 220)).all(-1).any()  # top-k tiles too


def test_locate_answers_the_good_photos_and_counts_the_bad(region, tmp_path, capsys):
    root, _ = region
    out = build_region_index(region, tmp_path / "ix", capsys)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    good = root / "queries" / "q0000.jpg"
    args = locate_args("--index", out, good, tmp_path / "missing.jpg", broken,
                       "--image-size", "16,64", "--map", tmp_path / "map.png")  # fmt: skip
    assert run_locate(args) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["photo"] for line in captured.out.splitlines()] == [str(good)]
    assert f"cannot read photo {tmp_path / 'missing.jpg'}: No such file or directory\n" in (
        captured.err
    )
    assert f"cannot read photo {broken}: cannot identify image file" in captured.err
    assert "2 of 3 photos failed" in captured.err
    assert (tmp_path / "map.png").is_file()
    # only bad photos: nothing answered, nothing drawn
    args = locate_args("--index", out, broken, "--image-size", "16,64",
                       "--map", tmp_path / "none.png")  # fmt: skip
    assert run_locate(args) == 1
    assert capsys.readouterr().out == "" and not (tmp_path / "none.png").exists()


def test_locate_refuses_an_index_from_another_model(region, tmp_path, capsys):
    root, _ = region
    out = build_region_index(region, tmp_path / "ix", capsys)
    other = tiny_model(seed=3).save_pretrained(tmp_path / "other")
    args = locate_args("--index", out, root / "queries" / "q0000.jpg", "--checkpoint", other,
                       "--image-size", "16,64")  # fmt: skip
    assert run_locate(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "built by" in captured.err


def test_locate_refuses_empty_and_corrupted_indexes(region, tmp_path, capsys):
    root, _ = region
    photo = root / "queries" / "q0000.jpg"
    out = build_region_index(region, tmp_path / "ix", capsys)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        assert run_locate(locate_args("--index", bad, photo, "--image-size", 16)) == 2
        assert "not a gallery index" in capsys.readouterr().err
    (out / "positions.npy").write_bytes(b"garbage")
    assert run_locate(locate_args("--index", out, photo, "--image-size", 16)) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("path,lat,lon\na.jpg,1,2\nb.jpg,,2\nc.jpg,x,3\n", "row 3: lat is missing; row 4: lat 'x'"),
        ("path,x,y\na.jpg,1\n", "row 2: expected 3 fields"),
        ("file,x,y\na.jpg,1,2\n", "the header must be 'path,lat,lon'"),
        ("path,lat,lon\na.jpg,100,2\n", "row 2: lat/lon out of range"),
        ("path,x,y\n", "lists no tiles"),
    ],
)
def test_index_names_bad_csv_rows_and_writes_nothing(region, tmp_path, capsys, rows, message):
    _, checkpoint = region
    (tmp_path / "tiles.csv").write_text(rows)
    args = index_args("--checkpoint", checkpoint, "--tiles", tmp_path / "tiles.csv",
                      "--out", tmp_path / "ix", "--image-size", 32)  # fmt: skip
    assert run_index(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "ix").exists()


def test_index_can_build_the_approximate_index_too(region, tmp_path, capsys):
    pytest.importorskip("faiss")
    root, checkpoint = region
    args = index_args("--checkpoint", checkpoint, "--tiles", root / "tiles.csv", "--out",
                      tmp_path / "ix", "--image-size", 32, "--approximate")  # fmt: skip
    assert run_index(args) == 0
    assert (tmp_path / "ix" / "approximate.faiss").is_file()
    photo = root / "queries" / "q0000.jpg"
    args = locate_args("--index", tmp_path / "ix", photo, "--image-size", "16,64",
                       "--backend", "faiss-ivf")  # fmt: skip
    capsys.readouterr()
    assert run_locate(args) == 0
    assert json.loads(capsys.readouterr().out)["photo"] == str(photo)


def test_index_names_missing_tiles_and_a_bad_checkpoint(region, tmp_path, capsys):
    root, checkpoint = region
    (root / "tiles" / "r001_c002.jpg").unlink()
    args = index_args("--checkpoint", checkpoint, "--tiles", root / "tiles.csv",
                      "--out", tmp_path / "ix", "--image-size", 32)  # fmt: skip
    assert run_index(args) == 2
    assert "1 tile image(s) not found: ['tiles/r001_c002.jpg']" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("path,x,y\n")
    args = index_args("--checkpoint", tmp_path / "nothing", "--tiles", root / "queries.csv",
                      "--out", tmp_path / "ix", "--image-size", 32)  # fmt: skip
    assert run_index(args) == 2
    assert "cannot load the model" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def test_the_region_flow_with_the_python_api(tmp_path):
    """write_region -> GalleryIndex.build -> save/load -> localize, errors in metres."""
    from gsra_salad.data.synthetic import write_region

    root = write_region(tmp_path / "r", grid=(4, 4), num_queries=5, tile_size=32, stride=16,
                        pano_size=(16, 64), metres_per_pixel=0.5)  # fmt: skip
    tiles = np.genfromtxt(root / "tiles.csv", delimiter=",", names=True, dtype=None,
                          encoding="utf-8")  # fmt: skip
    queries = np.genfromtxt(root / "queries.csv", delimiter=",", names=True, dtype=None,
                            encoding="utf-8")  # fmt: skip
    assert len(tiles) == 16 and len(queries) == 5
    spacing = np.diff(np.sort(np.unique(tiles["x"])))
    assert np.allclose(spacing, 8.0)  # stride 16 px at 0.5 m
    model = tiny_model()

    def scale(x):
        return x.float() / 255

    index = GalleryIndex.build(
        model, [root / p for p in tiles["path"]], np.stack([tiles["x"], tiles["y"]], 1),
        metric="euclidean", paths=list(tiles["path"]), transform=scale, progress=False,
    )  # fmt: skip
    index = GalleryIndex.load(index.save(tmp_path / "ix"))
    results = localize(model, index, [root / p for p in queries["path"]], k=3, transform=scale)
    truth = np.stack([queries["x"], queries["y"]], 1)
    errors = np.linalg.norm(np.array([r.position for r in results]) - truth, axis=1)
    assert np.isfinite(errors).all() and errors.max() < 2 * 8.0 * 4  # inside the region
    assert results[0].photo == str(root / queries["path"][0])


def test_write_region_is_seeded_and_checks_its_arguments(tmp_path):
    from gsra_salad.data.synthetic import write_region

    a = write_region(tmp_path / "a", grid=(2, 3), num_queries=2, tile_size=16, stride=8)
    b = write_region(tmp_path / "b", grid=(2, 3), num_queries=2, tile_size=16, stride=8)
    for name in ("tiles.csv", "queries.csv", "tiles/r001_c002.jpg", "queries/q0001.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert len((a / "tiles.csv").read_text().splitlines()) == 1 + 6
    with pytest.raises(ValueError, match="stride > 0"):
        write_region(tmp_path / "c", grid=(2, 2), stride=0)
    assert not os.path.exists(tmp_path / "c")


def test_region_map_cells_are_the_nearest_seed_of_every_pixel():
    """The map's cells (a k-d tree, band by band) equal the brute-force nearest seed of every
    pixel, whatever the band height."""
    from gsra_salad.data._synthetic_region import nearest_seed

    rng = np.random.default_rng(0)
    height, width = 37, 53
    seeds = rng.uniform(0, 1, (40, 2)) * (width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    distances = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
    expected = distances.argmin(-1)
    for band in (None, 1, 7, height):
        assert np.array_equal(nearest_seed(seeds, height, width, band=band), expected)
