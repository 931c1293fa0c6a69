import copy
import json
import sys

import pytest
import torch
from torch import nn

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention
from gsra_salad.models import TinyCNN, feature_size


def _tiny_model(share_weights=True, impl="auto", channels=32, size=64):
    h, w = feature_size(size, 16)
    return CrossViewGeoLocalizer(
        TinyCNN(channels),
        GlobalSpatialRelationAttention(channels, (h, w), groups=8, impl=impl),
        SALAD(channels, num_clusters=8, cluster_dim=4, token_dim=0, impl=impl),
        share_weights=share_weights,
    )


def _randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.aggregation.dust_bin.fill_(0.7)
    return model


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
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name != "aggregation.dust_bin":
            assert p.grad.abs().sum() > 0, name


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
    with pytest.raises(ValueError, match="built for feature maps of size"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="view must be"):
        model.embed(torch.randn(1, 3, 64, 64), view="satellite")
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module"):
        CrossViewGeoLocalizer(lambda x: x, None, SALAD(8, 4, 2, token_dim=0))
