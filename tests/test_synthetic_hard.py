"""The hard synthetic CVUSA: limited field of view at an unknown heading, one-view objects."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from gsra_salad.data import CVUSA, synthetic
from gsra_salad.data._synthetic_hard import hard_views, limited_fov
from gsra_salad.data.synthetic import HardSetting


@pytest.fixture(scope="module")
def hard_root(tmp_path_factory):
    return synthetic.write_cvusa(
        tmp_path_factory.mktemp("hard"), 6, 4, tile_size=64, pano_size=(32, 128), seed=3,
        hard=HardSetting(fov_degrees=90),
    )  # fmt: skip


def test_hard_layout_is_read_by_the_cvusa_reader(hard_root):
    train, val = CVUSA(hard_root, "train"), CVUSA(hard_root, "val")
    assert len(train) == 6 and len(val) == 4
    ground, satellite, label = val[0]
    assert ground.shape == (3, 32, 32)  # 90 of 360 degrees of a 128-wide panorama
    assert satellite.shape == (3, 64, 64) and ground.dtype == torch.uint8
    assert label == 7
    meta = json.loads((hard_root / "hard_setting.json").read_text())
    assert meta["ground_size"] == [32, 32] and meta["setting"]["fov_degrees"] == 90
    headings = np.array(list(meta["heading_degrees"].values()))
    assert len(headings) == 10 and ((headings >= 0) & (headings < 360)).all()
    assert np.allclose(headings / (360 / 128), np.round(headings / (360 / 128)))  # whole columns


@pytest.mark.parametrize("fov, width", [(90, 32), (180, 64), (360, 128), (45, 16)])
def test_ground_width_follows_the_field_of_view(tmp_path, fov, width):
    root = synthetic.write_cvusa(
        tmp_path, 1, 1, tile_size=32, pano_size=(16, 128), hard=HardSetting(fov_degrees=fov)
    )
    assert CVUSA(root, "val")[0][0].shape == (3, 16, width)


def test_limited_fov_is_a_roll_then_a_crop():
    pano = np.random.default_rng(0).integers(0, 255, (8, 64, 3)).astype(np.uint8)
    for heading in (0.0, 5.625, 90.0, 270.0, 354.375):
        shift = round(heading / 360 * 64)
        expected = np.concatenate([pano, pano], axis=1)[:, shift : shift + 16]
        np.testing.assert_array_equal(limited_fov(pano, 90, heading), expected)
    np.testing.assert_array_equal(limited_fov(pano, 360, 0), pano)


def test_the_crop_sees_the_azimuths_from_the_heading_on():
    """A marker at azimuth 90 is in the view iff 90 lies within [heading, heading + fov)."""
    s, h, w = 64, 16, 64
    tile = np.zeros((s, s, 3), np.uint8)
    tile[2:8, 30:34] = 255  # north, near the edge
    east = np.rot90(tile, -1).copy()  # turned clockwise: the marker at azimuth 90
    pano = synthetic.ground_view(east, (h, w))
    assert limited_fov(pano, 90, 45).sum() > 0  # sees azimuths 45..135
    assert limited_fov(pano, 90, 180).sum() == 0  # sees 180..270
    column = int(limited_fov(pano, 90, 45)[:4, :, 0].sum(0).argmax())
    assert abs(column - w // 8) <= 1  # azimuth 90 is 45 degrees (w / 8 columns) into the view
    assert limited_fov(pano, 180, 135).sum() == 0  # sees 135..315
    assert limited_fov(pano, 180, 315).sum() > 0  # sees 315..135, across north


def test_hard_ground_view_is_the_rolled_crop_before_the_one_view_objects():
    setting = HardSetting(fov_degrees=90, ground_only_objects=(0, 0))
    for seed in range(4):
        rng = np.random.default_rng(seed)
        tile = synthetic.aerial_tile(rng, 64)
        views = hard_views(rng, tile, (32, 128), setting)
        np.testing.assert_array_equal(views.panorama, synthetic.ground_view(tile, (32, 128)))
        np.testing.assert_array_equal(
            views.ground_clean, limited_fov(views.panorama, 90, views.heading_degrees)
        )
        assert views.ground.shape == (32, 32, 3) and views.satellite.shape == (64, 64, 3)
        # occluders and the photometric change make the written view differ from the crop
        assert not np.array_equal(views.ground, views.ground_clean)


def test_heading_is_random_unless_switched_off():
    tile = synthetic.aerial_tile(np.random.default_rng(0), 32)
    headings = {
        hard_views(np.random.default_rng(s), tile, (16, 64), HardSetting()).heading_degrees
        for s in range(20)
    }
    assert len(headings) > 10
    fixed = HardSetting(fov_degrees=90, random_heading=False, ground_only_objects=(0, 0))
    views = hard_views(np.random.default_rng(1), tile, (16, 64), fixed)
    assert views.heading_degrees == 0.0
    np.testing.assert_array_equal(views.ground_clean, views.panorama[:, :16])


def test_one_view_objects_change_each_views_scene():
    tile = synthetic.aerial_tile(np.random.default_rng(0), 64)
    changed = HardSetting(ground_only_objects=(4, 4))
    views = hard_views(np.random.default_rng(0), tile, (32, 128), changed)
    # the ground scene is not the shared tile's: its panorama differs from the tile's
    assert not np.array_equal(views.panorama, synthetic.ground_view(tile, (32, 128)))


def test_hard_writer_is_deterministic_by_seed(tmp_path):
    setting = HardSetting(fov_degrees=180)
    kwargs = dict(tile_size=32, pano_size=(16, 64), hard=setting)
    a = synthetic.write_cvusa(tmp_path / "a", 3, 1, seed=7, **kwargs)
    b = synthetic.write_cvusa(tmp_path / "b", 3, 1, seed=7, **kwargs)
    c = synthetic.write_cvusa(tmp_path / "c", 3, 1, seed=8, **kwargs)
    for name in ("bingmap/19/0000002.jpg", "streetview/panos/0000004.jpg", "hard_setting.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        if name != "hard_setting.json":
            assert (a / name).read_bytes() != (c / name).read_bytes()


def test_colour_histograms_cannot_solve_the_hard_task(tmp_path):
    """400 locations: colour statistics alone give at most 5% Recall@1 (chance 0.25%)."""
    root = synthetic.write_cvusa(
        tmp_path, 0, 400, tile_size=64, pano_size=(32, 128), hard=HardSetting()
    )
    val = CVUSA(root, "val")
    grounds = torch.stack([val[i][0] for i in range(len(val))])
    tiles = torch.stack([val[i][1] for i in range(len(val))])
    sims = (
        synthetic.colour_histogram_descriptors(grounds)
        @ synthetic.colour_histogram_descriptors(tiles).T
    )
    assert (sims.argmax(1) == torch.arange(len(val))).double().mean().item() <= 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fov_degrees": 0}, "fov_degrees must be in"),
        ({"fov_degrees": 400}, "fov_degrees must be in"),
        ({"occluders": (3, 1)}, "occluders must be a"),
        ({"transients": (1,)}, "transients must be a"),
        ({"ground_only_objects": (0.5, 2)}, "ground_only_objects must be a"),
        ({"cloud_shadow_p": 1.5}, "cloud_shadow_p must be in"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardSetting(**kwargs)


def test_hard_must_be_a_setting(tmp_path):
    with pytest.raises(TypeError, match="hard must be a HardSetting"):
        synthetic.write_cvusa(tmp_path, 1, 1, tile_size=32, hard="hard")  # type: ignore[arg-type]


def test_ablation_benchmark_quick_run(tmp_path):
    """The benchmark's smoke run: every variant trains, the JSON holds the table and baseline."""
    pytest.importorskip("torchvision")
    from benchmarks import ablation_synthetic

    out = tmp_path / "ablation.json"
    result = ablation_synthetic.main(
        ["--quick", "--seeds", "0", "--data-dir", str(tmp_path), "--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert set(saved["table"]) == set(ablation_synthetic.VARIANTS) == set(result["table"])
    assert len(saved["runs"]) == len(ablation_synthetic.VARIANTS)
    assert all(0 <= run["R@1"] <= run["R@5"] <= 100 for run in saved["runs"])
    assert {"torch", "device", "commit"} <= set(saved["environment"])
    assert saved["config"]["setting"] == "raw" and len(saved["query_size"]) == 2
    assert all(run["train_cpu_s"] > 0 and run["steps"] > 0 for run in saved["runs"])
    merged = ablation_synthetic.main(["--merge", str(out), str(out), "--json", str(tmp_path / "m")])
    assert merged["table"]["gsra+salad"]["runs"] == 2
