import math

import pytest
import torch

from gsra_salad import dustbin_sinkhorn, log_sinkhorn
from gsra_salad.ops import _sinkhorn_fused, dustbin_marginals
from tests._helpers import DEVICES, TOL, SavedBytes, published_matching_probs

SHAPES = [(1, 1, 1), (1, 3, 8), (2, 4, 4), (3, 5, 17), (2, 1, 6)]


def _uniform_marginals(m, n, dtype=torch.float64, batch=None):
    log_a = torch.log_softmax(torch.randn(m, dtype=dtype), -1)
    log_b = torch.log_softmax(torch.randn(n, dtype=dtype), -1)
    if batch is not None:
        log_a = torch.log_softmax(torch.randn(batch, m, dtype=dtype), -1)
    return log_a, log_b


def _weighted_loss(log_p):
    """A loss that uses every finite entry of the plan, in both log and linear form."""
    w = torch.linspace(-1, 1, log_p.numel(), dtype=torch.float64).reshape(log_p.shape)
    w = w.to(log_p)
    finite = torch.isfinite(log_p)
    return (log_p.exp() * w).sum() + torch.where(finite, log_p, 0).mul(w).sum() * 1e-2


def _value_and_grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(_weighted_loss(out), inputs)
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# gradcheck of the fused path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2, 5), (2, 3, 7), (2, 4, 4)])
@pytest.mark.parametrize("num_iters", [1, 2, 3, 10])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_dustbin_sinkhorn_fused_gradcheck(shape, num_iters, scale):
    scores = (torch.randn(shape, dtype=torch.float64) * scale).requires_grad_()
    _, m, n = shape
    if n == m:  # the dustbin row is -inf: check the cluster rows only

        def fn(s):
            return dustbin_sinkhorn(s, 1.0, num_iters, impl="fused")[:, :m]
    else:

        def fn(s):
            return dustbin_sinkhorn(s, 1.0, num_iters, impl="fused")

    assert torch.autograd.gradcheck(fn, (scores,))


@pytest.mark.parametrize("shape", [(1, 2, 5), (2, 3, 7), (2, 6, 3)])
@pytest.mark.parametrize("num_iters", [1, 2, 3, 10])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_log_sinkhorn_fused_gradcheck(shape, num_iters, scale):
    b, m, n = shape
    z = (torch.randn(shape, dtype=torch.float64) * scale).requires_grad_()
    log_a = torch.log_softmax(torch.randn(b, m, dtype=torch.float64), -1).requires_grad_()
    log_b = torch.log_softmax(torch.randn(n, dtype=torch.float64), -1).requires_grad_()

    def fn(z, la, lb):
        return log_sinkhorn(z, la, lb, num_iters, impl="fused")

    assert torch.autograd.gradcheck(fn, (z, log_a, log_b))


# ---------------------------------------------------------------------------------------------
# fused == reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_iters", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dustbin_fused_matches_reference(device, shape, num_iters, dtype):
    scores = torch.randn(shape, dtype=dtype).to(device)
    results = [
        _value_and_grads(lambda s: dustbin_sinkhorn(s, 1.0, num_iters, impl=impl), [scores])
        for impl in ("reference", "fused")
    ]
    (ref, (g_ref,)), (fused, (g_fused,)) = results
    torch.testing.assert_close(fused, ref, **TOL[dtype])
    torch.testing.assert_close(g_fused, g_ref, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_iters", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched_marginals", [False, True])
def test_log_sinkhorn_fused_matches_reference(device, shape, num_iters, dtype, batched_marginals):
    b, m, n = shape
    z = torch.randn(shape, dtype=dtype, device=device) * 3
    log_a, log_b = _uniform_marginals(m, n, dtype, batch=b if batched_marginals else None)
    inputs = [z, log_a.to(device), log_b.to(device)]
    (ref, g_ref), (fused, g_fused) = [
        _value_and_grads(lambda *x: log_sinkhorn(*x, num_iters, impl=impl), inputs)
        for impl in ("reference", "fused")
    ]
    torch.testing.assert_close(fused, ref, **TOL[dtype])
    for gf, gr in zip(g_fused, g_ref):
        torch.testing.assert_close(gf, gr, **TOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_non_contiguous_and_expanded_inputs(impl):
    base = torch.randn(3, 9, 4, dtype=torch.float64)
    transposed = base.transpose(1, 2)  # (3, 4, 9), non-contiguous
    expanded = torch.randn(1, 4, 9, dtype=torch.float64).expand(3, 4, 9)
    for scores in (transposed, expanded):
        out, (grad,) = _value_and_grads(lambda s: dustbin_sinkhorn(s, 0.5, 3, impl=impl), [scores])
        want, (want_grad,) = _value_and_grads(
            lambda s: dustbin_sinkhorn(s, 0.5, 3, impl="reference"), [scores.contiguous()]
        )
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_batch_size_one_matches_batched(impl):
    scores = torch.randn(4, 3, 8, dtype=torch.float64)
    whole = dustbin_sinkhorn(scores, 1.0, 3, impl=impl)
    for i in range(4):
        torch.testing.assert_close(
            dustbin_sinkhorn(scores[i : i + 1], 1.0, 3, impl=impl), whole[i : i + 1]
        )


def test_dustbin_matches_published_formulation():
    """Same values as the published ``get_matching_probs`` written out by hand."""
    scores = torch.randn(2, 3, 7, dtype=torch.float64)
    want = published_matching_probs(scores, 1.0, 3)
    for impl in ("reference", "fused", "auto"):
        torch.testing.assert_close(dustbin_sinkhorn(scores, 1.0, 3, impl=impl), want)


def test_hand_derived_one_iteration():
    """K=1 on a 1x2 kernel: u = log a - LSE(z), v = log b - LSE_i(z + u)."""
    z = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    log_a = torch.tensor([0.0], dtype=torch.float64)
    log_b = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    # u = -log 4; v_j = log 0.5 - (z_j - log 4) -> plan = z + u + v = log 0.5 for both columns
    for impl in ("reference", "fused"):
        out = log_sinkhorn(z, log_a, log_b, 1, impl=impl)
        torch.testing.assert_close(out.exp(), torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_column_sums_exact_and_rows_converge(impl):
    b, m, n = 2, 5, 9
    z = torch.randn(b, m, n, dtype=torch.float64) * 2
    log_a, log_b = _uniform_marginals(m, n, batch=b)
    plan = log_sinkhorn(z, log_a, log_b, 3, impl=impl).exp()
    torch.testing.assert_close(plan.sum(1), log_b.exp().expand(b, n))
    plan = log_sinkhorn(z, log_a, log_b, 300, impl=impl).exp()
    torch.testing.assert_close(plan.sum(2), log_a.exp(), rtol=1e-8, atol=1e-10)
    # dustbin: columns sum to one over clusters + dustbin; rows carry the marginals at convergence
    scores = torch.randn(b, m, n, dtype=torch.float64)
    p = dustbin_sinkhorn(scores, 1.0, 300, impl=impl).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(b, n, dtype=torch.float64))
    log_a_bin, _, norm = dustbin_marginals(m, n, dtype=torch.float64)
    torch.testing.assert_close(p.sum(2), (log_a_bin - norm).exp().expand(b, m + 1))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_output_independent_of_dustbin_and_its_gradient_is_exactly_zero(impl):
    scores = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    dustbin = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = dustbin_sinkhorn(scores, dustbin, 3, impl=impl)
    other = dustbin_sinkhorn(scores, 7.5, 3, impl=impl)
    torch.testing.assert_close(out, other, rtol=0, atol=1e-12)
    g_scores, g_dustbin = torch.autograd.grad(_weighted_loss(out), [scores, dustbin])
    assert g_dustbin is not None and g_dustbin.item() == 0.0
    assert g_scores.abs().sum() > 0


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_n_equal_m_gives_empty_dustbin(impl):
    scores = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = dustbin_sinkhorn(scores, 1.0, 3, impl=impl)
    assert torch.isfinite(out[:, :5]).all()
    assert torch.isneginf(out[:, 5]).all()
    (grad,) = torch.autograd.grad((out[:, :5].exp() * torch.randn(2, 5, 5)).sum(), [scores])
    assert torch.isfinite(grad).all()


def test_balanced_marginals_for_fewer_features_than_clusters():
    scores = torch.randn(2, 6, 4, dtype=torch.float64)
    log_a, log_b, norm = dustbin_marginals(6, 4, balanced=True, dtype=torch.float64)
    assert math.isclose(log_a.exp().sum().item(), log_b.exp().sum().item())
    kernel = torch.cat([scores, torch.ones(2, 1, 4, dtype=torch.float64)], 1)
    want = log_sinkhorn(kernel, log_a, log_b, 3, impl="reference") - norm
    for impl in ("reference", "fused"):
        got = dustbin_sinkhorn(scores, 1.0, 3, impl=impl, balanced=True)
        torch.testing.assert_close(got, want)
    # for n > m the balanced marginals are the published ones
    published = dustbin_marginals(3, 8, dtype=torch.float64)
    balanced = dustbin_marginals(3, 8, balanced=True, dtype=torch.float64)
    torch.testing.assert_close(published[0], balanced[0])


# ---------------------------------------------------------------------------------------------
# precision, dtypes, autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_half_precision_is_solved_in_float32(dtype, impl):
    scores = torch.randn(2, 4, 16).to(dtype)
    out = dustbin_sinkhorn(scores, 1.0, 3, impl=impl)
    assert out.dtype == dtype
    want = dustbin_sinkhorn(scores.float(), 1.0, 3, impl="reference").to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    s = scores.clone().requires_grad_()
    dustbin_sinkhorn(s, 1.0, 3, impl=impl).float().exp().sum().backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_autocast_does_not_lower_the_solve_precision(impl):
    scores = torch.randn(2, 4, 16)
    want = dustbin_sinkhorn(scores, 1.0, 3, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dustbin_sinkhorn(scores, 1.0, 3, impl=impl)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float32_error_against_float64_is_small():
    scores64 = torch.randn(4, 16, 64, dtype=torch.float64)
    want = dustbin_sinkhorn(scores64, 1.0, 3, impl="reference").exp()
    errs = {}
    for impl in ("reference", "fused"):
        got = dustbin_sinkhorn(scores64.float(), 1.0, 3, impl=impl).double().exp()
        errs[impl] = ((got - want).norm() / want.norm()).item()
    assert errs["fused"] <= 3e-7
    assert errs["fused"] <= 2 * errs["reference"] + 1e-8


# ---------------------------------------------------------------------------------------------
# the log-domain fallback of the fused path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_falls_back_to_log_domain_where_scalings_underflow(monkeypatch, dtype):
    calls = []
    original = _sinkhorn_fused.log_domain_forward

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_sinkhorn_fused, "log_domain_forward", counting)
    z = torch.randn(2, 4, 6, dtype=dtype)
    z[:, :, 0] -= 5000.0  # column 0 underflows in the row-softmax of every row
    log_a, log_b = _uniform_marginals(4, 6, dtype)
    inputs = [z, log_a, log_b]
    truth, g_truth = _value_and_grads(
        lambda *x: log_sinkhorn(*x, 3, impl="reference"), [x.double() for x in inputs]
    )
    ref, g_ref = _value_and_grads(lambda *x: log_sinkhorn(*x, 3, impl="reference"), inputs)
    fused, g_fused = _value_and_grads(lambda *x: log_sinkhorn(*x, 3, impl="fused"), inputs)
    assert calls, "the guard did not trigger the log-domain fallback"
    # magnitudes of 5000 cost float32 about 5000 * eps of absolute rounding in both solvers:
    # the fused result must be as close to the float64 truth as the reference is
    for gf, gr, gt in zip((fused, *g_fused), (ref, *g_ref), (truth, *g_truth)):
        err_f = (gf.double() - gt).abs().max().item()
        err_r = (gr.double() - gt).abs().max().item()
        assert err_f <= 2 * err_r + 1e-9, (err_f, err_r)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_minus_inf_entries_forbid_transport(impl):
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    z[:, 0, 1] = -math.inf
    log_a, log_b = _uniform_marginals(3, 5)
    out = log_sinkhorn(z, log_a, log_b, 3, impl=impl)
    assert torch.isneginf(out[:, 0, 1]).all()
    torch.testing.assert_close(out, log_sinkhorn(z, log_a, log_b, 3, impl="reference"))


# ---------------------------------------------------------------------------------------------
# autograd modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "auto"])
@pytest.mark.parametrize("solver", ["scaling", "log"])
def test_double_backward_raises_a_clear_error_naming_reference(impl, solver, monkeypatch):
    scores = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(
        dustbin_sinkhorn(scores, 1.0, 3, impl="reference").exp().pow(2).sum(),
        scores,
        create_graph=True,
    )
    g_ref.sum().backward()  # the reference is twice differentiable
    assert torch.isfinite(scores.grad).all()
    if solver == "log":  # force the log-domain fallback
        monkeypatch.setattr(_sinkhorn_fused, "_guard_threshold", lambda dtype: math.inf)
    out = dustbin_sinkhorn(scores, 1.0, 3, impl=impl).exp().pow(2).sum()
    (g,) = torch.autograd.grad(out, scores, create_graph=True)  # first order still works
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(RuntimeError, match=r"not differentiable.*impl='reference'"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match=r"impl='reference'"):
        torch.func.hessian(lambda s: dustbin_sinkhorn(s, 1.0, 3, impl=impl).exp().sum())(
            scores.detach()
        )


def test_auto_uses_reference_under_forward_mode_ad():
    import torch.autograd.forward_ad as fwAD

    scores = torch.randn(2, 3, 7, dtype=torch.float64)
    tangent = torch.randn_like(scores)
    with fwAD.dual_level():
        dual = fwAD.make_dual(scores, tangent)
        out = fwAD.unpack_dual(dustbin_sinkhorn(dual, 1.0, 3)).tangent
        with pytest.raises(RuntimeError, match="forward-mode"):
            dustbin_sinkhorn(dual, 1.0, 3, impl="fused")
    eps = 1e-6
    fd = (
        dustbin_sinkhorn(scores + eps * tangent, 1.0, 3)
        - dustbin_sinkhorn(scores - eps * tangent, 1.0, 3)
    ) / (2 * eps)
    torch.testing.assert_close(out, fd, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def _saved_bytes(fn, *shape_args, impl, num_iters):
    scores = torch.randn(*shape_args, requires_grad=True)
    with SavedBytes() as counter:
        fn(scores, impl, num_iters)
    return counter.bytes


def _dustbin(scores, impl, k):
    return dustbin_sinkhorn(scores, 1.0, k, impl=impl)


def _log(z, impl, k):
    m, n = z.shape[1:]
    return log_sinkhorn(
        z, torch.full((m,), -math.log(m)), torch.full((n,), -math.log(n)), k, impl=impl
    )


@pytest.mark.parametrize(("fn", "ratio_at_3"), [(_dustbin, 6), (_log, 5)])
def test_fused_saved_bytes_are_flat_in_num_iters(fn, ratio_at_3):
    shape = (4, 16, 64)
    sizes = {k: _saved_bytes(fn, *shape, impl="fused", num_iters=k) for k in (1, 3, 10)}
    assert sizes[1] == sizes[3] == sizes[10]
    assert sizes[1] <= 4 * 17 * 64 * 4 + 4 * 100  # one (B, M, N) float32 tensor, plus vectors
    reference = {k: _saved_bytes(fn, *shape, impl="reference", num_iters=k) for k in (3, 10)}
    assert reference[3] >= ratio_at_3 * sizes[3]
    assert reference[10] >= 15 * sizes[10]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_bad_input_raises_clear_errors(impl):
    s = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"n=2 local features for m=3 clusters.*larger input"):
        dustbin_sinkhorn(torch.randn(2, 3, 2), 1.0, impl=impl)
    with pytest.raises(ValueError, match=r"shape \(B, m, n\).*unsqueeze\(0\)"):
        dustbin_sinkhorn(torch.randn(3, 8), 1.0, impl=impl)
    with pytest.raises(TypeError, match="floating-point dtype"):
        dustbin_sinkhorn(torch.ones(2, 3, 8, dtype=torch.long), 1.0, impl=impl)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        dustbin_sinkhorn([[1.0]], 1.0, impl=impl)
    with pytest.raises(ValueError, match="num_iters must be >= 1"):
        dustbin_sinkhorn(s, 1.0, 0, impl=impl)
    with pytest.raises(TypeError, match="num_iters must be an int"):
        dustbin_sinkhorn(s, 1.0, 2.0, impl=impl)
    with pytest.raises(ValueError, match="dustbin must be a scalar"):
        dustbin_sinkhorn(s, torch.ones(2), impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        dustbin_sinkhorn(s, 1.0, impl="fast")
    with pytest.raises(ValueError, match="m >= 1 clusters"):
        dustbin_sinkhorn(torch.randn(2, 0, 8), 1.0, impl=impl)
    for bad, kind in ((math.nan, "NaN"), (math.inf, r"\+inf")):
        x = s.clone()
        x[1, 2, 5] = bad
        with pytest.raises(
            ValueError, match=rf"scores contains {kind} \(first at index \(1, 2, 5\)\)"
        ):
            dustbin_sinkhorn(x, 1.0, impl=impl)
    z = torch.randn(2, 3, 8)
    la, lb = torch.full((3,), -math.log(3)), torch.full((8,), -math.log(8))
    with pytest.raises(ValueError, match=r"log_a must have shape \(M,\) or \(B, M\)"):
        log_sinkhorn(z, la[:2], lb, impl=impl)
    with pytest.raises(ValueError, match=r"log_b must have shape \(N,\) or \(B, N\)"):
        log_sinkhorn(z, la, lb.expand(3, 8), impl=impl)
    with pytest.raises(ValueError, match="log_kernel must have shape"):
        log_sinkhorn(z[0], la, lb, impl=impl)
    nan_b = lb.clone()
    nan_b[3] = math.nan
    with pytest.raises(ValueError, match="log_b contains NaN"):
        log_sinkhorn(z, la, nan_b, impl=impl)
    blocked = z.clone()
    blocked[0, 1] = -math.inf  # row 1 cannot carry its mass
    with pytest.raises(ValueError, match="infeasible"):
        log_sinkhorn(blocked, la, lb, impl=impl)


def test_empty_batch():
    out = dustbin_sinkhorn(torch.randn(0, 3, 8), 1.0)
    assert out.shape == (0, 4, 8)


# ---------------------------------------------------------------------------------------------
# torch.func and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
@pytest.mark.parametrize("solver", ["scaling", "log"])
def test_torch_func_grad_matches_autograd(impl, solver, monkeypatch):
    if solver == "log":
        monkeypatch.setattr(_sinkhorn_fused, "_guard_threshold", lambda dtype: math.inf)
    scores = torch.randn(2, 3, 7, dtype=torch.float64)
    dustbin = torch.tensor(0.5, dtype=torch.float64)

    def loss(s, d):
        return _weighted_loss(dustbin_sinkhorn(s, d, 3, impl=impl))

    g_scores, g_dustbin = torch.func.grad(loss, argnums=(0, 1))(scores, dustbin)
    _, (want,) = _value_and_grads(lambda s: dustbin_sinkhorn(s, 0.5, 3, impl="reference"), [scores])
    torch.testing.assert_close(g_scores, want)
    assert g_dustbin.item() == 0.0
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    log_a, log_b = _uniform_marginals(3, 5, batch=2)
    grads = torch.func.grad(
        lambda *x: _weighted_loss(log_sinkhorn(*x, 3, impl=impl)), argnums=(0, 1, 2)
    )(z, log_a, log_b)
    _, want = _value_and_grads(lambda *x: log_sinkhorn(*x, 3, impl="reference"), [z, log_a, log_b])
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
@pytest.mark.parametrize("solver", ["scaling", "log"])
def test_torch_func_vmap_and_jacrev_match_a_loop(impl, solver, monkeypatch):
    if solver == "log":
        monkeypatch.setattr(_sinkhorn_fused, "_guard_threshold", lambda dtype: math.inf)
    scores = torch.randn(4, 2, 3, 7, dtype=torch.float64)  # vmapped over the leading 4
    dustbins = torch.randn(4, dtype=torch.float64)
    got = torch.func.vmap(lambda s, d: dustbin_sinkhorn(s, d, 3, impl=impl))(scores, dustbins)
    want = torch.stack([dustbin_sinkhorn(s, 1.0, 3, impl="reference") for s in scores])
    torch.testing.assert_close(got, want)
    # vmap over dim 1 of the kernel with unbatched marginals, and the marginals vmapped alone
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    log_a, log_b = _uniform_marginals(3, 5, batch=2)
    got = torch.func.vmap(lambda x: log_sinkhorn(x, log_a, log_b, 3, impl=impl), in_dims=1)(z)
    want = torch.stack([log_sinkhorn(z[:, i], log_a, log_b, 3, impl="reference") for i in range(4)])
    torch.testing.assert_close(got, want)
    many_b = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    got = torch.func.vmap(lambda lb: log_sinkhorn(z[:, 0], log_a, lb, 3, impl=impl))(many_b)
    want = torch.stack([log_sinkhorn(z[:, 0], log_a, b, 3, impl="reference") for b in many_b])
    torch.testing.assert_close(got, want)
    # jacrev = vmap over the backward
    s = scores[0, :1, :, :4]
    jac = torch.func.jacrev(lambda x: dustbin_sinkhorn(x, 1.0, 3, impl=impl).exp())(s)
    want = torch.autograd.functional.jacobian(
        lambda x: dustbin_sinkhorn(x, 1.0, 3, impl="reference").exp(), s
    )
    torch.testing.assert_close(jac, want)


def test_fused_has_no_forward_mode_and_says_so():
    scores = torch.randn(1, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="impl='reference'"):
        torch.func.jvp(lambda s: dustbin_sinkhorn(s, 1.0, 3, impl="fused"), (scores,), (scores,))
    _, tangent = torch.func.jvp(  # auto takes the reference path
        lambda s: dustbin_sinkhorn(s, 1.0, 3), (scores,), (torch.ones_like(scores),)
    )
    assert torch.isfinite(tangent).all()


@pytest.mark.parametrize("fn", ["dustbin", "log"])
def test_compiled_fullgraph_matches_eager_in_values_and_gradients(fn):
    """One small compile per operator: forward and backward in one full graph, no breaks."""
    torch._dynamo.reset()
    scores = torch.randn(2, 3, 8, requires_grad=True)
    dustbin = torch.tensor(1.0, requires_grad=True)
    log_a = torch.full((3,), -math.log(3.0))
    log_b = torch.full((8,), -math.log(8.0))

    def run(s, d):
        if fn == "dustbin":
            return dustbin_sinkhorn(s, d, 3)
        return log_sinkhorn(s, log_a, log_b, 3)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = compiled(scores, dustbin)
    g = torch.autograd.grad(_weighted_loss(out), [scores, dustbin], allow_unused=True)
    want = run(scores, dustbin)
    g_want = torch.autograd.grad(_weighted_loss(want), [scores, dustbin], allow_unused=True)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(g[0], g_want[0], **TOL[torch.float32])
    if fn == "dustbin":
        assert g[1].item() == 0.0


# ---------------------------------------------------------------------------------------------
# argument types and non-finite dustbins
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_numpy_scalars_are_accepted(impl):
    np = pytest.importorskip("numpy")
    scores = torch.randn(2, 3, 8, dtype=torch.float64)
    want = dustbin_sinkhorn(scores, 0.5, 3, impl=impl)
    for dustbin in (np.float32(0.5), np.float64(0.5), np.array(0.5), np.array([0.5]), 0.5, 1):
        torch.testing.assert_close(dustbin_sinkhorn(scores, dustbin, np.int64(3), impl=impl), want)
    la, lb = torch.full((3,), -math.log(3.0)), torch.full((8,), -math.log(8.0))
    log_sinkhorn(scores.float(), la, lb, np.int32(2), impl=impl)
    with pytest.raises(TypeError, match="dustbin must be a float"):
        dustbin_sinkhorn(scores, "0.5", impl=impl)
    with pytest.raises(TypeError, match="num_iters must be an int"):
        dustbin_sinkhorn(scores, 1.0, np.float64(3.0), impl=impl)


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("n", [5, 8])  # n == m: empty dustbin row
def test_non_finite_dustbin_is_rejected_by_every_impl(impl, bad, as_tensor, n):
    scores = torch.randn(2, 5, n)
    dustbin = torch.tensor(bad, requires_grad=True) if as_tensor else bad
    with pytest.raises(ValueError, match=r"dustbin must be finite, got (nan|inf|-inf)"):
        dustbin_sinkhorn(scores, dustbin, 3, impl=impl)
