"""The paper's model on torchvision's ConvNeXt: needs the 'torchvision' extra (CI installs it)."""

import copy
import json

import pytest
import torch
from torch import nn

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention, InputConfig
from gsra_salad.models import ConvNeXtTrunk
from tests._helpers import SavedBytes

torchvision = pytest.importorskip("torchvision")


def test_lrfr_at_384_gives_unit_descriptors_of_8192():
    model = CrossViewGeoLocalizer.lrfr(img_size=384).eval()
    assert model.descriptor_dim == 128 * 64
    assert model.attention.spatial_size == (24, 24)
    with torch.no_grad():
        d = model(torch.randn(1, 3, 384, 384))
    assert d.shape == (1, 8192)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(1))


def test_lrfr_panorama_size_and_bad_sizes():
    model = CrossViewGeoLocalizer.lrfr(img_size=(128, 512))
    assert model.attention.spatial_size == (8, 32)
    with pytest.raises(
        ValueError, match=r"lrfr\(img_size=96\).*6x6 = 36 positions.*num_clusters=128"
    ):
        CrossViewGeoLocalizer.lrfr(img_size=96)
    with pytest.raises(TypeError, match="unknown overrides"):
        CrossViewGeoLocalizer.lrfr(img_size=384, clusters=3)


def _published_lrfr_state(img_size=384, prefix=""):
    """Random weights under the published key names: model.{backbone.backbone,attention,...}."""
    convnext = torchvision.models.convnext_tiny(weights=None)
    trunk = nn.Sequential(*list(convnext.features.children())[:-2])
    side = img_size // 16
    attention = GlobalSpatialRelationAttention(384, (side, side), groups=32)
    aggregation = SALAD(384, 128, 64, token_dim=0)
    state = {}
    for name, module in (
        ("model.backbone.backbone", trunk),
        ("model.attention", attention),
        ("model.aggregation", aggregation),
    ):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
        for key, value in module.state_dict().items():
            state[f"{prefix}{name}.{key}"] = value.clone()
    return state, (trunk, attention, aggregation)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_lrfr_checkpoint_round_trip(tmp_path, prefix):
    state, (trunk, attention, aggregation) = _published_lrfr_state(prefix=prefix)
    path = tmp_path / "lrfr.pth"
    torch.save(state, path)
    model = CrossViewGeoLocalizer.from_lrfr_checkpoint(path, img_size=384).eval()
    for module in (trunk, attention, aggregation):
        module.eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        want = nn.functional.normalize(aggregation(attention(trunk(x))), dim=1)
        torch.testing.assert_close(model(x), want)
    # from an in-memory state dict too
    model2 = CrossViewGeoLocalizer.from_lrfr_checkpoint(state, img_size=384).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), want)


def test_lrfr_checkpoint_mismatch_names_the_cause():
    state, _ = _published_lrfr_state(img_size=256)
    with pytest.raises(
        ValueError, match=r"(?s)shape of attention\.gg_spatial\.0\.weight.*img_size=256"
    ):
        CrossViewGeoLocalizer.from_lrfr_checkpoint(state, img_size=384)
    state, _ = _published_lrfr_state()
    state["model.extra.weight"] = torch.zeros(1)
    del state["model.aggregation.dust_bin"]
    with pytest.raises(
        ValueError,
        match=r"(?s)missing \(1\): aggregation\.dust_bin.*unexpected \(1\): model\.extra",
    ):
        CrossViewGeoLocalizer.from_lrfr_checkpoint(state)


def test_lrfr_save_and_load_pretrained(tmp_path):
    model = CrossViewGeoLocalizer.lrfr(img_size=(192, 256), num_clusters=16, cluster_dim=8).eval()
    model.save_pretrained(tmp_path)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.descriptor_dim == 16 * 8
    assert loaded.input_config == model.input_config


def test_lrfr_records_the_published_preprocessing():
    """lrfr() and from_lrfr_checkpoint record each view's size, ImageNet's mean and std, no
    view transform (LRFR resizes both views and normalises with ImageNet's statistics)."""
    model = CrossViewGeoLocalizer.lrfr(img_size=384, query_img_size=(140, 768))
    assert model.input_config == {
        "query": InputConfig((140, 768)),
        "reference": InputConfig((384, 384)),
    }
    assert model.input_config["query"].mean == (0.485, 0.456, 0.406)
    assert model.input_config["reference"].view_transform == "none"
    state, _ = _published_lrfr_state(img_size=256)
    loaded = CrossViewGeoLocalizer.from_lrfr_checkpoint(state, img_size=256)
    assert loaded.input_config == dict.fromkeys(("query", "reference"), InputConfig(256))


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_lrfr_cvusa_sizes_share_trunk_and_salad_with_one_gsra_per_view():
    one = CrossViewGeoLocalizer.lrfr(img_size=384)
    two = CrossViewGeoLocalizer.lrfr(img_size=384, query_img_size=(140, 768))
    assert two.attention.spatial_size == (8, 48)  # the panorama's
    assert two.reference_attention.spatial_size == (24, 24)  # the satellite tile's
    assert one.reference_attention is None and one.attention.spatial_size == (24, 24)
    panorama_gsra = GlobalSpatialRelationAttention(384, (8, 48), groups=32)
    assert _n_params(two) == _n_params(one) + _n_params(panorama_gsra)
    shared = _n_params(two.backbone) + _n_params(two.aggregation)
    assert _n_params(two) == shared + _n_params(two.attention) + _n_params(two.reference_attention)
    # the same feature-map size: one GSRA (390 // 16 == 384 // 16)
    assert CrossViewGeoLocalizer.lrfr(img_size=384, query_img_size=390).reference_attention is None
    with pytest.raises(ValueError, match=r"lrfr\(query_img_size=\(64, 64\)\).*4x4 = 16"):
        CrossViewGeoLocalizer.lrfr(img_size=384, query_img_size=(64, 64))


def test_lrfr_two_sizes_train_a_step_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CrossViewGeoLocalizer.lrfr(
        img_size=(128, 128), query_img_size=(64, 256), num_clusters=16, cluster_dim=8
    )
    q, r = torch.randn(2, 3, 64, 256), torch.randn(2, 3, 128, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dq, dr = model(q, r)
    nn.functional.cross_entropy(dq @ dr.T / 0.07, torch.arange(2)).backward()
    assert model.attention.conv1x1.weight.grad.abs().sum() > 0
    assert model.reference_attention.conv1x1.weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path)
    with torch.no_grad():
        for a, b in zip(model(q, r), loaded(q, r)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"reference view's attention .* \(8, 8\) "):
        loaded.embed(q, view="reference")


def test_lrfr_checkpoint_needs_one_size(tmp_path):
    state, _ = _published_lrfr_state()
    with pytest.raises(ValueError, match=r"(?s)missing .*reference_attention.*one attention per"):
        CrossViewGeoLocalizer.from_lrfr_checkpoint(state, img_size=384, query_img_size=(140, 768))


def test_lrfr_checkpoint_loads_in_eval_mode_nested_and_without_num_batches_tracked(tmp_path):
    state, _ = _published_lrfr_state(img_size=256)
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(state)
    path = tmp_path / "lrfr.pth"
    torch.save({"model": trimmed, "epoch": 40}, path)
    model = CrossViewGeoLocalizer.from_lrfr_checkpoint(path, img_size=256)
    assert not any(m.training for m in model.modules())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("extra", [{}, {"grad_checkpointing": True}])
def test_convnext_trunk_get_config_rebuilds_it(extra):
    trunk = ConvNeXtTrunk(**{"stochastic_depth_prob": 0.2, **extra})
    config = trunk.get_config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = ConvNeXtTrunk(**config)
    assert rebuilt.get_config() == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in trunk.state_dict().items()
    }


def test_pretrained_backbone_from_local_file(tmp_path):
    full = torchvision.models.convnext_tiny(weights=None)
    path = tmp_path / "convnext_tiny.pth"
    torch.save(full.state_dict(), path)
    trunk = ConvNeXtTrunk("tiny", weights=path)
    torch.testing.assert_close(trunk.features[0][0].weight, full.features[0][0].weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        ConvNeXtTrunk("tiny", weights=tmp_path / "missing.pth")


def test_timm_backbone_stage_and_round_trip(tmp_path):
    pytest.importorskip("timm")
    from gsra_salad.models import TimmBackbone

    backbone = TimmBackbone("resnet18", out_index=3)
    assert (backbone.out_channels, backbone.stride) == (256, 16)
    assert backbone(torch.randn(1, 3, 64, 96)).shape == (1, 256, 4, 6)
    config = backbone.get_config()
    assert config == {"name": "resnet18", "out_index": 3}
    assert TimmBackbone(**config).get_config() == config
    model = CrossViewGeoLocalizer(
        backbone,
        GlobalSpatialRelationAttention(256, (4, 4), groups=32),
        SALAD(256, num_clusters=8, cluster_dim=4, token_dim=0),
    ).eval()
    model.save_pretrained(tmp_path)
    loaded = CrossViewGeoLocalizer.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_grad_checkpointing_gives_the_same_gradients_with_less_saved_memory():
    torch.manual_seed(0)
    plain = CrossViewGeoLocalizer.lrfr(img_size=(192, 256), num_clusters=16, cluster_dim=8)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, 192, 256)
    grads, saved = [], []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same stochastic-depth draws
        with SavedBytes() as counter:
            out = model(x)
        out.pow(2).sum().backward()
        saved.append(counter.bytes)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert saved[1] < saved[0] / 3


def test_pretrained_backbone_true_without_network_says_what_to_do(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(
        RuntimeError, match=r"(?s)ImageNet weights for convnext_tiny.*cache.*pretrained_backbone="
    ):
        CrossViewGeoLocalizer.lrfr(img_size=384, pretrained_backbone=True)
