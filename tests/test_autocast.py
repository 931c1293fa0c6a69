"""Mixed-precision training: forward and backward under ``torch.autocast`` (bfloat16 on CPU).

Each test runs the same weights three ways: fused under autocast, reference under autocast and
reference in float32 without autocast (the exact value). Output dtypes of the two autocast runs
must be equal. Closeness: bfloat16 keeps ~3 significant digits and the reference's own autocast
error is large for some gradients (BatchNorm over a 2HW-channel relation), so a gradient of the
fused path is accepted when its distance to the float32 value is at most three times the
reference's own autocast distance plus 2% of the gradient's scale (max |float32 value|; the
rounding noise of two different bfloat16 computations through a whole model differs by up to
~2x); outputs are also compared directly with rtol = atol = 5e-2. A wrong gradient is off by
the order of its scale and fails.
"""

import copy

import pytest
import torch
from torch import nn

from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention
from gsra_salad.models import TinyCNN
from tests._helpers import randomise_norms

AMP = torch.bfloat16
OUT_TOL = dict(rtol=5e-2, atol=5e-2)


def _randomise(module: nn.Module) -> nn.Module:
    return randomise_norms(module, std=0.5)


def _set_impl(module: nn.Module, impl: str) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (GlobalSpatialRelationAttention, SALAD)):
            m.impl = impl
    return module


def _step(module, inputs, autocast: bool, amp: torch.dtype = AMP):
    """Forward (under autocast or not), a float32 loss, backward: outputs and gradients."""
    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp, enabled=autocast):
        out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape)).sum() for o in outs)
    loss.backward()
    grads = {f"input{i}.grad": x.grad for i, x in enumerate(inputs) if x.grad is not None}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return outs, grads


def _compare(module: nn.Module, inputs, training: bool, amp: torch.dtype = AMP) -> None:
    module = _randomise(module).train(training)
    ref_amp = _set_impl(copy.deepcopy(module), "reference")
    ref_32 = _set_impl(copy.deepcopy(module), "reference")
    fused = _set_impl(copy.deepcopy(module), "fused")
    out_f, grad_f = _step(fused, inputs, autocast=True, amp=amp)
    out_r, grad_r = _step(ref_amp, inputs, autocast=True, amp=amp)
    _, grad_e = _step(ref_32, [x.float() for x in inputs], autocast=False)
    for a, b in zip(out_f, out_r):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **OUT_TOL)
    assert set(grad_f) == set(grad_r) == set(grad_e)
    for name, exact in grad_e.items():
        scale = exact.abs().max().item()
        err_ref = (grad_r[name].float() - exact).abs().max().item()
        err_fused = (grad_f[name].float() - exact).abs().max().item()
        assert grad_f[name].dtype == grad_r[name].dtype, name
        assert err_fused <= 3 * err_ref + 2e-2 * scale, (name, err_fused, err_ref, scale)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("amp", "input_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),  # CUDA's usual autocast dtype, here on the CPU
        (torch.float16, torch.float16),
    ],
)
def test_gsra_under_autocast(training, amp, input_dtype):
    gsra = GlobalSpatialRelationAttention(64, (4, 6), groups=8)
    _compare(gsra, [torch.randn(2, 64, 4, 6).to(input_dtype)], training, amp)


@pytest.mark.parametrize("training", [True, False])
def test_gsra_autocast_output_dtype_without_grad(training):
    """Inference (no autograd graph) takes another fused code path: same dtype rule."""
    ref = GlobalSpatialRelationAttention(64, (4, 6), groups=8, impl="reference").train(training)
    fused = copy.deepcopy(ref)
    fused.impl = "fused"
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 64, 4, 6).to(dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=AMP):
            want, got = ref(x), fused(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **OUT_TOL)


def test_gsra_autocast_backward_outside_the_autocast_block():
    """The usual training loop: forward under autocast, backward after leaving it."""
    gsra = GlobalSpatialRelationAttention(64, 8, groups=8)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=AMP):
        y = gsra(x)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in gsra.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_salad_under_autocast(training):
    salad = SALAD(32, num_clusters=8, cluster_dim=4, token_dim=8, dropout=0.0)
    features, token = torch.randn(2, 32, 4, 4), torch.randn(2, 32)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.salad = salad

        def forward(self, f, t):
            return self.salad((f, t))

    _compare(Wrapped(), [features, token], training)


def _tiny_model() -> CrossViewGeoLocalizer:
    return CrossViewGeoLocalizer(
        TinyCNN(32),
        GlobalSpatialRelationAttention(32, (4, 4), groups=8),
        SALAD(32, num_clusters=8, cluster_dim=4, token_dim=0, dropout=0.0),
    )


@pytest.mark.parametrize("training", [True, False])
def test_tiny_model_under_autocast(training):
    q, r = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    _compare(_tiny_model(), [q, r], training)


def test_lrfr_training_step_under_autocast():
    """One optimizer step of the paper's model (ConvNeXt-Tiny trunk) at 192 px under autocast."""
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = CrossViewGeoLocalizer.lrfr(192, dropout=0.0, stochastic_depth_prob=0.0)
    q, r = torch.randn(2, 3, 192, 192), torch.randn(2, 3, 192, 192)
    _compare(model, [q, r], training=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast("cpu", dtype=AMP):
        q_desc, r_desc = model(q, r)
    loss = -(q_desc.float() * r_desc.float()).sum(1).mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
