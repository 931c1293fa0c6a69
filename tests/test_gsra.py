import copy

import pytest
import torch
from torch import nn

from gsra_salad import GlobalSpatialRelationAttention
from tests._helpers import DEVICES, SavedBytes

# float32 tolerances for the whole block (two BatchNorms over a rank-Ci reduction)
TOL32 = dict(rtol=2e-4, atol=2e-5)
TOL64 = dict(rtol=1e-9, atol=1e-10)


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that eval mode is tested."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return module


def _pair(channels, size, groups, dtype=torch.float64, device="cpu"):
    ref = GlobalSpatialRelationAttention(channels, size, groups, impl="reference")
    ref = _randomise(ref).to(device=device, dtype=dtype)
    fused = copy.deepcopy(ref)
    fused.impl = "fused"
    return ref, fused


def _step(module, x, grad_out):
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out.backward(grad_out)
    return (
        out.detach(),
        x.grad,
        {n: p.grad.clone() for n, p in module.named_parameters()},
        {n: b.clone() for n, b in module.named_buffers()},
    )


def _assert_same_step(a, b, tol):
    out_a, gx_a, gp_a, buf_a = a
    out_b, gx_b, gp_b, buf_b = b
    torch.testing.assert_close(out_b, out_a, **tol)
    torch.testing.assert_close(gx_b, gx_a, **tol)
    for name in gp_a:
        scale = gp_a[name].abs().max().item() + 1.0  # parameter gradients sum over the batch
        torch.testing.assert_close(
            gp_b[name], gp_a[name], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name
        )
    for name in buf_a:
        torch.testing.assert_close(buf_b[name], buf_a[name], **tol, msg=name)


CASES = [
    (64, (6, 8), 8, 2),
    (64, (4, 4), 16, 1),
    (96, (4, 5), 32, 3),
    (32, (2, 3), 32, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("channels", "size", "groups", "batch"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_fused_matches_reference(device, channels, size, groups, batch, dtype, training):
    ref, fused = _pair(channels, size, groups, dtype, device)
    ref.train(training)
    fused.train(training)
    tol = TOL64 if dtype == torch.float64 else TOL32
    for _ in range(2):  # two steps: the second uses the running statistics of the first
        x = torch.randn(batch, channels, *size, dtype=dtype, device=device)
        grad_out = torch.randn_like(x)
        _assert_same_step(_step(ref, x, grad_out), _step(fused, x, grad_out), tol)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_statistics_follow_batchnorm(momentum):
    ref, fused = _pair(64, (4, 6), 8)
    for m in (*ref.modules(), *fused.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    for _ in range(3):
        x = torch.randn(2, 64, 4, 6, dtype=torch.float64)
        with torch.no_grad():
            ref(x)
        fused(x.requires_grad_())  # the autograd path must not update twice
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, **TOL64, msg=name)
    assert int(fused.gg_spatial[1].num_batches_tracked) == 3


def test_fused_gradcheck():
    _, fused = _pair(16, (2, 3), 4)
    x = torch.randn(2, 16, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = fused.gg_spatial[0].weight
    gamma = fused.gg_spatial[1].weight
    assert torch.autograd.gradcheck(lambda x: fused(x), (x,))
    fused.eval()
    assert torch.autograd.gradcheck(lambda x: fused(x), (x,))
    fused.train()
    names = ("gg_spatial.0.weight", "gg_spatial.1.weight")

    def as_function(w, g):
        return torch.func.functional_call(fused, {names[0]: w, names[1]: g}, (x,))

    assert torch.autograd.gradcheck(
        as_function,
        (weight.detach().clone().requires_grad_(), gamma.detach().clone().requires_grad_()),
    )


def test_saves_only_input_parameters_and_projections():
    _, fused = _pair(64, (8, 8), 8, dtype=torch.float32)
    ref = copy.deepcopy(fused)
    ref.impl = "reference"
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    with SavedBytes() as fused_bytes:
        fused(x)
    with SavedBytes() as ref_bytes:
        ref(x)
    params = sum(p.numel() * p.element_size() for p in fused.parameters())
    x_bytes = x.numel() * x.element_size()
    # training: the input, the parameters and the (B g, HW/2, 2 Ci) projections (as big as x)
    assert fused_bytes.bytes == 2 * x_bytes + params
    assert ref_bytes.bytes > 10 * fused_bytes.bytes
    fused.eval()
    with SavedBytes() as eval_bytes:
        fused(x)
    assert eval_bytes.bytes == x_bytes + params


def test_state_dict_has_the_published_names_and_shapes():
    gsra = GlobalSpatialRelationAttention(384, (24, 24), groups=32)
    ci, hw = 12, 576
    want = {
        "conv1x1.weight": (ci, ci, 1, 1),
        "conv1x1.bias": (ci,),
        "gn.weight": (ci,),
        "gn.bias": (ci,),
        "gg_spatial.0.weight": (hw // 2, 2 * hw, 1, 1),
        "gg_spatial.1.weight": (hw // 2,),
        "gg_spatial.1.bias": (hw // 2,),
        "gg_spatial.1.running_mean": (hw // 2,),
        "gg_spatial.1.running_var": (hw // 2,),
        "gg_spatial.1.num_batches_tracked": (),
        "gg_spatial.2.weight": (1, hw // 2, 1, 1),
        "gg_spatial.3.weight": (1,),
        "gg_spatial.3.bias": (1,),
        "gg_spatial.3.running_mean": (1,),
        "gg_spatial.3.running_var": (1,),
        "gg_spatial.3.num_batches_tracked": (),
    }
    for branch in ("theta_spatial", "phi_spatial"):
        want[f"{branch}.0.weight"] = (ci, ci, 1, 1)
        for key in ("weight", "bias", "running_mean", "running_var"):
            want[f"{branch}.1.{key}"] = (ci,)
        want[f"{branch}.1.num_batches_tracked"] = ()
    got = {k: tuple(v.shape) for k, v in gsra.state_dict().items()}
    assert got == want


class _PublishedGSRA(nn.Module):
    """The published module's parameter layout and forward, written out for the test."""

    def __init__(self, channel, spatial, ratio=32):
        super().__init__()
        self.groups = ratio
        ci = channel // ratio
        self.inter_channel = ci
        self.conv1x1 = nn.Conv2d(ci, ci, kernel_size=1, stride=1, padding=0)
        self.gn = nn.GroupNorm(ci, ci)
        self.theta_spatial = nn.Sequential(
            nn.Conv2d(ci, ci, 1, bias=False), nn.BatchNorm2d(ci), nn.ReLU()
        )
        self.phi_spatial = nn.Sequential(
            nn.Conv2d(ci, ci, 1, bias=False), nn.BatchNorm2d(ci), nn.ReLU()
        )
        self.gg_spatial = nn.Sequential(
            nn.Conv2d(spatial * 2, spatial // 2, 1, bias=False),
            nn.BatchNorm2d(spatial // 2),
            nn.Conv2d(spatial // 2, 1, 1, bias=False),
            nn.BatchNorm2d(1),
            nn.ReLU(),
        )

    def forward(self, x):
        b, c, h, w = x.size()
        gx = x.reshape(b * self.groups, -1, h, w)
        x_h = nn.functional.adaptive_avg_pool2d(gx, (None, 1))
        x_w = nn.functional.adaptive_avg_pool2d(gx, (1, None)).permute(0, 1, 3, 2)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        theta = (
            self.theta_spatial(gx).view(b * self.groups, self.inter_channel, -1).permute(0, 2, 1)
        )
        phi = self.phi_spatial(gx).view(b * self.groups, self.inter_channel, -1)
        gs = torch.matmul(theta, phi)
        gs_in = gs.permute(0, 2, 1).view(b * self.groups, h * w, h, w)
        gs_out = gs.view(b * self.groups, h * w, h, w)
        g = self.gg_spatial(torch.cat((gs_in, gs_out), 1))
        weight = x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid() * g.sigmoid()
        out = self.gn(gx * weight)
        out = out.view(b, self.groups, c // self.groups, h, w)
        return torch.transpose(out, 1, 2).contiguous().view(b, -1, h, w)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("training", [True, False])
def test_published_state_dict_loads_strictly_and_gives_published_outputs(impl, training):
    published = _randomise(_PublishedGSRA(64, 36, ratio=8)).double().train(training)
    ours = GlobalSpatialRelationAttention(64, (6, 6), groups=8, impl=impl).double()
    ours.load_state_dict(published.state_dict(), strict=True)
    ours.train(training)
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), published(x), **TOL64)


def test_half_precision_and_autocast():
    ref, fused = _pair(64, (4, 6), 8, dtype=torch.float32)
    x = torch.randn(2, 64, 4, 6)
    want = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x.requires_grad_())
        got.float().sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)
    assert torch.isfinite(x.grad).all()


def test_no_grad_inference_and_batch_statistics_in_eval():
    ref, fused = _pair(32, (4, 4), 8)
    ref.eval()
    fused.eval()
    x = torch.randn(1, 32, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **TOL64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), ref(x), **TOL64)


def test_double_backward_needs_reference():
    ref, fused = _pair(32, (2, 4), 8)
    x = torch.randn(2, 32, 2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ref(x).pow(2).sum(), x, create_graph=True)
    g.sum().backward()
    (g,) = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice"):
        g.sum().backward()


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"channels=30 must be a positive multiple of groups=32"):
        GlobalSpatialRelationAttention(30, (4, 4), groups=32)
    with pytest.raises(ValueError, match=r"H\*W = 15.*even"):
        GlobalSpatialRelationAttention(64, (3, 5), groups=8)
    with pytest.raises(TypeError, match="spatial_size"):
        GlobalSpatialRelationAttention(64, (3, 5, 2), groups=8)
    with pytest.raises(ValueError, match="impl must be one of"):
        GlobalSpatialRelationAttention(64, (4, 4), groups=8, impl="fast")
    gsra = GlobalSpatialRelationAttention(64, (4, 4), groups=8)
    with pytest.raises(
        ValueError,
        match=r"size \(H, W\) = \(4, 4\), got \(6, 6\).*spatial_size=\(6, 6\)",
    ):
        gsra(torch.randn(1, 64, 6, 6))
    with pytest.raises(ValueError, match="built for 64 channels, got input with 32"):
        gsra(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        gsra(torch.randn(64, 4, 4))
