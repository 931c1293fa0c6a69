import copy
import json
import os
import stat
import sys

import pytest
import torch
from torch import nn

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention, InputConfig
from gsra_salad.models import (
    SmallConvNeXt,
    TinyCNN,
    build_component,
    feature_size,
    register_component,
    registered_components,
)
from tests._helpers import ZERO_GRADIENT, assert_gradients, randomise_norms


def _tiny_model(share_weights=True, impl="auto", channels=32, size=64):
    h, w = feature_size(size, 16)
    return CrossViewGeoLocalizer(
        TinyCNN(channels),
        GlobalSpatialRelationAttention(channels, (h, w), groups=8, impl=impl),
        SALAD(channels, num_clusters=8, cluster_dim=4, token_dim=0, impl=impl),
        share_weights=share_weights,
    )


def _two_size_model(share_weights=True, impl="auto", channels=32):
    """Query: 32 x 128 panoramas (feature map 2 x 8); reference: 64 x 64 tiles (4 x 4)."""
    return CrossViewGeoLocalizer(
        TinyCNN(channels),
        GlobalSpatialRelationAttention(channels, (2, 8), groups=8, impl=impl),
        SALAD(channels, num_clusters=8, cluster_dim=4, token_dim=0, impl=impl),
        share_weights=share_weights,
        reference_attention=GlobalSpatialRelationAttention(channels, (4, 4), groups=8, impl=impl),
    )


PANORAMAS, TILES = (32, 128), (64, 64)


def _randomise(model):
    randomise_norms(model, std=0.1, affine=False, var=(0.5, 1.5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SALAD):
                m.dust_bin.fill_(0.7)
    return model


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# shapes, pairs, weight sharing
# ---------------------------------------------------------------------------------------------


def test_tiny_model_pair_forward_and_embed():
    model = _tiny_model().eval()
    q, r = torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)
    dq, dr = model(q, r)
    assert dq.shape == (3, 32) and dr.shape == (2, 32)
    torch.testing.assert_close(dq, model.embed(q))
    torch.testing.assert_close(dr, model(r))  # shared weights: same stack for both views
    torch.testing.assert_close(dq.norm(dim=1), torch.ones(3))


def test_share_weights_false_keeps_a_second_stack():
    shared = _tiny_model(share_weights=True)
    separate = _tiny_model(share_weights=False)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate == 2 * n_shared
    with torch.no_grad():
        for p in separate.reference_stack.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    separate.eval()
    x = torch.randn(2, 3, 64, 64)
    q, r = separate(x, x)
    assert not torch.allclose(q, r)
    torch.testing.assert_close(r, separate.embed(x, "reference"))


def test_training_step_reaches_every_parameter():
    model = _tiny_model()
    q, r = model(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64))
    logits = q @ r.T / 0.1
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    # training mode: GSRA's gg_spatial.1.bias has none either (tests/_helpers.ZERO_GRADIENT)
    assert_gradients(model.named_parameters(), ZERO_GRADIENT)


def test_fused_and_reference_models_agree():
    fused = _randomise(_tiny_model(impl="fused")).double()
    reference = copy.deepcopy(fused)
    reference.attention.impl = reference.aggregation.impl = "reference"
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for mode in (True, False):
        fused.train(mode)
        reference.train(mode)
        torch.manual_seed(1)
        a = fused(x)
        torch.manual_seed(1)
        b = reference(x)
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# views of different sizes: shared trunk and SALAD, one GSRA per view
# ---------------------------------------------------------------------------------------------


def test_two_size_model_shares_trunk_and_salad_and_holds_one_gsra_per_view():
    model = _two_size_model()
    one_size = _tiny_model()
    extra = _n_params(model.reference_attention)
    assert _n_params(model) == _n_params(one_size) + extra
    assert _n_params(model) == sum(
        _n_params(m)
        for m in (model.backbone, model.attention, model.reference_attention, model.aggregation)
    )
    assert model.attention.spatial_size == (2, 8)
    assert model.reference_attention.spatial_size == (4, 4)
    # the reference view goes through the same trunk and SALAD, and its own GSRA
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
        for name, m in (
            ("backbone", model.backbone),
            ("attention", model.attention),
            ("reference_attention", model.reference_attention),
            ("aggregation", model.aggregation),
        )
    ]
    model.embed(torch.randn(2, 3, *TILES), view="reference")
    assert calls == ["backbone", "reference_attention", "aggregation"]
    calls.clear()
    model.embed(torch.randn(2, 3, *PANORAMAS))  # view="query" by default
    assert calls == ["backbone", "attention", "aggregation"]
    for hook in hooks:
        hook.remove()


def test_two_size_model_trains_a_step():
    torch.manual_seed(0)
    model = _two_size_model()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    q, r = model(torch.randn(4, 3, *PANORAMAS), torch.randn(4, 3, *TILES))
    assert q.shape == r.shape == (4, 32)
    loss = nn.functional.cross_entropy(q @ r.T / 0.1, torch.arange(4))
    loss.backward()
    # the BatchNorm bias of gg_spatial (both GSRAs), SALAD's dust_bin and last score bias have
    # a zero gradient up to rounding; every other parameter a real one
    assert_gradients(model.named_parameters(), ZERO_GRADIENT)
    optimizer.step()
    after = model.state_dict()
    for prefix in ("backbone.", "attention.", "reference_attention.", "aggregation."):
        changed = [
            k
            for k in after
            if k.startswith(prefix) and after[k].is_floating_point()
            if not torch.equal(after[k], before[k])
        ]
        assert changed, prefix


@pytest.mark.parametrize("share_weights", [True, False])
def test_two_size_model_round_trips_bit_exactly(tmp_path, share_weights):
    model = _randomise(_two_size_model(share_weights=share_weights)).eval()
    if not share_weights:
        assert model.reference_attention is None
        assert model.reference_stack["attention"].spatial_size == (4, 4)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["model"]
    assert config["reference_attention"]["type"] == "GlobalSpatialRelationAttention"
    assert config["reference_attention"]["spatial_size"] == [4, 4]
    assert config["attention"]["spatial_size"] == [2, 8]
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    q, r = torch.randn(2, 3, *PANORAMAS), torch.randn(3, 3, *TILES)
    with torch.no_grad():
        for a, b in zip(model(q, r), loaded(q, r)):
            assert torch.equal(a, b)


def test_one_size_model_keeps_its_state_dict_keys():
    keys = set(_tiny_model().state_dict())
    assert not any(k.startswith(("reference_attention.", "reference_stack.")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"backbone", "attention", "aggregation"}


def test_wrong_size_says_which_view_and_which_size():
    model = _two_size_model()
    with pytest.raises(
        ValueError,
        match=r"(?s)the reference view's attention is built for feature maps of size "
        r"\(H, W\) = \(4, 4\) \(images of 64x64 pixels\), but reference images of 32x128 "
        r"pixels give \(2, 8\)\. These are the query view's size: pass view='query'",
    ):
        model(torch.randn(1, 3, *PANORAMAS), torch.randn(1, 3, *PANORAMAS))
    with pytest.raises(
        ValueError,
        match=r"(?s)the query view's attention is built for feature maps of size "
        r"\(H, W\) = \(2, 8\) \(images of 32x128 pixels\), but query images of 96x96 pixels "
        r"give \(6, 6\)\. Resize",
    ):
        model.embed(torch.randn(1, 3, 96, 96))


# ---------------------------------------------------------------------------------------------
# the config protocol: get_config() and the component registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        TinyCNN(24, width=8),
        SmallConvNeXt((8, 16, 24), (1, 0, 2), kernel_size=5),
        GlobalSpatialRelationAttention(32, (2, 6), groups=4, impl="reference"),
        SALAD(32, num_clusters=8, cluster_dim=4, token_dim=16, dropout=0.1, sinkhorn_iters=5),
    ],
    ids=lambda m: type(m).__name__,
)
def test_get_config_rebuilds_the_component(module):
    config = module.get_config()
    assert json.loads(json.dumps(config)) == config  # plain JSON
    rebuilt = type(module)(**config)
    assert rebuilt.get_config() == config
    assert repr(rebuilt) == repr(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    assert registered_components()[type(module).__name__] is type(module)


def test_salad_config_records_its_dropout():
    salad = SALAD(32, 8, 4, token_dim=0, dropout=0.15)
    assert salad.get_config()["dropout"] == 0.15


class _PatchBackbone(nn.Module):
    """A user's own backbone: patchify + GELU, stride 16."""

    stride = 16

    def __init__(self, out_channels: int = 16, activation: str = "gelu") -> None:
        super().__init__()
        self.out_channels, self.activation = out_channels, activation
        self.proj = nn.Conv2d(3, out_channels, 16, stride=16)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()

    def get_config(self):
        return {"out_channels": self.out_channels, "activation": self.activation}

    def forward(self, x):
        return self.act(self.proj(x))


def test_a_users_backbone_joins_by_get_config_and_registering(tmp_path):
    model = CrossViewGeoLocalizer(
        _PatchBackbone(16, activation="relu"),
        GlobalSpatialRelationAttention(16, (4, 4), groups=4),
        SALAD(16, num_clusters=8, cluster_dim=4, token_dim=0),
    ).eval()
    with pytest.raises(ValueError, match=r"(?s)cannot describe the backbone.*register_component"):
        model.save_pretrained(tmp_path)
    register_component(_PatchBackbone, name="test_model.PatchBackbone")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["model"]
    assert config["backbone"] == {
        "type": "test_model.PatchBackbone",
        "out_channels": 16,
        "activation": "relu",
    }
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    assert type(loaded.backbone) is _PatchBackbone and loaded.backbone.activation == "relu"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_registered_subclass_is_saved_as_itself(tmp_path):
    @register_component(name="test_model.SharperSALAD")
    class SharperSALAD(SALAD):
        pass

    model = CrossViewGeoLocalizer(
        TinyCNN(32), None, SharperSALAD(32, num_clusters=8, cluster_dim=4, token_dim=0)
    )
    model.save_pretrained(tmp_path)
    assert type(CrossViewGeoLocalizer.from_pretrained(tmp_path).aggregation) is SharperSALAD

    class Unregistered(SALAD):
        pass

    model.aggregation = Unregistered(32, num_clusters=8, cluster_dim=4, token_dim=0)
    with pytest.raises(ValueError, match=r"cannot describe the aggregation \(Unregistered\)"):
        model.save_pretrained(tmp_path)


def test_registry_errors():
    class NoConfig(nn.Module):
        pass

    with pytest.raises(TypeError, match="has no get_config"):
        register_component(NoConfig)
    with pytest.raises(TypeError, match=r"expects an nn\.Module subclass"):
        register_component(int)

    class Other(nn.Module):
        def get_config(self):
            return {}

    with pytest.raises(ValueError, match="name 'SALAD' is taken"):
        register_component(Other, name="SALAD")
    with pytest.raises(ValueError, match=r"unknown component type 'Nope'.*register_component"):
        build_component({"type": "Nope"})
    with pytest.raises(ValueError, match=r"could not build TinyCNN .*unexpected keyword"):
        build_component({"type": "TinyCNN", "depth": 3})

    class NotJson(nn.Module):
        def get_config(self):
            return {"size": (torch.tensor(1.0),)}

    register_component(NotJson, name="test_model.NotJson")
    model = CrossViewGeoLocalizer(NotJson(), None, SALAD(8, 4, 2, token_dim=0))
    with pytest.raises(ValueError, match="not plain JSON"):
        model.describe()


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_weights", [True, False])
def test_save_and_load_pretrained_is_bit_exact(tmp_path, share_weights):
    model = _randomise(_tiny_model(share_weights=share_weights)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["architecture"] == "modules"
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path).eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_without_safetensors_weights_are_saved_for_weights_only_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    model = _randomise(_tiny_model()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.pt").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("safetensors", [True, False])
def test_save_pretrained_files_follow_the_umask(tmp_path, monkeypatch, umask, safetensors):
    if not safetensors:
        monkeypatch.setitem(sys.modules, "safetensors", None)
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    old = os.umask(umask)
    try:
        _tiny_model().save_pretrained(tmp_path / "m")
        (tmp_path / "m" / "other.txt").write_text("written by open()")
    finally:
        os.umask(old)
    names = {"config.json", "model.safetensors" if safetensors else "model.pt", "other.txt"}
    assert {p.name for p in (tmp_path / "m").iterdir()} == names  # no temporary file left
    for name in names:
        mode = stat.S_IMODE((tmp_path / "m" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_tampered_or_truncated_weights_give_clear_errors(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    weights = next(p for p in tmp_path.iterdir() if p.name.startswith("model."))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified or truncated"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="modified or truncated"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid gsra_salad config"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path / "nowhere")


def test_from_pretrained_returns_the_model_in_eval_mode(tmp_path):
    model = _randomise(_tiny_model())  # training mode: dropout and batch statistics
    model.save_pretrained(tmp_path)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))  # two calls, identical descriptors
        assert torch.equal(loaded(x), model.eval()(x))


def _rewrite_config(directory, change):
    path = directory / "config.json"
    payload = json.loads(path.read_text())
    change(payload["model"])
    path.write_text(json.dumps(payload))


def test_incomplete_config_names_the_file_and_the_missing_key(tmp_path):
    _tiny_model().save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.pop("backbone"))
    with pytest.raises(
        ValueError, match=r"config\.json: the model config has no 'backbone' entry"
    ) as err:
        CrossViewGeoLocalizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    # the lrfr form written by 0.1.0.dev0, without its img_size
    _rewrite_config(tmp_path, lambda c: (c.clear(), c.update(architecture="lrfr", options={})))
    with pytest.raises(ValueError, match=r"config\.json: the model config has no 'img_size'"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(architecture="resnet"))
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)


def test_configs_written_before_the_registry_still_load(tmp_path):
    model = _randomise(_tiny_model()).eval()
    model.save_pretrained(tmp_path)

    def legacy(config):
        config["backbone"] = {"type": "tiny", "out_channels": 32, "width": 16}
        config["attention"] = {"type": "gsra", **model.attention.get_config()}
        config["aggregation"] = {"type": "salad", **model.aggregation.get_config()}
        del config["reference_attention"]

    _rewrite_config(tmp_path, legacy)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


# ---------------------------------------------------------------------------------------------
# the recorded input preprocessing (InputConfig)
# ---------------------------------------------------------------------------------------------

DEMO_INPUT = {
    "query": InputConfig((32, 128)),
    "reference": InputConfig((64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
}
POLAR_INPUT = {
    "query": InputConfig((32, 128)),
    "reference": InputConfig((32, 128), view_transform="polar", polar_crop=0.7),
}


@pytest.mark.parametrize("share_weights", [True, False])
def test_input_config_round_trips_through_save_pretrained(tmp_path, share_weights):
    model = _two_size_model(share_weights=share_weights)
    model.input_config = DEMO_INPUT
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["model"]["input"]
    assert saved["reference"] == {
        "image_size": [64, 64],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "view_transform": "none",
        "polar_crop": 1.0,
    }
    assert CrossViewGeoLocalizer.from_pretrained(tmp_path).input_config == DEMO_INPUT
    model.input_config = POLAR_INPUT
    model.save_pretrained(tmp_path)
    assert CrossViewGeoLocalizer.from_pretrained(tmp_path).input_config == POLAR_INPUT


def test_config_written_before_the_input_was_recorded_loads_without_it(tmp_path):
    model = _randomise(_tiny_model()).eval()
    model.input_config = InputConfig(64)
    model.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.pop("input"))  # the config.json of 0.1.0.dev0
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    assert loaded.input_config is None
    assert "input_config=None (unknown preprocessing)" in repr(loaded)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    _rewrite_config(tmp_path, lambda c: c.update(input={"query": {"image_size": [64, 64]}}))
    with pytest.raises(ValueError, match=r"config\.json: the 'input' entry must give exactly"):
        CrossViewGeoLocalizer.from_pretrained(tmp_path)


def test_input_config_constructor_assignment_and_errors():
    model = _tiny_model()
    assert model.input_config is None
    model.input_config = InputConfig(64)  # one config: both views
    assert model.input_config == dict.fromkeys(("query", "reference"), InputConfig(64))
    model.input_config = {"query": {"image_size": [64, 64]}, "reference": InputConfig(64)}
    assert model.input_config["query"] == InputConfig(64)
    model.input_config["query"] = None  # a copy: the model's record is not changed
    assert model.input_config["query"] == InputConfig(64)
    with pytest.raises(ValueError, match=r"exactly the views \['query', 'reference'\]"):
        model.input_config = {"query": InputConfig(64)}
    with pytest.raises(TypeError, match="must be None, an InputConfig"):
        model.input_config = (64, 64)
    with pytest.raises(TypeError, match=r"input_config\['reference'\] must be an InputConfig"):
        model.input_config = {"query": InputConfig(64), "reference": 64}
    built = CrossViewGeoLocalizer(
        TinyCNN(32),
        None,
        SALAD(32, num_clusters=8, cluster_dim=4, token_dim=0),
        input_config=POLAR_INPUT,
    )
    assert built.input_config == POLAR_INPUT
    assert copy.deepcopy(built).input_config == POLAR_INPUT


def test_repr_shows_the_input_of_each_view():
    model = _two_size_model()
    model.input_config = {**DEMO_INPUT, "query": POLAR_INPUT["reference"]}
    first = repr(model).splitlines()[1]
    assert first.strip() == (
        "share_weights=True, input_config={query: 32x128 polar(crop=0.7), "
        "reference: 64x64 resize mean=(0.5, 0.5, 0.5) std=(0.25, 0.25, 0.25)}"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": (0, 64)}, r"image_size must be \(H, W\), two positive ints"),
        ({"image_size": (32.0, 64)}, "two positive ints"),
        ({"image_size": 64, "mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
        ({"image_size": 64, "std": (0.2, 0.0, 0.2)}, r"std must be > 0"),
        ({"image_size": 64, "view_transform": "fisheye"}, "view_transform must be 'none' or"),
        ({"image_size": 64, "view_transform": "polar", "polar_crop": 0.0}, r"in \(0, 1\]"),
        ({"image_size": 64, "view_transform": "polar", "polar_crop": 1.5}, r"in \(0, 1\]"),
        ({"image_size": 64, "polar_crop": 0.7}, "only applies to view_transform='polar'"),
    ],
)
def test_input_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputConfig(**kwargs)


def test_input_config_dict_round_trip_and_errors():
    config = InputConfig([32, 128], mean=[0, 0, 0], std=[1, 1, 1], view_transform="polar")
    assert config.image_size == (32, 128) and config.mean == (0.0, 0.0, 0.0)
    assert InputConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert hash(config) == hash(InputConfig.from_dict(config.to_dict()))  # frozen, hashable
    with pytest.raises(ValueError, match=r"unknown keys \['size'\]; known keys: \['image_size'"):
        InputConfig.from_dict({"image_size": [8, 8], "size": 8})
    with pytest.raises(ValueError, match="required key 'image_size' is missing"):
        InputConfig.from_dict({"mean": [0, 0, 0]})
    with pytest.raises(ValueError, match="expected a mapping"):
        InputConfig.from_dict([8, 8])
    with pytest.raises(AttributeError):
        config.image_size = (8, 8)  # frozen


def test_state_dict_without_num_batches_tracked_loads_as_in_torch(tmp_path):
    from gsra_salad.models import _serialization

    model = _randomise(_tiny_model()).eval()
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    assert len(state) < len(model.state_dict())
    fresh = _tiny_model()
    fresh.load_state_dict(state)  # torch accepts it
    other = _tiny_model()
    _serialization.load_strict(other, state, source="test")
    for key, value in model.state_dict().items():
        if "num_batches_tracked" not in key:
            assert torch.equal(other.state_dict()[key], value), key
    del state["aggregation.dust_bin"]  # a really missing key is still reported
    with pytest.raises(ValueError, match=r"missing \(1\): aggregation\.dust_bin"):
        _serialization.load_strict(other, state, source="test")


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict"])
def test_checkpoints_nested_under_a_key_are_unwrapped(tmp_path, key):
    from gsra_salad.models import _serialization

    state = _tiny_model().state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({key: state, "epoch": 3, "optimizer": {"lr": torch.tensor(1.0)}}, path)
    got = _serialization.read_state_dict(path)
    assert got.keys() == state.keys()
    # published LRFR keys start with "model." but are not nested: left alone
    flat = {"model.attention.gn.weight": torch.ones(2)}
    assert _serialization.read_state_dict(flat) == flat


def test_save_pretrained_refuses_modules_it_cannot_rebuild(tmp_path):
    model = CrossViewGeoLocalizer(nn.Conv2d(3, 8, 16, stride=16), None, SALAD(8, 4, 2, token_dim=0))
    with pytest.raises(ValueError, match="cannot describe the backbone"):
        model.save_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# deployment
# ---------------------------------------------------------------------------------------------


def test_autocast_descriptors_match_float32():
    model = _randomise(_tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    # documented tolerance: cosine similarity to the float32 descriptor >= 0.99
    assert (nn.functional.cosine_similarity(got.float(), want) > 0.99).all()


def test_torch_export_matches_eager():
    model = _randomise(_tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        want = model(x)
    got = exported.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    names = {
        n.target.__name__ if hasattr(n.target, "__name__") else str(n.target)
        for n in exported.graph.nodes
    }
    assert not any("Sinkhorn" in n or "Recomputed" in n for n in names)


def test_torch_compile_runs():
    model = _randomise(_tiny_model()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\), got list"):
        model.embed([torch.randn(3, 64, 64)])
    uint8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # what the readers return
    with pytest.raises(
        TypeError,
        match=r"(?s)images must be a floating-point tensor.*got dtype torch\.uint8.*"
        r"gsra_salad\.data\.eval_transform",
    ):
        model.embed(uint8)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.randn(2, 3, 64, 64), uint8)
    with pytest.raises(ValueError, match="built for feature maps of size"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="view must be"):
        model.embed(torch.randn(1, 3, 64, 64), view="satellite")
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module"):
        CrossViewGeoLocalizer(lambda x: x, None, SALAD(8, 4, 2, token_dim=0))


# ---------------------------------------------------------------------------------------------
# SmallConvNeXt: the demo trunk for raw tiles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 128), (64, 64), (48, 80)])
def test_small_convnext_is_stride_16(size):
    trunk = SmallConvNeXt((8, 16, 24), (1, 1, 2))
    out = trunk(torch.randn(2, 3, *size))
    assert out.shape == (2, 24, size[0] // 16, size[1] // 16)
    assert trunk.out_channels == 24 and trunk.stride == 16


def test_small_convnext_sees_the_whole_small_tile():
    """Receptive field: the gradient of one output position reaches every input pixel of a
    64 x 64 tile (TinyCNN's 31 pixels reach under a quarter of it)."""
    torch.manual_seed(0)
    for trunk, whole in ((SmallConvNeXt((8, 16, 24)), True), (TinyCNN(24, width=8), False)):
        x = torch.randn(1, 3, 64, 64, requires_grad=True)
        trunk.eval()(x)[0, :, 0, 0].sum().backward()
        reached = (x.grad.abs().sum(1)[0] > 0).float().mean().item()
        assert (reached == 1.0) == whole, (type(trunk).__name__, reached)


def test_small_convnext_every_parameter_gets_a_gradient():
    trunk = SmallConvNeXt((8, 16, 24), (1, 1, 1))
    trunk(torch.randn(2, 3, 64, 64)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk.parameters())


def test_small_convnext_rejects_bad_stages():
    with pytest.raises(ValueError, match="three positive widths"):
        SmallConvNeXt((8, 16), (1, 1))


def test_a_small_convnext_model_round_trips_through_save_pretrained(tmp_path):
    model = CrossViewGeoLocalizer(
        SmallConvNeXt((8, 16, 32)),
        GlobalSpatialRelationAttention(32, (2, 8), groups=4),
        SALAD(32, num_clusters=4, cluster_dim=4, token_dim=0, dropout=0.0),
        reference_attention=GlobalSpatialRelationAttention(32, (4, 4), groups=4),
    ).eval()
    model.save_pretrained(tmp_path)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.embed(x, "reference"), model.embed(x, "reference"))
