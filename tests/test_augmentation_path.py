"""One augmentation path: the paired rule written once (single pair = batch of one), applied to
pixels before the normalisation, identically on the in-memory and the DataLoader paths."""

import dataclasses

import pytest
import torch

from gsra_salad import SALAD, CrossViewGeoLocalizer, InputConfig
from gsra_salad.data import (
    CVUSA,
    PairedAugmentation,
    PairedBatchAugmentation,
    PreloadedPairs,
    UniqueLabelBatchSampler,
    create_transform,
    eval_transform,
    polar_transform,
    rotate_pair,
    synthetic,
)
from gsra_salad.data.preload import normalize
from gsra_salad.models import TinyCNN
from gsra_salad.training import TrainConfig, TrainData, get_context
from gsra_salad.training.loop import _epoch_batches, _normalisation

pytest.importorskip("PIL")
pytest.importorskip("torchvision")

QUERY = InputConfig((32, 128), mean=(0.5, 0.45, 0.4), std=(0.25, 0.2, 0.3))
REFERENCE = InputConfig((32, 128), view_transform="polar")


@pytest.fixture(scope="module")
def cvusa_root(tmp_path_factory):
    return synthetic.write_cvusa(
        tmp_path_factory.mktemp("cvusa"), num_train=12, num_val=2, tile_size=64, pano_size=(32, 256)
    )


def _augmentation(seed=5):
    return PairedBatchAugmentation(
        "polar",
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        channel_gain=0.1,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------
# the rule, once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["panorama", "polar", "drone"])
def test_single_pair_and_batch_rules_agree_on_all_flips_and_turns(mode):
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    queries = torch.randint(0, 256, (8, 3, 8, 32), dtype=torch.uint8, generator=g)
    references = polar_transform(tiles, (8, 32)) if mode == "polar" else tiles
    flips = torch.tensor([False, True] * 4)
    turns = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch_q, batch_r = PairedBatchAugmentation(mode).geometric(queries, references, flips, turns)
    for i in range(8):
        single = PairedAugmentation(mode)
        single.draw = lambda b, i=i: (flips[i : i + 1], turns[i : i + 1])  # this combination
        q, r = single(queries[i], references[i])
        assert torch.equal(q, batch_q[i]) and torch.equal(r, batch_r[i]), (mode, i)
        # the rule itself: mirror both, then turn (and roll to match)
        eq, er = queries[i], references[i]
        if flips[i]:
            eq, er = eq.flip(-1), er.flip(-1)
        k = int(turns[i])
        if mode == "panorama":
            er, eq = rotate_pair(er, eq, k)
        elif mode == "polar":
            eq, er = torch.roll(eq, -k * 8, dims=-1), torch.roll(er, -k * 8, dims=-1)
        else:
            er = torch.rot90(er, k, dims=(-2, -1))
        assert torch.equal(q, eq) and torch.equal(r, er), (mode, i)


def test_single_pair_draws_come_from_its_generator():
    pano, tile = torch.rand(3, 8, 32), torch.rand(3, 16, 16)
    a = PairedAugmentation("panorama", generator=torch.Generator().manual_seed(3))
    b = PairedBatchAugmentation("panorama", generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        q, r = a(pano, tile)
        bq, br = b(pano[None], tile[None])
        assert torch.equal(q, bq[0]) and torch.equal(r, br[0])
    assert isinstance(a, PairedBatchAugmentation)
    assert repr(a).startswith("PairedAugmentation(mode='panorama', flip_p=0.5")
    with pytest.raises(ValueError, match=r"one image \(3, H, W\).*PairedBatchAugmentation"):
        a(pano[None], tile[None])


def test_augmentation_refuses_normalised_images_instead_of_clamping():
    tiles = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    panos = torch.randint(0, 256, (4, 3, 8, 32), dtype=torch.uint8)
    normalised = eval_transform((8, 32))(panos)
    aug = PairedBatchAugmentation(brightness=0.2)
    with pytest.raises(ValueError, match=r"query images: .*normalised already.*normalize=False"):
        aug(normalised, tiles)
    with pytest.raises(ValueError, match=r"reference images: .*divide by 255"):
        aug(panos, tiles.float())  # [0, 255] floats would be clamped to white
    with pytest.raises(
        ValueError, match=r"PairedAugmentation: the reference images: .*normalised already"
    ):
        PairedAugmentation()(panos[0], eval_transform(16)(tiles[0]))
    # pixels are fine: uint8 and floats in [0, 1]
    q, r = aug(panos, tiles)
    assert q.dtype == torch.uint8 and r.dtype == torch.uint8
    q, r = aug(panos / 255, tiles / 255)
    assert 0 <= float(q.min()) and float(q.max()) <= 1


# ---------------------------------------------------------------------------------------------
# the loop: augment pixels, then normalise, on both paths
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """What _epoch_batches reads of the run state."""

    config: TrainConfig
    sampler: UniqueLabelBatchSampler


def test_dataloader_and_in_memory_paths_give_identical_batches(cvusa_root):
    model = CrossViewGeoLocalizer(
        TinyCNN(16),
        None,
        SALAD(16, num_clusters=4, cluster_dim=4, token_dim=0),
        input_config={"query": QUERY, "reference": REFERENCE},
    )
    in_memory = PreloadedPairs(CVUSA(cvusa_root), query_input=QUERY, reference_input=REFERENCE)
    per_item = CVUSA(
        cvusa_root,
        query_transform=create_transform(model, "query", normalize=False),
        reference_transform=create_transform(model, "reference", normalize=False),
    )
    sampler = UniqueLabelBatchSampler(in_memory.labels, 4, seed=2, drop_last=True)
    config, context = TrainConfig(workers=0, progress=False), get_context()
    stats = _normalisation(model, per_item)
    assert stats == {"query": (QUERY.mean, QUERY.std), "reference": (REFERENCE.mean, REFERENCE.std)}

    def epoch(data):
        batches = _epoch_batches(
            TrainData(data, _augmentation()), _State(config, sampler), 0, context, stats
        )
        return list(batches)

    a, b = epoch(in_memory), epoch(per_item)
    assert len(a) == len(b) == 3
    for (qa, ra, la), (qb, rb, lb) in zip(a, b):
        assert qa.dtype == torch.float32 and qa.shape == (4, 3, 32, 128)
        assert torch.equal(qa, qb) and torch.equal(ra, rb) and torch.equal(la, lb)
    # normalised after the augmentation, with each view's statistics (not ImageNet's)
    indices = next(iter(sampler))
    q, r, _ = in_memory.batch(indices)
    q, r = _augmentation()(q, r)
    assert torch.equal(a[0][0], normalize(q, QUERY.mean, QUERY.std))
    assert torch.equal(a[0][1], normalize(r, REFERENCE.mean, REFERENCE.std))
    assert not torch.equal(a[0][0], normalize(q))


def test_a_dataloader_of_normalised_images_with_a_batch_augmentation_is_an_error(cvusa_root):
    """Before, the colour step clamped normalised values to [0, 1]: the images were wrecked
    silently. Now it stops, naming the fix."""
    normalised = CVUSA(
        cvusa_root,
        query_transform=eval_transform((32, 128)),
        reference_transform=eval_transform((32, 128)),
    )
    sampler = UniqueLabelBatchSampler(normalised.labels, 4, seed=2, drop_last=True)
    config, context = TrainConfig(workers=0, progress=False), get_context()
    batches = _epoch_batches(
        TrainData(normalised, _augmentation()), _State(config, sampler), 0, context
    )
    with pytest.raises(ValueError, match=r"normalised already.*normalize=False"):
        next(iter(batches))
    # without augmentation normalised floats pass through untouched
    batches = _epoch_batches(TrainData(normalised), _State(config, sampler), 0, context)
    q, _, _ = next(iter(batches))
    assert q.dtype == torch.float32 and float(q.min()) < 0


def test_normalisation_statistics_come_from_the_model_then_the_data_then_imagenet():
    imagenet = (InputConfig(8).mean, InputConfig(8).std)
    assert _normalisation(None, object()) == {"query": imagenet, "reference": imagenet}

    class Data:
        query_input, reference_input = QUERY, None

    assert _normalisation(None, Data())["query"] == (QUERY.mean, QUERY.std)
    assert _normalisation(None, Data())["reference"] == imagenet

    class Model:
        def __init__(self):
            self.input_config = {"query": REFERENCE, "reference": QUERY}

    assert _normalisation(Model(), Data())["query"] == (REFERENCE.mean, REFERENCE.std)
