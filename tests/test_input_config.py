"""Transforms built from a model's InputConfig: create_transform, resolve_input_config and the
in-memory path (PreloadedPairs / PreloadedImages) fed by the same configs."""

import pickle

import pytest
import torch

from gsra_salad import SALAD, CrossViewGeoLocalizer, InputConfig
from gsra_salad.data import (
    CVUSA,
    PreloadedImages,
    PreloadedPairs,
    create_transform,
    eval_transform,
    polar_transform,
    resolve_input_config,
    synthetic,
)
from gsra_salad.data.preload import normalize
from gsra_salad.models import TinyCNN

pytest.importorskip("PIL")
v2 = pytest.importorskip("torchvision.transforms.v2")

PANORAMA = InputConfig((32, 128))
POLAR = InputConfig((32, 128), view_transform="polar")
POLAR_CROP = InputConfig((32, 128), view_transform="polar", polar_crop=0.7)
OTHER_STATS = InputConfig((24, 48), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))


@pytest.fixture(scope="module")
def cvusa_root(tmp_path_factory):
    return synthetic.write_cvusa(
        tmp_path_factory.mktemp("cvusa"), num_train=6, num_val=4, tile_size=64, pano_size=(32, 256)
    )


def _image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def _model(input_config=None):
    return CrossViewGeoLocalizer(
        TinyCNN(16),
        None,
        SALAD(16, num_clusters=4, cluster_dim=4, token_dim=0),
        input_config=input_config,
    )


# ---------------------------------------------------------------------------------------------
# create_transform reproduces the pipelines the demos used to hand-build
# ---------------------------------------------------------------------------------------------


def test_create_transform_equals_the_cvusa_demo_pipeline():
    """The CVUSA/CVACT demo: panoramas resized, tiles polar-transformed at their own size,
    both normalised with ImageNet's statistics (PreloadedPairs(..., query_size, None,
    reference_transform=partial(polar_transform, size=...)) then normalize)."""
    tile, panorama = _image((3, 64, 64), 1), _image((3, 48, 300), 2)
    want_reference = normalize(polar_transform(tile[None], (32, 128)))[0]
    want_query = normalize(v2.functional.resize(panorama, [32, 128], antialias=True))
    model = _model({"query": PANORAMA, "reference": POLAR})
    assert torch.equal(create_transform(model, "reference")(tile), want_reference)
    assert torch.equal(create_transform(model, "query")(panorama), want_query)
    assert torch.equal(
        create_transform(model, "query")(panorama), eval_transform((32, 128))(panorama)
    )


def test_create_transform_equals_the_university_demo_crop():
    """The University-1652 demo's tile_to_panorama: the centre 0.7 of the side, then polar."""
    tile = _image((3, 64, 64), 3)
    side = tile.shape[-1]
    kept = round(side * 0.7)
    top = (side - kept) // 2
    want = polar_transform(tile[..., top : top + kept, top : top + kept], (32, 128))
    assert torch.equal(create_transform(POLAR_CROP, normalize=False)(tile), want)
    assert torch.equal(create_transform(POLAR_CROP)(tile), normalize(want))


def test_create_transform_inputs_outputs_and_statistics():
    from PIL import Image

    image = _image((3, 40, 60), 4)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for config in (PANORAMA, POLAR_CROP, OTHER_STATS):
        transform = create_transform(config)
        out = transform(image)
        assert out.shape == (3, *config.image_size) and out.dtype == torch.float32
        assert torch.equal(transform(pil), out)  # PIL in: the same pixels
        pixels = create_transform(config, normalize=False)(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == out.shape
        assert torch.equal(normalize(pixels, config.mean, config.std), out)
        assert pickle.loads(pickle.dumps(transform))(image).shape == out.shape  # for workers
    # the config's mean and std, not ImageNet's
    want = eval_transform((24, 48), mean=OTHER_STATS.mean, std=OTHER_STATS.std)(image)
    assert torch.equal(create_transform(OTHER_STATS)(image), want)
    # from a dict, or a mapping of views
    assert torch.equal(create_transform(OTHER_STATS.to_dict())(image), want)
    views = {"query": PANORAMA, "reference": OTHER_STATS.to_dict()}
    assert torch.equal(create_transform(views, "reference")(image), want)


def test_create_transform_refuses_normalised_or_unscaled_images():
    transform = create_transform(POLAR)
    with pytest.raises(ValueError, match="looks normalised already"):
        transform(eval_transform(64)(_image((3, 64, 64))))
    with pytest.raises(ValueError, match="divide by 255"):
        transform(_image((3, 64, 64)).float())
    with pytest.raises(TypeError, match="or a PIL image, got str"):
        transform("tile.png")


def test_create_transform_for_training():
    image = _image((3, 64, 64), 5)
    for config in (PANORAMA, POLAR_CROP):
        out = create_transform(config, "reference", train=True)(image)
        assert out.shape == (3, 32, 128) and out.dtype == torch.float32
        pixels = create_transform(config, "reference", train=True, normalize=False)(image)
        assert pixels.shape == (3, 32, 128) and pixels.dtype == torch.uint8
    # the polar step first, then train_transform's random steps (same draws: same output)
    from gsra_salad.data import train_transform
    from gsra_salad.data.transforms import PolarStep

    torch.manual_seed(0)
    got = create_transform(POLAR_CROP, train=True)(image)
    torch.manual_seed(0)
    want = train_transform("ground", (32, 128))(PolarStep((32, 128), 0.7)(image))
    assert torch.equal(got, want)


def test_train_transform_without_normalising_fills_occlusions_with_the_mean():
    from gsra_salad.data import train_transform

    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    erased = 0
    for seed in range(30):  # erasing has p = 0.3
        torch.manual_seed(seed)
        out = train_transform("satellite", 32, normalize=False)(image)
        assert out.dtype == torch.uint8
        filled = (out == torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)).all(0)
        erased += bool(filled.any())
    assert 0 < erased < 30


# ---------------------------------------------------------------------------------------------
# resolve_input_config
# ---------------------------------------------------------------------------------------------


def test_resolve_input_config_sources_and_errors():
    model = _model({"query": PANORAMA, "reference": POLAR_CROP})
    assert resolve_input_config(model, "query") == PANORAMA
    assert resolve_input_config(model, "reference") == POLAR_CROP
    assert resolve_input_config(POLAR, "reference") == POLAR
    assert resolve_input_config({"image_size": [32, 128]}) == PANORAMA
    with pytest.raises(ValueError, match=r"does not record its input preprocessing.*pass sizes"):
        resolve_input_config(_model(), "query")
    with pytest.raises(ValueError, match=r"model\.input_config = "):
        create_transform(_model())
    with pytest.raises(ValueError, match="view must be 'query' or 'reference'"):
        resolve_input_config(model, "ground")
    with pytest.raises(ValueError, match="has no 'reference' view"):
        resolve_input_config({"query": PANORAMA}, "reference")
    with pytest.raises(TypeError, match="expected a model with input_config"):
        resolve_input_config((32, 128))


# ---------------------------------------------------------------------------------------------
# the in-memory path from the same configs
# ---------------------------------------------------------------------------------------------


def test_preloaded_pairs_from_configs_equal_create_transform(cvusa_root):
    query_input, reference_input = OTHER_STATS, POLAR_CROP
    pairs = PreloadedPairs(
        CVUSA(cvusa_root, "val"), query_input=query_input, reference_input=reference_input
    )
    per_item = CVUSA(
        cvusa_root,
        "val",
        query_transform=create_transform(query_input, normalize=False),
        reference_transform=create_transform(reference_input, normalize=False),
    )
    normalised = CVUSA(
        cvusa_root,
        "val",
        query_transform=create_transform(query_input),
        reference_transform=create_transform(reference_input),
    )
    for i in range(len(per_item)):
        q, r, _ = per_item[i]
        assert torch.equal(pairs.query[i], q) and torch.equal(pairs.reference[i], r)
    q, r, _ = next(iter(pairs.batches([[0, 1, 2, 3]])))
    assert torch.equal(q, torch.stack([normalised[i][0] for i in range(4)]))
    assert torch.equal(r, torch.stack([normalised[i][1] for i in range(4)]))
    assert pairs.query_input == query_input and pairs.reference_input == reference_input
    # the evaluation sets keep each view's statistics
    assert torch.equal(pairs.query_set()[2][0], normalised[2][0])
    assert torch.equal(pairs.reference_set()[2][0], normalised[2][1])
    images = PreloadedImages(_side(cvusa_root), input_config=reference_input)
    assert torch.equal(next(iter(images.batches(4)))[0], r)


def _side(root):
    """The reference side of CVUSA val as an (image, label) set (the readers' own eval sets are
    University-1652's; for CVUSA, the reader's reference_set() does this)."""
    return CVUSA(root, "val").reference_set()


def test_preloaded_arguments_exclude_each_other(cvusa_root):
    with pytest.raises(ValueError, match=r"either query_input .* or query_size / query_transform"):
        PreloadedPairs(CVUSA(cvusa_root, "val"), (32, 128), query_input=PANORAMA)
    with pytest.raises(ValueError, match="either input_config"):
        PreloadedImages(_side(cvusa_root), 32, input_config=PANORAMA)
    with pytest.raises(TypeError, match="reference_input must be an InputConfig"):
        PreloadedPairs(CVUSA(cvusa_root, "val"), reference_input={"image_size": [8, 8]})
