import copy

import pytest
import torch
from torch import nn

from gsra_salad import GlobalSpatialRelationAttention
from tests._helpers import DEVICES, SavedBytes, free_port, gloo_group, randomise_norms

# float32 tolerances for the whole block (two BatchNorms over a rank-Ci reduction)
TOL32 = dict(rtol=2e-4, atol=2e-5)
TOL64 = dict(rtol=1e-9, atol=1e-10)


def _pair(channels, size, groups, dtype=torch.float64, device="cpu"):
    ref = GlobalSpatialRelationAttention(channels, size, groups, impl="reference")
    ref = randomise_norms(ref).to(device=device, dtype=dtype)
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
    # eval: the input, the parameters and the running statistics the recomputation normalises
    # with (saved, so that an update between forward and backward is detected, as for BatchNorm)
    stats = sum(b.numel() * b.element_size() for n, b in fused.named_buffers() if "running" in n)
    assert eval_bytes.bytes == x_bytes + params + stats


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
    published = randomise_norms(_PublishedGSRA(64, 36, ratio=8)).double().train(training)
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
    with pytest.raises(RuntimeError, match=r"not differentiable again.*impl='reference'"):
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


# ---------------------------------------------------------------------------------------------
# issue 10: mode changes between forward and backward, edited submodules, composability,
# dtype / value errors, impl validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "then"), [(True, False), (False, True)])
def test_backward_uses_the_mode_of_the_forward(first, then):
    ref, fused = _pair(32, (4, 4), 8)
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    results = []
    for module in (ref, fused):
        module.train(first)
        xg = x.clone().requires_grad_()
        out = module(xg)
        module.train(then)
        for m in module.modules():  # a changed momentum must not matter either
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        out.backward(grad_out)
        results.append((xg.grad, {n: p.grad for n, p in module.named_parameters()}))
    (gx_ref, gp_ref), (gx_fused, gp_fused) = results
    torch.testing.assert_close(gx_fused, gx_ref, **TOL64)
    for name in gp_ref:
        torch.testing.assert_close(gp_fused[name], gp_ref[name], **TOL64, msg=name)


def _edited_pair(edit):
    ref, fused = _pair(32, (4, 4), 8)
    ref.impl = fused.impl = "auto"
    edit(ref)
    edit(fused)
    ref.impl = "reference"
    return ref, fused


def _same_step_with_one_warning(ref, fused, match):
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    want = _step(ref, x, grad_out)
    with pytest.warns(UserWarning, match=match) as record:
        got = _step(fused, x, grad_out)
        _step(fused, x, grad_out)  # once per instance
    assert sum("reference path" in str(w.message) for w in record) == 1
    _assert_same_step(want, got, TOL64)


def test_hooks_on_submodules_fire():
    calls = []

    def add_hooks(m):
        m.gn.register_forward_hook(lambda mod, args, out: calls.append("gn") or out * 2)
        m.theta_spatial.register_forward_hook(lambda mod, args, out: calls.append("theta"))

    ref, fused = _edited_pair(add_hooks)
    _same_step_with_one_warning(ref, fused, "gn has forward")
    assert calls.count("gn") == 3 and calls.count("theta") == 3  # ref once, fused twice


def test_replaced_submodule_is_used():
    def replace(m):
        m.gg_spatial[4] = nn.Identity()

    ref, fused = _edited_pair(replace)
    _same_step_with_one_warning(ref, fused, r"gg_spatial\[4\] is a Identity")


def test_weight_norm_parametrization():
    def weight_norm(m):
        torch.nn.utils.parametrizations.weight_norm(m.gg_spatial[0])

    ref, fused = _edited_pair(weight_norm)
    _same_step_with_one_warning(ref, fused, "parametrizations")


def test_pruned_conv():
    def prune(m):
        torch.manual_seed(3)
        from torch.nn.utils import prune

        prune.random_unstructured(m.conv1x1, "weight", amount=0.5)

    ref, fused = _edited_pair(prune)
    _same_step_with_one_warning(ref, fused, "pruning")


def test_standard_module_and_sync_batchnorm_outside_a_process_group_run_fused(recwarn):
    _, fused = _pair(32, (4, 4), 8)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert isinstance(sync.gg_spatial[1], nn.SyncBatchNorm)
    assert fused._fused_unsupported() is None and sync._fused_unsupported() is None
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    _assert_same_step(_step(fused, x, grad_out), _step(sync, x, grad_out), TOL64)
    assert not [w for w in recwarn if "reference path" in str(w.message)]


def _sync_batchnorm_worker(rank: int, world: int, port: int, errors) -> None:

    with gloo_group(rank, world, port):
        try:
            torch.manual_seed(0)
            ref = GlobalSpatialRelationAttention(32, (4, 4), 8, impl="reference").double()
            fused = copy.deepcopy(ref)
            fused.impl = "auto"
            ref, fused = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (ref, fused))
            torch.manual_seed(1 + rank)
            x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
            grad_out = torch.randn_like(x)
            # training: SyncBatchNorm synchronises; the fused path must not use local statistics.
            # On CPU torch's SyncBatchNorm itself refuses (it needs GPU inputs): the same error.
            outcomes = []
            for m in (ref, fused):
                try:
                    outcomes.append(("ok", _step(m, x, grad_out)))
                except ValueError as e:
                    outcomes.append(("error", str(e)))
            assert outcomes[0][0] == outcomes[1][0], outcomes
            if outcomes[0][0] == "ok":
                _assert_same_step(outcomes[0][1], outcomes[1][1], TOL64)
            else:
                assert outcomes[0][1] == outcomes[1][1]
            assert "SyncBatchNorm" in fused._fused_unsupported()
            # eval: no synchronisation, the fused path runs and agrees
            ref.eval()
            fused.eval()
            assert fused._fused_unsupported() is None
            _assert_same_step(_step(ref, x, grad_out), _step(fused, x, grad_out), TOL64)
        except BaseException as e:  # report to the parent
            errors.put(f"rank {rank}: {type(e).__name__}: {e}")
            raise


def test_sync_batchnorm_in_a_process_group_two_gloo_processes():
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(
        _sync_batchnorm_worker, args=(2, port, errors), nprocs=2, join=True, start_method="spawn"
    )
    assert errors.empty()


def test_functorch_grad_matches_reference():
    ref, fused = _pair(16, (2, 3), 4)
    ref.eval()  # training-mode BatchNorm mutates buffers, which torch.func forbids (reference too)
    fused.eval()
    x = torch.randn(2, 16, 2, 3, dtype=torch.float64)
    got = torch.func.grad(lambda x: fused(x).pow(2).sum())(x)
    want = torch.func.grad(lambda x: ref(x).pow(2).sum())(x)
    torch.testing.assert_close(got, want, **TOL64)
    params = {k: v.detach() for k, v in fused.named_parameters()}

    def loss(module):
        return lambda p: torch.func.functional_call(module, p, (x,)).pow(2).sum()

    got, want = torch.func.grad(loss(fused))(params), torch.func.grad(loss(ref))(params)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL64, msg=name)
    with pytest.raises(RuntimeError, match=r"not differentiable again.*impl='reference'"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: fused(y).pow(2).sum())(x).sum())(x)


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph(training):
    ref, fused = _pair(32, (4, 4), 8, dtype=torch.float32)
    ref.train(training)
    fused.train(training)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 32, 4, 4)
    grad_out = torch.randn_like(x)
    if not training:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), ref(x), **TOL32)
    want = _step(ref, x, grad_out)
    out, gx, grads, buffers = _step(compiled, x, grad_out)
    strip = len("_orig_mod.")
    got = (
        out,
        gx,
        {n[strip:]: g for n, g in grads.items()},
        {n[strip:]: b for n, b in buffers.items()},
    )
    _assert_same_step(want, got, dict(rtol=1e-3, atol=1e-4))


def test_dtype_errors_name_the_dtypes():
    gsra = GlobalSpatialRelationAttention(32, (4, 4), groups=8)
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(
            TypeError, match=rf"input dtype {dtype} and parameter dtype torch\.float32"
        ):
            gsra(torch.randn(1, 32, 4, 4, dtype=dtype))
    with pytest.raises(TypeError, match=r"expected a floating-point input.*torch\.int64"):
        gsra(torch.ones(1, 32, 4, 4, dtype=torch.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        gsra(torch.randn(1, 32, 4, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_non_finite_input_and_overflow_are_rejected(impl):
    gsra = GlobalSpatialRelationAttention(32, (4, 4), groups=8, impl=impl)
    x = torch.randn(2, 32, 4, 4)
    for bad, kind in ((float("nan"), "NaN"), (float("inf"), "inf")):
        y = x.clone()
        y[0, 3, 1, 2] = bad
        with pytest.raises(ValueError, match=f"input contains {kind}"):
            gsra(y)
    with pytest.raises(ValueError, match=r"output is not finite.*too large"):
        gsra(x * 1e20)


def test_impl_is_validated_on_assignment_and_numpy_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    gsra = GlobalSpatialRelationAttention(np.int64(64), (np.int64(4), np.int32(4)), np.int64(8))
    assert type(gsra.channels) is int and type(gsra.groups) is int
    assert gsra.spatial_size == (4, 4) and type(gsra.spatial_size[0]) is int
    assert GlobalSpatialRelationAttention(64, np.int64(4), 8).spatial_size == (4, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        gsra.impl = "referense"
    assert gsra.impl == "auto"
    gsra.impl = "reference"
    assert gsra.impl == "reference"
    with pytest.raises(TypeError, match="channels must be an int"):
        GlobalSpatialRelationAttention(64.0, 4, 8)
