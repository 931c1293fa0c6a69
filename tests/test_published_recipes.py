"""The published recipes against the published values (issue 17): LRFR's and Sample4Geo's
schedules at their first, middle and last step, the per-image augmentations' parameters,
Sample4Geo's batch composition on a GPS-tagged synthetic set, the papers' University-1652
scoring beside the official one, and the step-for-step reproduction check."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import reproduce_published as published
from gsra_salad import recipes
from gsra_salad.cli._train import UsageError, add_arguments, resolve_recipe
from gsra_salad.data import (
    CVACT,
    CVUSA,
    CoarseDropout,
    GridDropout,
    JPEGCompression,
    NeighbourBatchSampler,
    Sharpen,
    UniqueLabelBatchSampler,
    published_augmentation,
    synthetic,
    train_transform,
)
from gsra_salad.evaluation import evaluate_retrieval
from gsra_salad.training import RetrievalTask, TrainConfig, build_train_state, evaluate
from gsra_salad.training import loop as training_loop

pytest.importorskip("torchvision")


class _Batches:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps


def _factor(config: TrainConfig, steps_per_epoch: int):
    state = build_train_state(nn.Linear(2, 2), nn.Identity(), _Batches(steps_per_epoch), config)
    return state.scheduler.lr_lambdas[0]


# -- schedules ---------------------------------------------------------------------------------


def test_lrfr_schedule_is_transformers_linear_over_int_1_05_t():
    config = recipes.get("lrfr-university1652").train
    steps_per_epoch = 37854 // 32  # University-1652's training pairs, batch 32
    total = config.epochs * steps_per_epoch
    ours = _factor(config, steps_per_epoch)
    theirs = published.transformers_linear(0, int(1.05 * total))
    for step in (0, total // 2, total - 1):
        assert ours(step) == pytest.approx(theirs(step), abs=1e-15), step
    assert ours(0) == 1.0
    # the last step still trains at ~4.8% of the peak (ours before: 1 / T)
    assert ours(total - 1) == pytest.approx(0.0477, abs=2e-4)
    assert config.lr == 1e-4 and config.warmup_epochs == 0


def test_sample4geo_schedule_is_transformers_cosine_with_one_warmup_epoch():
    config = recipes.get("sample4geo-cvusa").train
    steps_per_epoch = 35532 // 128
    total = config.epochs * steps_per_epoch
    ours = _factor(config, steps_per_epoch)
    theirs = published.transformers_cosine(steps_per_epoch, total)
    for step in (0, steps_per_epoch // 2, steps_per_epoch, total // 2, total - 1):
        assert ours(step) == pytest.approx(theirs(step), abs=1e-15), step
    assert (config.lr, config.batch_size, config.epochs) == (1e-3, 128, 40)


def test_lrfr_scaler_starts_at_2_to_the_10(monkeypatch):
    seen = {}

    def scaler(device, precision, init_scale=2.0**16):
        seen["init_scale"] = init_scale
        return torch.amp.GradScaler("cpu", enabled=False)

    monkeypatch.setattr(training_loop, "grad_scaler", scaler)
    for name, expected in (("lrfr-university1652", 2.0**10), ("sample4geo-cvusa", 2.0**16)):
        build_train_state(nn.Linear(2, 2), nn.Identity(), _Batches(3), recipes.get(name).train)
        assert seen["init_scale"] == expected, name


def test_schedule_length_and_scaler_scale_are_checked_and_resume_compatible():
    with pytest.raises(ValueError, match="schedule_length must be >= 1"):
        TrainConfig(schedule_length=0.5)
    with pytest.raises(ValueError, match="scaler_init_scale must be > 0"):
        TrainConfig(scaler_init_scale=0)
    with pytest.raises(ValueError, match="mining_nearest"):
        TrainConfig(neighbours_per_anchor=4, mining_nearest=5)
    # a run saved before these fields existed resumes with their defaults
    from gsra_salad.training import resume_changes

    saved = TrainConfig().as_dict()
    for name in ("schedule_length", "scaler_init_scale", "mining_nearest", "mining_from"):
        saved.pop(name)
    assert resume_changes(saved, TrainConfig(), trained_epochs=1) is False
    with pytest.raises(ValueError, match=r"schedule_length was 1\.0, now 1\.05"):
        resume_changes(saved, TrainConfig(schedule_length=1.05), trained_epochs=1)


# -- augmentations -----------------------------------------------------------------------------


def _albumentations_grid_holes(height, width, ratio):
    """albumentations 1.3 ``GridDropout.get_params_dependent_on_targets`` with its defaults
    (no unit sizes, no hole numbers, no shift, no random offset)."""
    unit_width = max(2, width // 10)
    unit_height = max(min(unit_width, height), 2)
    hole_width = int(unit_width * ratio)
    hole_height = int(unit_height * ratio)
    hole_width = min(max(hole_width, 1), unit_width - 1)
    hole_height = min(max(hole_height, 1), unit_height - 1)
    shift_x = shift_y = 0
    holes = []
    for i in range(width // unit_width + 1):
        for j in range(height // unit_height + 1):
            x1 = min(shift_x + unit_width * i, width)
            y1 = min(shift_y + unit_height * j, height)
            x2 = min(x1 + hole_width, width)
            y2 = min(y1 + hole_height, height)
            holes.append((x1, y1, x2, y2))
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in holes:
        mask[y1:y2, x1:x2] = True
    return mask


@pytest.mark.parametrize("size", [(384, 384), (140, 768), (37, 53)])
@pytest.mark.parametrize("ratio", [0.4, 0.5])
def test_grid_dropout_is_albumentations_grid(size, ratio):
    assert torch.equal(GridDropout(ratio).mask(*size), _albumentations_grid_holes(*size, ratio))


def _parts(compose):
    """(p, inner transform) of each RandomApply of a published augmentation."""
    return [(t.p, t.transforms[0]) for t in compose.transforms[1:]]


@pytest.mark.parametrize(
    ("size", "ratio"), [((384, 384), 0.4), ((140, 768), 0.5), ((256, 256), 0.4)]
)
def test_published_augmentation_has_the_published_parameters(size, ratio):
    v2 = pytest.importorskip("torchvision.transforms.v2")
    (p_jpeg, jpeg), (p_jitter, jitter), (p_blur, blur_or_sharpen), (p_drop, dropout) = _parts(
        published_augmentation(size, grid_ratio=ratio)
    )
    # ImageCompression(quality_lower=90, quality_upper=100, p=0.5)
    assert isinstance(jpeg, JPEGCompression) and jpeg.quality == (90, 100) and p_jpeg == 0.5
    # ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.15, p=0.5)
    assert isinstance(jitter, v2.ColorJitter) and p_jitter == 0.5
    for name in ("brightness", "contrast", "saturation"):
        assert tuple(getattr(jitter, name)) == pytest.approx((0.85, 1.15)), name
    assert tuple(jitter.hue) == pytest.approx((-0.15, 0.15))
    # OneOf([AdvancedBlur(blur_limit=(3, 7), sigma 0.2-1.0), Sharpen((0.2, 0.5), (0.5, 1))], 0.3)
    blur, sharpen = blur_or_sharpen.transforms
    assert p_blur == 0.3 and blur_or_sharpen.p == [0.5, 0.5]
    assert [tuple(b.kernel_size) for b in blur.transforms] == [(3, 3), (5, 5), (7, 7)]
    assert all(tuple(b.sigma) == (0.2, 1.0) for b in blur.transforms)
    assert isinstance(sharpen, Sharpen)
    assert (sharpen.alpha, sharpen.lightness) == ((0.2, 0.5), (0.5, 1.0))
    # OneOf([GridDropout(ratio), CoarseDropout(10-25 holes, int(0.1 H) - int(0.2 H))], p=0.3)
    grid, coarse = dropout.transforms
    assert p_drop == 0.3 and dropout.p == [0.5, 0.5]
    assert isinstance(grid, GridDropout) and grid.ratio == ratio and grid.fill == 0
    assert isinstance(coarse, CoarseDropout) and coarse.holes == (10, 25)
    assert coarse.hole_size == (int(0.1 * size[0]), int(0.2 * size[0])) and coarse.fill == 0


def test_views_get_the_published_grid_ratio_and_recipes_use_the_published_set():
    def grid_ratio(view):
        transform = train_transform(view, (64, 64), normalize=False, augmentations="published")
        dropout = transform.transforms[-1].transforms[-1].transforms[0]
        return dropout.transforms[0].ratio

    assert grid_ratio("ground") == 0.5  # Sample4Geo's ground view
    assert grid_ratio("satellite") == grid_ratio("drone") == 0.4
    for name in ("sample4geo-cvusa", "sample4geo-cvact", "lrfr-university1652"):
        assert recipes.get(name).image_augmentation == "published", name
    out = train_transform("ground", (16, 64), normalize=False, augmentations="published")(
        torch.randint(0, 256, (3, 20, 80), dtype=torch.uint8)
    )
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 64)  # pixels: normalised later


def test_sharpen_is_albumentations_kernel_with_reflected_borders():
    sharpen = Sharpen()
    expected = (1 - 0.3) * np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]]) + 0.3 * np.array(
        [[-1, -1, -1], [-1, 8 + 0.7, -1], [-1, -1, -1]]
    )
    np.testing.assert_allclose(sharpen.kernel(0.3, 0.7).numpy(), expected, rtol=1e-6)
    image = torch.randint(0, 256, (3, 6, 7), dtype=torch.uint8)
    torch.manual_seed(3)
    u = torch.rand(2)
    alpha, lightness = 0.2 + 0.3 * float(u[0]), 0.5 + 0.5 * float(u[1])
    torch.manual_seed(3)
    out = sharpen(image)
    kernel = sharpen.kernel(alpha, lightness).double().numpy()
    padded = np.pad(image.double().numpy(), ((0, 0), (1, 1), (1, 1)), mode="reflect")  # 101
    manual = np.zeros((3, 6, 7))
    for dy in range(3):
        for dx in range(3):
            manual += kernel[dy, dx] * padded[:, dy : dy + 6, dx : dx + 7]
    assert torch.equal(out, torch.from_numpy(np.clip(np.round(manual), 0, 255)).to(torch.uint8))


def test_jpeg_compression_draws_qualities_90_to_100_without_deprecated_torchvision_coding():
    pytest.importorskip("PIL")
    import warnings

    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        outs = [JPEGCompression((90, 100))(image) for _ in range(5)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    assert any(not torch.equal(o, image) for o in outs)  # lossy
    torch.manual_seed(0)
    drawn = {int(torch.randint(90, 101, ())) for _ in range(300)}
    assert drawn == set(range(90, 101))  # both ends included, as albumentations' randint
    with pytest.raises(ValueError, match="quality"):
        JPEGCompression((0, 100))


def test_coarse_dropout_draws_10_to_25_holes_of_the_published_sizes():
    torch.manual_seed(0)
    dropout = CoarseDropout((10, 25), (10, 20))
    areas = []
    for _ in range(30):
        out = dropout(torch.full((3, 100, 100), 200, dtype=torch.uint8))
        holes = (out == 0).all(0)
        assert torch.equal((out == 0).any(0), holes)  # all channels at once, nothing else
        areas.append(int(holes.sum()))
    assert min(areas) >= 10 * 10  # at least one hole of at least 10 x 10 (they may overlap)
    assert max(areas) <= 25 * 20 * 20
    with pytest.raises(ValueError, match="holes"):
        CoarseDropout((0, 3), (1, 2))


# -- Sample4Geo's batches ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gps_set(tmp_path_factory):
    pytest.importorskip("scipy")
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("cvact")
    synthetic.write_cvact(root, num_train=1024, num_val=4, num_test=0, tile_size=16,
                          pano_size=(8, 32))  # fmt: skip
    pairs = CVACT(root, "train")
    return pairs.labels, pairs.positions, pairs


def _neighbour_share(batches, neighbours, nearest=32):
    """Mean share of each sample's ``nearest`` GPS neighbours that are in its batch."""
    batch_of = {}
    for b, batch in enumerate(batches):
        for i in batch:
            batch_of[int(i)] = b
    shares = [
        np.mean([batch_of.get(int(j), -1) == batch_of[i] for j in neighbours[i][:nearest]])
        for i in batch_of
    ]
    return float(np.mean(shares))


def test_gps_batches_follow_sample4geo_rule(gps_set):
    labels, _, pairs = gps_set
    config = recipes.get("sample4geo-cvact").train
    assert (config.mining_neighbours, config.neighbours_per_anchor, config.mining_nearest) == (
        128,
        64,
        32,
    )
    assert config.mining == "gps+embedding" and config.mining_from == "query"
    sampler = training_loop._build_sampler(labels, pairs, config, config.batch_size)
    assert isinstance(sampler, NeighbourBatchSampler) and sampler.neighbours.shape[1] == 128
    batches = list(sampler)
    assert all(len(set(labels[b])) == len(b) == 128 for b in batches)
    # the first batch: its anchor, the anchor's 32 nearest, then 32 of its ranks 33-128
    anchor = int(sampler._order()[0])
    first, row = batches[0], sampler.neighbours[anchor]
    assert first[0] == anchor and first[1:33] == [int(j) for j in row[:32]]
    assert set(first[33:65]) <= {int(j) for j in row[32:]} and len(set(first[33:65])) == 32
    # over the epoch: how many of a sample's 32 nearest share its batch, against Sample4Geo's
    # shuffle (transcribed) on the same neighbour lists, and against random batches
    ours = _neighbour_share(batches, sampler.neighbours)
    ids = list(range(1, len(labels) + 1))  # Sample4Geo skips id 0 as a neighbour
    sim_dict = {i + 1: [int(j) + 1 for j in sampler.neighbours[i]] for i in range(len(labels))}
    order = published.sample4geo_shuffle(ids, sim_dict, 128, seed=1)
    theirs_batches = [[i - 1 for i in order[k : k + 128]] for k in range(0, len(order) - 127, 128)]
    theirs = _neighbour_share(theirs_batches, sampler.neighbours)
    plain = UniqueLabelBatchSampler(labels, 128, seed=1)
    random_share = _neighbour_share(list(plain), sampler.neighbours)
    # measured: ours 0.488, Sample4Geo's 0.485, random batches 0.126
    assert random_share < 0.15
    assert ours > 3 * random_share and theirs > 3 * random_share
    assert abs(ours - theirs) < 0.03, (ours, theirs)


def test_query_to_reference_neighbours_leave_out_the_own_reference():
    g = torch.Generator().manual_seed(0)
    refs, queries = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    sampler = NeighbourBatchSampler.from_embeddings(
        np.arange(40), refs.numpy(), 4, k=5, query_embeddings=queries.numpy()
    )
    scores = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(refs, dim=1).T
    scores.fill_diagonal_(-math.inf)
    assert np.array_equal(sampler.neighbours, scores.topk(5, dim=1).indices.numpy())


def test_cvusa_reads_positions_where_the_release_has_them(tmp_path):
    pytest.importorskip("PIL")
    with_gps = synthetic.write_cvusa(tmp_path / "a", 12, 4, tile_size=16, pano_size=(8, 32),
                                     locations=True)  # fmt: skip
    pairs = CVUSA(with_gps, "train")
    assert pairs.positions.shape == (12, 2) and pairs.position_metric == "haversine"
    assert np.all(np.abs(pairs.positions - [40.0, -100.0]) < 0.01)
    without = synthetic.write_cvusa(tmp_path / "b", 12, 4, tile_size=16, pano_size=(8, 32))
    assert CVUSA(without, "train").positions is None
    recipe = recipes.get("sample4geo-cvusa")
    with pytest.raises(ValueError, match=r"split_locations/all\.csv.*--mining embedding"):
        recipes.load_data(recipe, without)
    data = recipes.load_data(recipe.replace(mining="embedding"), without)
    assert data.train.mining_queries is not None  # ground->satellite neighbours later
    query, reference, _ = data.train.pairs[0]  # the published augmentations, pixels out
    assert (query.dtype, query.shape, reference.shape) == (
        torch.uint8,
        (3, 140, 768),
        (3, 384, 384),
    )


def test_lrfr_university_recipe_reads_pixels_and_scores_both_ways(tmp_path):
    pytest.importorskip("PIL")
    root = synthetic.write_university1652(tmp_path, num_train=4, num_test=3, num_distractors=2,
                                          drones_per_building=2)  # fmt: skip
    recipe = recipes.get("lrfr-university1652")
    assert recipe.augmentation == recipes.Augmentation("drone", flip_p=0.5, rotate=True)
    data = recipes.load_data(recipe, root)
    drone, satellite, _ = data.train.pairs[0]
    assert drone.dtype == satellite.dtype == torch.uint8 and drone.shape == (3, 384, 384)
    assert [t.papers_scoring for t in data.tasks] == [True, True]
    assert data.train.augmentation.rotate and data.train.augmentation.mode == "drone"


# -- scoring -----------------------------------------------------------------------------------


def _lrfr_recall_top1pct(q, r, ql, rl):
    """LRFR's evaluation: gallery sorted by similarity, CMC per query, CMC[round(0.01 G)]."""
    hits = []
    for i in range(len(q)):
        order = torch.argsort(r @ q[i], descending=True)
        good = (rl[order] == ql[i]).nonzero()
        cmc = torch.zeros(len(r))
        cmc[int(good[0]) :] = 1
        hits.append(cmc[round(len(r) * 0.01)])
    return 100 * float(torch.stack(hits).mean())


def test_lrfr_recall_top1pct_is_one_position_later():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(60, 16, generator=g), torch.randn(250, 16, generator=g)
    ql, rl = torch.arange(60) % 50, torch.arange(250) % 50
    ours = evaluate_retrieval(q, r, ql, rl, protocol="university1652", one_percent="lrfr")
    assert ours["R@1%"] == pytest.approx(_lrfr_recall_top1pct(q, r, ql, rl))
    floor = evaluate_retrieval(q, r, ql, rl, protocol="university1652", ks=(2, 3))
    assert floor["R@1%"] == floor["R@2"] and ours["R@1%"] == floor["R@3"]  # G = 250


def test_evaluate_reports_the_papers_scoring_beside_the_official_one():
    g = torch.Generator().manual_seed(1)
    queries = [(torch.randn(8, generator=g), int(i % 10)) for i in range(30)]
    gallery = [(torch.randn(8, generator=g), int(i)) for i in range(40)]  # 30 distractors

    class Embedder(nn.Module):
        def embed(self, images, view):
            return images

    task = RetrievalTask("drone->satellite", queries, gallery, protocol="university1652",
                         papers_scoring=True)  # fmt: skip
    metrics = evaluate(Embedder(), [task], TrainConfig(eval_batch_size=16, workers=0,
                                                       progress=False))  # fmt: skip
    official, papers = metrics["drone->satellite"], metrics["drone->satellite (papers)"]
    assert (official["references"], papers["references"]) == (40, 10)
    assert papers["R@1"] >= official["R@1"] and papers["AP"] >= official["AP"]
    with pytest.raises(ValueError, match="papers_scoring applies to the university1652"):
        evaluate(Embedder(), [dataclasses.replace(task, protocol="cvusa")], TrainConfig(
            eval_batch_size=16, workers=0, progress=False))  # fmt: skip


# -- the command line --------------------------------------------------------------------------


def _resolve(dataset, *argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, dataset)
    args = parser.parse_args(list(argv))
    args.dataset = dataset
    return resolve_recipe(args)


def test_recipe_flag_selects_a_named_recipe(tmp_path, capsys):
    assert _resolve("cvusa", "--data-root", str(tmp_path)).name == "cvusa"
    lrfr = _resolve("cvusa", "--data-root", str(tmp_path), "--recipe", "lrfr-cvusa")
    assert lrfr.loss == "triplet" and lrfr.train.mining == "gps+embedding"
    with pytest.raises(UsageError, match="--demo"):
        _resolve("cvact", "--demo", "--recipe", "sample4geo-cvact")
    with pytest.raises(SystemExit):
        _resolve("cvusa", "--data-root", str(tmp_path), "--recipe", "lrfr-university1652")
    assert "invalid choice" in capsys.readouterr().err


def test_a_run_saved_before_the_new_fields_resumes_with_their_defaults():
    from gsra_salad.cli._train import _recipe_changes

    old = recipes.get("cvusa-demo")  # unchanged by the new fields: they keep their defaults
    saved = old.as_dict()
    del saved["image_augmentation"]
    for name in ("schedule_length", "scaler_init_scale", "mining_nearest", "mining_from"):
        del saved["train"][name]
    assert _recipe_changes(saved, old) == []
    changed = old.replace(schedule_length=1.05)
    assert _recipe_changes(saved, changed) == ["--schedule-length was 1.0, now 1.05"]


def test_published_image_augmentation_needs_per_item_loading(tmp_path):
    with pytest.raises(ValueError, match="per image"):
        recipes.get("cvusa-demo").replace(image_augmentation="published")
    library = _resolve("cvusa", "--data-root", str(tmp_path), "--image-augmentation", "library")
    assert library.image_augmentation == "library"


# -- the reproduction check --------------------------------------------------------------------


def test_the_library_step_reproduces_the_published_loops(capsys):
    names = ["lrfr-university1652", "sample4geo-cvusa"]  # sample4geo-cvact: the same step
    results = published.main(
        ["--steps-per-epoch", "2", "--epochs", "2", "--batch", "4", "--recipes", *names]
    )
    assert [r["recipe"] for r in results] == names
    for r in results:
        assert r["max_weight_diff"] < 1e-10, r
        assert r["max_lr_diff"] < 1e-15, r
    assert "max |dw|" in capsys.readouterr().out
