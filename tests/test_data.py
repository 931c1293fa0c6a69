"""Readers, transforms, samplers and synthetic layouts (needs the 'data' extra: Pillow, SciPy)."""

import csv
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("scipy")

from gsra_salad.data import (
    CVACT,
    CVUSA,
    NeighbourBatchSampler,
    PairedAugmentation,
    UniqueLabelBatchSampler,
    University1652,
    haversine_m,
    nearest_neighbours,
    polar_transform,
    rotate_pair,
    synthetic,
)


@pytest.fixture(scope="module")
def cvusa_root(tmp_path_factory):
    return synthetic.write_cvusa(
        tmp_path_factory.mktemp("cvusa"), num_train=12, num_val=6, tile_size=64
    )


@pytest.fixture(scope="module")
def cvact_root(tmp_path_factory):
    return synthetic.write_cvact(
        tmp_path_factory.mktemp("cvact"), 10, 5, 4, tile_size=64, missing=2
    )


@pytest.fixture(scope="module")
def u1652_root(tmp_path_factory):
    return synthetic.write_university1652(
        tmp_path_factory.mktemp("u1652"),
        6,
        5,
        num_distractors=3,
        drones_per_building=3,
        tile_size=64,
        drone_size=48,
    )


# ---------------------------------------------------------------------------------------------
# readers on the synthetic layouts
# ---------------------------------------------------------------------------------------------


def test_cvusa_counts_pairing_and_ids(cvusa_root):
    train, val = CVUSA(cvusa_root, "train"), CVUSA(cvusa_root, "val")
    assert (len(train), len(val)) == (12, 6)
    assert train.labels.tolist() == list(range(1, 13))
    assert val.labels.tolist() == list(range(13, 19))
    ground, satellite, label = val[2]
    assert label == 15
    assert ground.dtype == torch.uint8 and ground.shape == (3, 64, 256)
    assert satellite.shape == (3, 64, 64)
    # query and reference of an item come from the same location (csv row)
    assert val.query_paths[2].stem == val.reference_paths[2].stem == f"{label:07d}"


def test_cvusa_errors_name_the_missing_path(tmp_path, cvusa_root):
    with pytest.raises(
        FileNotFoundError, match=r"directory .*nowhere not found.*splits/train-19zl\.csv"
    ):
        CVUSA(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train-19zl\.csv not found"):
        CVUSA(tmp_path / "empty")
    with pytest.raises(ValueError, match="split must be"):
        CVUSA(cvusa_root, "test")
    broken = tmp_path / "broken"
    (broken / "splits").mkdir(parents=True)
    with (broken / "splits" / "val-19zl.csv").open("w", newline="") as f:
        csv.writer(f).writerow(["bingmap/19/0000001.jpg", "streetview/panos/0000001.jpg", "x.png"])
    with pytest.raises(FileNotFoundError, match=r"0000001\.jpg not found"):
        CVUSA(broken, "val")


def test_cvact_splits_positions_and_skipped_ids(cvact_root):
    with pytest.warns(UserWarning, match=r"skipped 2 of 10 ids"):
        train = CVACT(cvact_root, "train")
    assert len(train) == 8 and train.skipped == ["synthetic_000000", "synthetic_000001"]
    assert train.labels.tolist() == list(range(2, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val, test = CVACT(cvact_root, "val"), CVACT(cvact_root, "test")
    assert val.labels.tolist() == list(range(10, 15))
    assert test.labels.tolist() == list(range(15, 19))
    assert train.positions.shape == (8, 2) and np.isfinite(train.positions).all()
    ground, satellite, label = test[1]
    assert label == 16 and ground.shape == (3, 64, 256) and satellite.shape == (3, 64, 64)


def test_cvact_errors(tmp_path, cvact_root):
    import scipy.io as sio

    with pytest.raises(FileNotFoundError, match=r"ACT_data\.mat not found"):
        CVACT(tmp_path)
    mat = sio.loadmat(str(cvact_root / "ACT_data.mat"))
    del mat["valSet"]
    bad = tmp_path / "bad"
    bad.mkdir()
    sio.savemat(str(bad / "ACT_data.mat"), {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(KeyError, match=r"has no field 'valSet'"):
        CVACT(bad, "val")


def test_university1652_train_pairs_and_eval_sets(u1652_root):
    train = University1652(u1652_root, "train")
    assert len(train) == 6 * 3
    drone, satellite, label = train[4]
    assert label == 1 and drone.shape == (3, 48, 48) and satellite.shape == (3, 64, 64)
    query = University1652(u1652_root, "test", view="query_drone")
    gallery = University1652(u1652_root, "test", view="gallery_satellite")
    assert len(query) == 5 * 3 and len(gallery) == 5 + 3
    assert set(query.labels) < set(gallery.labels)
    assert gallery.distractors.tolist() == [False] * 5 + [True] * 3
    image, label = gallery[0]
    assert label == 6 and image.shape == (3, 64, 64)
    assert len(University1652(u1652_root, "test", view="gallery_drone")) == 15
    with pytest.raises(ValueError, match="view must be one of"):
        University1652(u1652_root, "test", view="drone")
    with pytest.raises(FileNotFoundError, match=r"train/street not found"):
        University1652(u1652_root, "train", query_view="street")


def test_undecodable_image_errors_name_the_file(tmp_path, cvusa_root):
    root = shutil.copytree(cvusa_root, tmp_path / "cvusa")
    val = CVUSA(root, "val")
    path = val.reference_paths[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated JPEG
    with pytest.raises(OSError, match=rf"could not read image {re.escape(str(path))}: .*truncated"):
        val[0]
    path.write_bytes(b"not an image")
    with pytest.raises(OSError, match=re.escape(str(path))):
        val[0]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        val[0]


def test_cvusa_rejects_an_empty_split_file(tmp_path, cvusa_root):
    root = shutil.copytree(cvusa_root, tmp_path / "cvusa")
    (root / "splits" / "train-19zl.csv").write_text("")
    with pytest.raises(ValueError, match=r"train-19zl\.csv lists no image pairs"):
        CVUSA(root, "train")
    (root / "splits" / "train-19zl.csv").write_text("\n\n")  # blank lines only
    with pytest.raises(ValueError, match="lists no image pairs"):
        CVUSA(root, "train")


def test_university1652_counts_and_warns_about_skipped_buildings(tmp_path, u1652_root):
    root = shutil.copytree(u1652_root, tmp_path / "u1652")
    drone = root / "train" / "drone"
    shutil.copytree(drone / "0000", drone / "0777")  # a building without a satellite image
    shutil.copytree(drone / "0000", drone / "old_copy")  # a folder whose name is no id
    (root / "train" / "satellite" / "old_copy").mkdir()
    shutil.copytree(root / "test" / "query_drone" / "0006", root / "test" / "query_drone" / "x")
    with pytest.warns(UserWarning, match=r"skipped 2 building folder\(s\) under .*train/drone"):
        train = University1652(root, "train")
    assert sorted(train.skipped) == ["0777", "old_copy"] and len(train) == 6 * 3
    assert 777 not in set(train.labels)
    with pytest.warns(UserWarning, match=r"skipped 1 building folder\(s\) under .*query_drone"):
        query = University1652(root, "test", view="query_drone")
    assert query.skipped == ["x"] and len(query) == 5 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert University1652(u1652_root, "train").skipped == []


def test_university1652_rejects_arguments_of_the_other_split(u1652_root):
    with pytest.raises(ValueError, match=r"view \(given\) belong\(s\) to split='test'"):
        University1652(u1652_root, "train", view="query_drone")
    with pytest.raises(ValueError, match=r"transform \(given\).*takes query_view"):
        University1652(u1652_root, "train", transform=lambda x: x)
    with pytest.raises(ValueError, match=r"query_view, pair_transform \(given\).*'train'"):
        University1652(
            u1652_root, "test", view="query_drone", query_view="drone", pair_transform=lambda *x: x
        )
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        University1652(u1652_root, "val")
    assert University1652(u1652_root, "train", query_view="drone").query_view == "drone"


def test_colour_histograms_cannot_solve_the_synthetic_task(tmp_path):
    """500 test locations: colour statistics alone give at most 10% Recall@1."""
    root = synthetic.write_cvusa(
        tmp_path, num_train=0, num_val=500, tile_size=64, pano_size=(32, 128)
    )
    val = CVUSA(root, "val")
    grounds = torch.stack([val[i][0] for i in range(len(val))])
    tiles = torch.stack([val[i][1] for i in range(len(val))])
    sims = (
        synthetic.colour_histogram_descriptors(grounds)
        @ synthetic.colour_histogram_descriptors(tiles).T
    )
    recall_at_1 = (sims.argmax(1) == torch.arange(len(val))).double().mean().item()
    assert recall_at_1 <= 0.10
    # the same descriptor does match a view to itself: the bound is not a broken descriptor
    own = synthetic.colour_histogram_descriptors(tiles)
    assert ((own @ own.T).argmax(1) == torch.arange(len(val))).double().mean() > 0.95


def test_synthetic_writers_are_deterministic(tmp_path):
    a = synthetic.write_cvusa(tmp_path / "a", 3, 1, tile_size=32, seed=7)
    b = synthetic.write_cvusa(tmp_path / "b", 3, 1, tile_size=32, seed=7)
    c = synthetic.write_cvusa(tmp_path / "c", 3, 1, tile_size=32, seed=8)
    name = "bingmap/19/0000002.jpg"
    assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# geometry and paired augmentation
# ---------------------------------------------------------------------------------------------


def test_polar_transform_puts_a_marker_at_its_azimuth():
    s, h, w = 64, 16, 64
    tile = torch.zeros(1, s, s)
    tile[0, 2:8, 30:34] = 1.0  # a marker north of the centre, near the edge
    pano = polar_transform(tile, (h, w))
    column = int(pano[0, :4].sum(0).argmax())
    assert column in (0, w - 1)  # north: the seam between the last and first columns
    east = torch.rot90(tile, -1, dims=(-2, -1))  # the marker turned clockwise to the east
    column = int(polar_transform(east, (h, w))[0, :4].sum(0).argmax())
    assert abs(column - w // 4) <= 1
    # far (top rows) vs near (bottom rows): the marker is at the tile's edge, so it shows on top
    assert pano[0, :4].sum() > 0 and pano[0, -4:].sum() == 0


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, -1])
def test_rotation_and_roll_keep_the_pair_consistent(k):
    tile = torch.rand(3, 32, 32)
    size = (8, 32)
    rotated, rolled = rotate_pair(tile, polar_transform(tile, size), k)
    torch.testing.assert_close(polar_transform(rotated, size), rolled, rtol=1e-5, atol=1e-5)


def test_flip_keeps_the_pair_consistent():
    tile = torch.rand(3, 32, 32)
    torch.testing.assert_close(
        polar_transform(tile.flip(-1), (8, 32)),
        polar_transform(tile, (8, 32)).flip(-1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_paired_augmentation_is_consistent_and_seeded():
    tile = torch.rand(3, 32, 32)
    pano = polar_transform(tile, (8, 32))
    aug = PairedAugmentation("panorama", generator=torch.Generator().manual_seed(3))
    seen = set()
    for _ in range(20):
        g, s = aug(pano, tile)
        torch.testing.assert_close(polar_transform(s, (8, 32)), g, rtol=1e-5, atol=1e-5)
        seen.add(tuple(g[0, 0, :3].tolist()))
    assert len(seen) > 2
    again = PairedAugmentation("panorama", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        again(pano, tile)[0],
        PairedAugmentation("panorama", generator=torch.Generator().manual_seed(3))(pano, tile)[0],
    )
    drone = PairedAugmentation("drone", flip_p=0.0, generator=torch.Generator().manual_seed(0))
    _, s = drone(torch.rand(3, 8, 8), tile)
    assert any(torch.equal(s, torch.rot90(tile, k, dims=(1, 2))) for k in range(4))


def test_transforms_resize_and_normalise():
    pytest.importorskip("torchvision")
    from gsra_salad.data import eval_transform, train_transform

    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    out = eval_transform((32, 48))(image)
    assert out.shape == (3, 32, 48) and out.dtype == torch.float32
    for view in ("satellite", "ground", "drone"):
        assert train_transform(view, 24)(image).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="view must be"):
        train_transform("street", 24)


def test_transforms_reject_pixels_in_the_wrong_range():
    pytest.importorskip("torchvision")
    import pickle

    from gsra_salad.data import eval_transform, train_transform

    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    # a float image in [0, 1] is the same picture as its uint8 original (no resampling here)
    torch.testing.assert_close(
        eval_transform(20)(image.float() / 255), eval_transform(20)(image), atol=1e-5, rtol=0
    )
    for transform in (eval_transform(16), train_transform("drone", 16)):
        with pytest.raises(ValueError, match=r"float images in \[0, 1\].*up to 255.*divide by 255"):
            transform(image.float())  # [0, 255] floats: would come out near 1000
        normalised = eval_transform(20)(image)
        with pytest.raises(ValueError, match="looks normalised already"):
            transform(normalised)
        with pytest.raises(ValueError, match=r"uint8 image .* got dtype torch\.int64"):
            transform(image.long())
        with pytest.raises(ValueError, match="NaN"):
            transform(torch.full((3, 20, 20), float("nan")))
        assert pickle.loads(pickle.dumps(transform))(image).shape == (3, 16, 16)  # workers


def test_haversine_and_neighbours():
    assert math.isclose(
        float(haversine_m(np.array([0.0, 0.0]), np.array([1.0, 0.0]))), 111_195, rel_tol=1e-4
    )
    points = np.array([[0.0, 0.0], [0.0, 0.001], [0.0, 0.01], [10.0, 10.0]])
    assert nearest_neighbours(points, 2, "haversine").tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    utm = np.array([[0.0, 0.0], [3.0, 4.0], [100.0, 0.0]])
    assert nearest_neighbours(utm, 1, "euclidean").tolist() == [[1], [0], [1]]
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert nearest_neighbours(emb, 1, "cosine").tolist() == [[1], [0], [1]]


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------


def _labels(n_locations=40, per_location=(1, 5), seed=0):
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(n_locations), rng.integers(*per_location, n_locations))


def test_unique_sampler_batches_have_distinct_labels_and_cover_the_epoch():
    labels = _labels()
    sampler = UniqueLabelBatchSampler(labels, batch_size=8, seed=1, drop_last=False)
    batches = list(sampler)
    assert all(len(set(labels[b])) == len(b) for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(labels)))
    assert len(sampler) == len(batches)
    dropped = list(UniqueLabelBatchSampler(labels, batch_size=8, seed=1))
    assert all(len(b) == 8 for b in dropped)


def test_unique_sampler_is_deterministic_per_seed_and_epoch():
    labels = _labels()
    a = UniqueLabelBatchSampler(labels, 8, seed=1)
    b = UniqueLabelBatchSampler(labels, 8, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)


def test_distributed_split_partitions_every_global_batch():
    labels = _labels(60)
    ranks = [UniqueLabelBatchSampler(labels, 4, seed=2, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1
    for step in zip(*per_rank):
        merged = [i for b in step for i in b]
        assert len(merged) == 12 and len(set(labels[merged])) == 12  # distinct across ranks
    everything = [i for p in per_rank for b in p for i in b]
    assert len(everything) == len(set(everything))


def test_neighbour_sampler_builds_batches_from_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 10_000, (10, 2))
    positions = np.concatenate([c + rng.normal(0, 5, (8, 2)) for c in centres])  # 10 clusters
    labels = np.arange(len(positions))
    sampler = NeighbourBatchSampler.from_positions(
        labels,
        positions,
        batch_size=8,
        metric="euclidean",
        k=7,
        neighbours_per_anchor=7,
        drop_last=False,
    )
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(80))
    spread = [np.ptp(positions[b], axis=0).max() for b in batches if len(b) == 8]
    assert np.median(spread) < 100  # batches are geographic neighbourhoods, not the whole map
    assert all(len(set(labels[b])) == len(b) for b in batches)
    emb = NeighbourBatchSampler.from_embeddings(labels, positions / 1000, batch_size=8, k=4)
    assert all(len(b) == 8 for b in emb)
    emb.update_embeddings(np.random.default_rng(1).normal(size=(80, 16)))
    assert emb.neighbours.shape == (80, 4)


def test_neighbour_cache_is_keyed_on_positions_metric_and_k(tmp_path, monkeypatch):
    from gsra_salad.data import samplers

    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 1000, (40, 2))
    labels = np.arange(40)
    cache = tmp_path / "cache" / "neighbours.npy"

    def build(points, metric="euclidean", k=5):
        return NeighbourBatchSampler.from_positions(
            labels, points, 8, metric=metric, k=k, cache=cache
        ).neighbours

    first = build(positions)
    assert cache.is_file()
    computed = []
    real = samplers.nearest_neighbours
    monkeypatch.setattr(
        samplers, "nearest_neighbours", lambda *a: computed.append(a[1:]) or real(*a)
    )
    assert (build(positions) == first).all() and computed == []  # read back, not recomputed
    moved = positions.copy()
    moved[[0, 1]] = moved[[1, 0]]  # same N, other content: a stale cache would pass for it
    assert (build(moved) == nearest_neighbours(moved, 5, "euclidean")).all()
    assert not (build(moved) == first).all() and computed == [(5, "euclidean")]
    lat_lon = positions / 1000
    assert (build(lat_lon, "haversine") == nearest_neighbours(lat_lon, 5, "haversine")).all()
    assert build(lat_lon, "euclidean").tolist() == nearest_neighbours(lat_lon, 5).tolist()
    assert build(lat_lon, "euclidean", k=3).shape == (40, 3)
    assert computed[1:] == [(5, "haversine"), (5, "euclidean"), (3, "euclidean")]
    np.save(cache.with_suffix(".npy"), np.zeros((40, 5), dtype=np.int64))  # a keyless file
    assert (build(moved) == nearest_neighbours(moved, 5, "euclidean")).all()


def test_neighbour_sampler_rejects_nan_positions_naming_the_rows():
    positions = np.random.default_rng(0).uniform(0, 1000, (20, 2))
    positions[[3, 7], 1] = np.nan
    positions[11, 0] = np.inf
    with pytest.raises(
        ValueError, match=r"positions holds NaN or infinite values in 3 of 20 rows "
    ):
        NeighbourBatchSampler.from_positions(range(20), positions, 4, metric="euclidean")
    with pytest.raises(ValueError, match=r"indices \[3, 7, 11\]"):
        NeighbourBatchSampler.from_positions(range(20), positions, 4, metric="euclidean")
    with pytest.raises(ValueError, match=r"points holds NaN .*indices \[3, 7, 11\]"):
        nearest_neighbours(positions, 2)
    with pytest.raises(ValueError, match=r"one row per label"):
        NeighbourBatchSampler.from_positions(range(19), np.zeros((20, 2)), 4, metric="euclidean")


def _skewed_labels():
    # 58 samples, 12 labels, one with 12 samples: packings of 8 distinct labels vary by epoch
    return np.repeat(np.arange(12), [12, 10, 9, 6, 5, 4, 3, 3, 2, 2, 1, 1])


def _samplers(labels, **kwargs):
    embeddings = np.random.default_rng(0).normal(size=(len(labels), 4))
    yield UniqueLabelBatchSampler(labels, 8, **kwargs)
    yield NeighbourBatchSampler.from_embeddings(labels, embeddings, 8, k=4, **kwargs)


@pytest.mark.parametrize("drop_last", [True, False])
def test_samplers_yield_the_same_number_of_batches_every_epoch(drop_last):
    labels = _skewed_labels()
    for sampler in _samplers(labels, drop_last=drop_last, seed=3):
        expected = 58 // 8 if drop_last else 12  # N // batch, or the most frequent label's 12
        assert len(sampler) == sampler.num_batches == expected
        loader = torch.utils.data.DataLoader(range(58), batch_sampler=sampler)
        seen_orders = set()
        for epoch in range(8):
            sampler.set_epoch(epoch)
            assert len(loader) == expected  # an LR schedule sized from len(loader) holds
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                batches = list(sampler)
            assert len(batches) == expected
            assert all(len(set(labels[b])) == len(b) for b in batches)
            flat = [i for b in batches for i in b]
            if drop_last:  # full batches; missing ones re-drawn from a fresh shuffle
                assert all(len(b) == 8 for b in batches)
            else:  # every sample exactly once
                assert sorted(flat) == list(range(58))
            seen_orders.add(tuple(flat))
        assert len(seen_orders) == 8


def test_samplers_pack_each_epoch_once_and_honour_num_batches():
    labels = _labels()
    sampler = UniqueLabelBatchSampler(labels, 8, seed=1)
    first = list(sampler)
    calls = []
    real = sampler._pack
    sampler._pack = lambda order: calls.append(1) or real(order)
    assert len(sampler) == len(first) and list(sampler) == first and calls == []  # cached
    sampler.set_epoch(1)
    assert len(sampler) == len(first) and calls == []  # len() never packs
    assert list(sampler) != first and calls == [1]
    more = UniqueLabelBatchSampler(labels, 8, seed=1, num_batches=3 * len(first))
    batches = list(more)
    assert len(batches) == len(more) == 3 * len(first)
    assert all(len(b) == 8 and len(set(labels[b])) == 8 for b in batches)
    assert len(list(UniqueLabelBatchSampler(labels, 8, num_batches=2))) == 2
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        UniqueLabelBatchSampler(labels, 8, num_batches=0)
    with pytest.raises(TypeError, match="num_batches must be an int"):
        UniqueLabelBatchSampler(labels, 8, num_batches=2.5)
    with pytest.warns(UserWarning, match=r"left out of this epoch; raise num_batches"):
        list(UniqueLabelBatchSampler(_skewed_labels(), 8, drop_last=False, num_batches=8))


def test_distributed_split_keeps_a_fixed_length_and_disjoint_slices():
    labels = _skewed_labels()
    for drop_last in (True, False):
        ranks = [
            UniqueLabelBatchSampler(labels, 2, num_replicas=2, rank=r, drop_last=drop_last)
            for r in range(2)
        ]
        for epoch in range(3):
            for sampler in ranks:
                sampler.set_epoch(epoch)
            per_rank = [list(s) for s in ranks]
            assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])
            for a, b in zip(*per_rank):
                assert not set(labels[a]) & set(labels[b])


def test_sampler_errors():
    with pytest.raises(ValueError, match="needs as many distinct labels"):
        UniqueLabelBatchSampler([0, 0, 1, 1], batch_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        UniqueLabelBatchSampler(range(10), 2, num_replicas=2, rank=2)
