"""The preloaded data path against the per-item DataLoader path, and the batch augmentation."""

import pytest
import torch
from torch.utils.data import DataLoader

from gsra_salad.data import (
    CVACT,
    CVUSA,
    PairedBatchAugmentation,
    PreloadedImages,
    PreloadedPairs,
    UniqueLabelBatchSampler,
    University1652,
    eval_transform,
    polar_transform,
    rotate_pair,
    synthetic,
)
from gsra_salad.data.preload import load_images, normalize

pytest.importorskip("PIL")
pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def cvusa_root(tmp_path_factory):
    return synthetic.write_cvusa(tmp_path_factory.mktemp("cvusa"), num_train=12, num_val=5)


@pytest.fixture(scope="module")
def university_root(tmp_path_factory):
    return synthetic.write_university1652(
        tmp_path_factory.mktemp("u1652"),
        num_train=4,
        num_test=3,
        num_distractors=2,
        drones_per_building=3,
        tile_size=64,
        drone_size=48,
    )


def _item_batches(dataset, sampler):
    """The per-item reference path: a DataLoader over the reader with its transforms."""
    return list(DataLoader(dataset, batch_sampler=sampler))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("qsize", "rsize"), [((32, 128), 64), ((64, 256), 128), (None, None)])
def test_pairs_equal_per_item_path(cvusa_root, workers, qsize, rsize):
    sampler = UniqueLabelBatchSampler(CVUSA(cvusa_root).labels, 5, seed=3)
    per_item = CVUSA(
        cvusa_root,
        query_transform=eval_transform(qsize or (64, 256)),
        reference_transform=eval_transform(rsize or 128),
    )
    expected = _item_batches(per_item, sampler)
    pairs = PreloadedPairs(CVUSA(cvusa_root), qsize, rsize, workers=workers)
    got = list(pairs.batches(sampler))
    assert len(got) == len(expected) > 0
    for (q, r, lab), (eq, er, elab) in zip(got, expected):
        assert q.dtype == torch.float32 and r.dtype == torch.float32
        assert torch.equal(q, eq) and torch.equal(r, er) and torch.equal(lab, elab)


def test_pairs_items_and_dataloader(cvusa_root):
    pairs = PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), 64)
    raw = CVUSA(cvusa_root, "val")
    q, r, label = pairs[2]
    assert q.dtype == torch.uint8 and q.shape == (3, 32, 128) and r.shape == (3, 64, 64)
    assert label == int(raw.labels[2])
    # the stored uint8 images are the per-item resize of the decoded files
    from torchvision.transforms import v2

    assert torch.equal(q, v2.Resize([32, 128], antialias=True)(raw[2][0]))
    assert len(list(DataLoader(pairs, batch_size=4))) == 2


def test_query_and_reference_sets_match_eval_transform(cvusa_root):
    pairs = PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), 64)
    per_item = CVUSA(
        cvusa_root,
        "val",
        query_transform=eval_transform((32, 128)),
        reference_transform=eval_transform(64),
    )
    queries, references = pairs.query_set(), pairs.reference_set()
    assert queries.images.data_ptr() == pairs.query.data_ptr()  # no copy
    for i in range(len(per_item)):
        q, r, label = per_item[i]
        assert torch.equal(queries[i][0], q) and torch.equal(references[i][0], r)
        assert queries[i][1] == label
    images, labels = next(iter(queries.batches(3)))
    assert torch.equal(images, torch.stack([per_item[i][0] for i in range(3)]))
    assert labels.tolist() == per_item.labels[:3].tolist()


def test_university_pairs_share_decoded_reference(university_root):
    source = University1652(university_root, "train")
    pairs = PreloadedPairs(source, 32, 48)
    per_item = University1652(
        university_root,
        "train",
        query_transform=eval_transform(32),
        reference_transform=eval_transform(48),
    )
    assert len(pairs) == len(per_item) == 12
    for i in range(len(per_item)):
        q, r, label = per_item[i]
        assert torch.equal(normalize(pairs.query[i]), q)
        assert torch.equal(normalize(pairs.reference[i]), r)
        assert int(pairs.labels[i]) == label


def test_university_eval_set_equals_per_item(university_root):
    view = "gallery_satellite"
    preloaded = PreloadedImages(University1652(university_root, "test", view=view), 40, workers=2)
    per_item = University1652(university_root, "test", view=view, transform=eval_transform(40))
    assert len(preloaded) == len(per_item) == 5  # 3 test buildings + 2 distractors
    loader = DataLoader(per_item, batch_size=2)
    got = list(preloaded.batches(2))
    for (x, y), (ex, ey) in zip(got, loader):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_fallback_for_datasets_without_paths(cvusa_root):
    class Items(torch.utils.data.Dataset):  # a dataset that only has items and labels
        def __init__(self, inner):
            self.inner, self.labels = inner, inner.labels

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            return self.inner[i]

    direct = PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), 64)
    fallback = PreloadedPairs(Items(CVUSA(cvusa_root, "val")), (32, 128), 64)
    assert torch.equal(direct.query, fallback.query)
    assert torch.equal(direct.reference, fallback.reference)


def test_load_images_and_errors(cvusa_root, tmp_path):
    raw = CVUSA(cvusa_root, "val")
    images = load_images(raw.reference_paths, 16, workers=2)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    with pytest.raises(ValueError, match="pass a size"):
        load_images([raw.reference_paths[0], raw.query_paths[0]])
    with pytest.raises(TypeError, match="size must be"):
        load_images(raw.reference_paths, "big")
    with pytest.raises(ValueError, match="no images"):
        load_images([])
    with pytest.raises(TypeError, match="remove the dataset's transforms"):
        PreloadedPairs(
            type(
                "T",
                (),
                {
                    "labels": [0],
                    "__getitem__": lambda s, i: (torch.rand(3, 4, 4),) * 2,
                    "__len__": lambda s: 1,
                },
            )()
        )
    with pytest.raises(ValueError, match="labels"):
        PreloadedImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_cvact_preload(tmp_path):
    root = synthetic.write_cvact(
        tmp_path, num_train=6, num_val=3, num_test=0, tile_size=64, pano_size=(32, 128)
    )
    pairs = PreloadedPairs(CVACT(root, "train"), workers=2)
    assert pairs.query.shape == (6, 3, 32, 128) and pairs.positions is not None


# -- batch augmentation ------------------------------------------------------------------------


def _tiles(b=8, s=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, s, s, generator=g, dtype=dtype)


def test_panorama_roll_matches_tile_quarter_turn_exactly():
    """The geometric truth: after augmentation, each panorama is the polar transform of its
    augmented tile (so the pair is still a valid cross-view pair)."""
    tiles = _tiles()
    panos = polar_transform(tiles, (8, 64))
    aug = PairedBatchAugmentation("panorama", generator=torch.Generator().manual_seed(0))
    seen_turns, seen_flips = set(), set()
    for _ in range(6):
        flip, turns = aug.draw(len(tiles))
        seen_turns |= set(turns.tolist())
        seen_flips |= set(flip.tolist())
        q, r = aug.geometric(panos, tiles, flip, turns)
        torch.testing.assert_close(q, polar_transform(r, (8, 64)), rtol=1e-12, atol=1e-12)
        assert not torch.equal(r, tiles)
    assert seen_turns == {0, 1, 2, 3} and seen_flips == {False, True}


def test_geometric_equals_per_pair_operations():
    tiles, panos = _tiles(dtype=torch.float32), torch.rand(8, 3, 8, 64)
    aug = PairedBatchAugmentation("panorama")
    flip = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    turns = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    q, r = aug.geometric(panos, tiles, flip, turns)
    for i in range(8):
        eq, er = panos[i], tiles[i]
        if flip[i]:
            eq, er = eq.flip(-1), er.flip(-1)
        er, eq = rotate_pair(er, eq, int(turns[i]))
        assert torch.equal(q[i], eq) and torch.equal(r[i], er)
    # the inputs are not modified in place
    assert torch.equal(tiles, _tiles(dtype=torch.float32))


def test_drone_mode_turns_only_the_reference():
    drones, tiles = torch.rand(4, 3, 16, 16), _tiles(4, 16, torch.float32)
    aug = PairedBatchAugmentation("drone")
    flip = torch.tensor([False, False, True, True])
    turns = torch.tensor([1, 3, 0, 2])
    q, r = aug.geometric(drones, tiles, flip, turns)
    assert torch.equal(q[:2], drones[:2]) and torch.equal(q[2:], drones[2:].flip(-1))
    assert torch.equal(r[0], torch.rot90(tiles[0], 1, dims=(-2, -1)))
    assert torch.equal(r[1], torch.rot90(tiles[1], 3, dims=(-2, -1)))
    assert torch.equal(r[3], torch.rot90(tiles[3].flip(-1), 2, dims=(-2, -1)))


def test_determinism_with_a_seed():
    q = torch.randint(0, 256, (16, 3, 8, 32), dtype=torch.uint8)
    r = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)

    def run(seed):
        aug = PairedBatchAugmentation(
            brightness=0.3,
            contrast=0.3,
            saturation=0.3,
            channel_gain=0.2,
            generator=torch.Generator().manual_seed(seed),
        )
        return [aug(q, r) for _ in range(3)]

    a, b, c = run(0), run(0), run(1)
    for (qa, ra), (qb, rb) in zip(a, b):
        assert torch.equal(qa, qb) and torch.equal(ra, rb)
        assert qa.dtype == torch.uint8 and ra.dtype == torch.uint8
    assert not all(torch.equal(qa, qc) for (qa, _), (qc, _) in zip(a, c))


def test_identity_when_everything_is_off():
    q, r = torch.rand(4, 3, 8, 32), torch.rand(4, 3, 16, 16)
    aug = PairedBatchAugmentation(flip_p=0.0, rotate=False)
    q2, r2 = aug(q, r)
    assert torch.equal(q, q2) and torch.equal(r, r2)


def test_colour_changes_are_per_view_and_within_strength():
    q, r = torch.full((64, 3, 4, 8), 0.5), torch.full((64, 3, 4, 4), 0.5)
    aug = PairedBatchAugmentation(
        flip_p=0.0, rotate=False, brightness=0.2, generator=torch.Generator().manual_seed(0)
    )
    q2, r2 = aug(q, r)
    fq, fr = q2[:, 0, 0, 0] / 0.5, r2[:, 0, 0, 0] / 0.5
    assert fq.min() >= 0.8 - 1e-6 and fq.max() <= 1.2 + 1e-6
    assert fq.std() > 0.05  # one factor per image ...
    assert torch.equal(q2, fq.view(-1, 1, 1, 1).expand_as(q2) * 0.5)  # ... for all its pixels
    assert not torch.allclose(fq, fr)  # independent between the views
    # saturation 1 - s .. 1 + s leaves a grey image grey; channel gains do not
    grey = PairedBatchAugmentation(rotate=False, flip_p=0.0, saturation=1.0)(q, r)[0]
    assert torch.allclose(grey, q, atol=1e-3)  # the luma weights sum to 0.9999
    tinted = PairedBatchAugmentation(rotate=False, flip_p=0.0, channel_gain=0.5)(q, r)[0]
    assert not torch.allclose(tinted[:, 0], tinted[:, 1])


def test_batch_augmentation_errors():
    aug = PairedBatchAugmentation()
    with pytest.raises(ValueError, match="divisible by 4"):
        aug.geometric(
            torch.rand(1, 3, 4, 30),
            torch.rand(1, 3, 8, 8),
            torch.tensor([False]),
            torch.tensor([1]),
        )
    with pytest.raises(ValueError, match="square"):
        aug.geometric(
            torch.rand(1, 3, 4, 32),
            torch.rand(1, 3, 8, 6),
            torch.tensor([False]),
            torch.tensor([1]),
        )
    with pytest.raises(ValueError, match="batch"):
        aug(torch.rand(3, 4, 32), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="differ in size"):
        aug(torch.rand(2, 3, 4, 32), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        PairedBatchAugmentation("street")
    with pytest.raises(ValueError, match="brightness"):
        PairedBatchAugmentation(brightness=2.0)


# -- the writers' worker processes -------------------------------------------------------------


def _digests(root):
    import hashlib
    from pathlib import Path

    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and p.suffix != ".mat"  # scipy stamps .mat headers with the time
    }


@pytest.mark.parametrize(
    ("writer", "kwargs"),
    [
        (synthetic.write_cvusa, dict(num_train=10, num_val=6)),
        (synthetic.write_cvact, dict(num_train=6, num_val=4, num_test=4, missing=2)),
        (synthetic.write_university1652, dict(num_train=4, num_test=4, num_distractors=3)),
    ],
)
def test_writers_in_worker_processes_write_the_same_files(writer, kwargs, tmp_path, monkeypatch):
    kwargs = dict(kwargs, tile_size=48, seed=5)
    serial = writer(tmp_path / "serial", **kwargs)
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(synthetic, "_cores", lambda: 2)
    parallel = writer(tmp_path / "parallel", **kwargs)
    assert _digests(serial) == _digests(parallel) != {}


def _colour_reference(x, f):
    """The four colour steps one after the other, float64, clamped once at the end."""
    luma = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    x = x.double() * f["brightness"].view(-1, 1, 1, 1).double()
    mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = mean + f["contrast"].view(-1, 1, 1, 1).double() * (x - mean)
    grey = (x * luma).sum(1, keepdim=True)
    x = grey + f["saturation"].view(-1, 1, 1, 1).double() * (x - grey)
    return x * f["channel_gain"].view(-1, 3, 1, 1).double()


def test_colour_matches_step_by_step_formulas():
    aug = PairedBatchAugmentation(
        brightness=0.3,
        contrast=0.4,
        saturation=0.5,
        channel_gain=0.2,
        generator=torch.Generator().manual_seed(2),
    )
    x = torch.rand(6, 3, 5, 7, dtype=torch.float64) * 0.6 + 0.2
    f = aug.draw_colour(6)
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "brightness": (6,),
        "contrast": (6,),
        "saturation": (6,),
        "channel_gain": (6, 3),
    }
    expected = _colour_reference(x, f)
    torch.testing.assert_close(aug.apply_colour(x, f), expected.clamp(0, 1), rtol=1e-12, atol=1e-12)
    # uint8: the same map on 0..255, rounded and clamped
    x8 = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    expected8 = _colour_reference(x8.double(), f).clamp(0, 255).round()
    got8 = aug.apply_colour(x8, f)
    assert got8.dtype == torch.uint8
    assert (got8.double() - expected8).abs().max() <= 1  # float32 work, rounding at .5


def test_polar_mode_equals_polar_transform_of_the_panorama_mode_tile():
    tiles = _tiles(dtype=torch.float64)
    panos = polar_transform(tiles, (8, 64))
    aug = PairedBatchAugmentation("panorama")
    polar = PairedBatchAugmentation("polar")
    flip = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    turns = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    q, r = aug.geometric(panos, tiles, flip, turns)
    pq, pr = polar.geometric(panos, polar_transform(tiles, (6, 32)), flip, turns)
    assert torch.equal(pq, q)
    torch.testing.assert_close(pr, polar_transform(r, (6, 32)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="divisible by 4"):
        polar.geometric(panos, torch.rand(8, 3, 6, 30), flip, turns)


def test_preload_transforms_run_once_on_uint8_batches(cvusa_root):
    to_pano = lambda x: polar_transform(x, (16, 64))  # noqa: E731
    pairs = PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), 64, reference_transform=to_pano)
    plain = PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), 64)
    assert pairs.reference.shape == (5, 3, 16, 64) and pairs.reference.dtype == torch.uint8
    assert torch.equal(pairs.reference, polar_transform(plain.reference, (16, 64)))
    assert torch.equal(pairs.query, plain.query)
    images = PreloadedImages(plain.reference, labels=plain.labels, transform=to_pano)
    assert torch.equal(images.images, pairs.reference)
    with pytest.raises(TypeError, match="uint8 batch"):
        PreloadedPairs(CVUSA(cvusa_root, "val"), reference_transform=lambda x: x.float())
