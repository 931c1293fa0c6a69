"""Fused Sinkhorn kernels: a scaling-form solver with an exact backward, and its log-domain twin.

Private module; the public entry points are :func:`gsra_salad.ops.log_sinkhorn` and
:func:`gsra_salad.ops.dustbin_sinkhorn`, which call :func:`fused_sinkhorn`. The derivation,
with the symbols used here, is docs/derivations.md section 1 (scaling form, guard, adjoint of
the K-step map) and section 2 (the dustbin row).

``Z`` is the (B, M, N) log-kernel, ``a``/``b`` the marginals. Every log-domain iterate is a
diagonal rescaling of the row-softmax ``Q = softmax_j(Z)``: with ``alpha_1 = a``,
``c_t = Q^T alpha_t``, ``beta_t = b / c_t``, ``r_t = Q beta_{t-1}``, ``alpha_t = a / r_t``
(t >= 2), the plan is ``log P = log_softmax(Z) + log alpha_K + log beta_K``. The forward costs
one softmax and ``2K - 1`` matrix-vector products and saves only ``Q``; the backward recomputes
the vectors and assembles ``dZ = G + Q * (A C^T - w 1^T)`` with one rank-2K batched matmul.

A guard checks every denominator of the recursion; if one leaves ``(tiny / eps, inf)`` the call
is solved again in the log domain by :class:`_LogDomainSinkhorn`, whose backward recomputes each
softmax from ``Z`` and the saved potentials. Under ``torch.compile`` the log-domain Function is
used directly: the guard is a data-dependent branch, which a full graph cannot hold.

Every Function here is usable with ``torch.func`` (``setup_context`` plus a ``vmap`` rule that
folds the vmapped dimension into the batch dimension) and is traced by ``torch.compile``. The
backward passes are Functions too, whose own backward raises a clear error: double backward
needs ``impl="reference"``.

SALAD's dustbin row is a constant row of the log-kernel, so its row of ``Q`` is exactly ``1/N``;
with a dustbin, ``Q`` holds the ``M - 1`` score rows only and the dustbin value never enters the
scaling form (docs/derivations.md section 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import is_tracing

__all__: list[str] = []

DOUBLE_BACKWARD_ERROR = (
    "the fused Sinkhorn backward is not differentiable (double backward, torch.func.hessian, "
    "grad of grad); pass impl='reference' to dustbin_sinkhorn / log_sinkhorn (or "
    "SALAD(..., impl='reference')) for higher-order derivatives"
)
FORWARD_AD_ERROR = (
    "the fused Sinkhorn has no forward-mode derivative (torch.func.jvp / jacfwd / hessian); "
    "pass impl='reference' to dustbin_sinkhorn / log_sinkhorn (or SALAD(..., impl='reference'))"
)


def _guard_threshold(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny / info.eps


# ---------------------------------------------------------------------------------------------
# Scaling form
# ---------------------------------------------------------------------------------------------


def _q_t(q: Tensor, alpha: Tensor, dustbin_row: bool) -> Tensor:
    """``Q^T alpha``: (B, N). ``alpha`` is (B, M) with M = rows of Q (+1 with a dustbin row)."""
    rows = q.shape[1]
    out = torch.bmm(alpha[:, None, :rows], q).squeeze(1)
    if dustbin_row:
        out = out + alpha[:, rows:] / q.shape[2]
    return out


def _q(q: Tensor, beta: Tensor, dustbin_row: bool) -> Tensor:
    """``Q beta``: (B, M). ``bmm(v, Q^T)`` is several times faster than ``bmm(Q, v)`` on CPU."""
    out = torch.bmm(beta[:, None, :], q.mT).squeeze(1)
    if dustbin_row:
        out = torch.cat([out, beta.mean(-1, keepdim=True)], dim=-1)
    return out


def _scaling_iterates(
    q: Tensor, a: Tensor, b: Tensor, num_iters: int, dustbin_row: bool
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Runs the recursion (docs/derivations.md section 1.2); returns ``alpha_1..K``,
    ``beta_1..K``, ``r_2..K``, ``c_1..K``."""
    alphas, betas, rs, cs = [a], [], [], []
    alpha = a
    for t in range(num_iters):
        if t > 0:
            r = _q(q, betas[-1], dustbin_row)
            alpha = a / r
            rs.append(r)
            alphas.append(alpha)
        c = _q_t(q, alpha, dustbin_row)
        cs.append(c)
        betas.append(b / c)
    return alphas, betas, rs, cs


def _scalings_ok(alphas: list[Tensor], betas: list[Tensor], rs: list[Tensor], cs: list[Tensor]):
    """One boolean tensor: every denominator in (tiny/eps, inf) and the final scalings finite
    (the guard of docs/derivations.md section 1.3)."""
    dens = rs + cs
    lo = torch.stack([d.amin() for d in dens]).amin()
    hi = torch.stack([d.amax() for d in dens]).amax()
    ends = alphas[-1].sum() + betas[-1].sum()
    return (lo > _guard_threshold(lo.dtype)) & (hi < math.inf) & torch.isfinite(ends)


def scaling_forward(
    log_q: Tensor,
    q: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    num_iters: int,
    dustbin_row: bool,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Forward of the scaling form: ``(log plan + shift, ok)``; the plan is valid where ``ok``.

    ``log_q``/``q``: (B, M', N) row-log-softmax and row-softmax of the (non-dustbin) rows;
    ``log_a``: (B, M) with M = M' (+1 with a dustbin row); ``log_b``: (B, N). ``ok`` is a 0-dim
    bool tensor (the guard): no host synchronisation here.
    """
    a, b = log_a.exp(), log_b.exp()
    alphas, betas, rs, cs = _scaling_iterates(q, a, b, num_iters, dustbin_row)
    ok = _scalings_ok(alphas, betas, rs, cs)
    log_alpha, log_beta = alphas[-1].log() + shift, betas[-1].log()
    rows = q.shape[1]
    if not dustbin_row:  # log_q is ours: write the plan into it
        log_q += log_alpha[:, :, None]
        log_q += log_beta[:, None, :]
        return log_q, ok
    batch, _, n = q.shape
    out = log_q.new_empty(batch, rows + 1, n)
    torch.add(log_q, log_alpha[:, :rows, None], out=out[:, :rows])
    out[:, rows:] = log_alpha[:, rows:, None] - math.log(n)
    out += log_beta[:, None, :]
    return out, ok


def scaling_backward(
    grad: Tensor, q: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int, dustbin_row: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward of :func:`scaling_forward`: ``(d log_kernel rows of Q, d log_a, d log_b)``.

    The adjoint recursion and the rank-2K assembly of docs/derivations.md section 1.4.
    """
    a, b = log_a.exp(), log_b.exp()
    alphas, betas, rs, cs = _scaling_iterates(q, a, b, num_iters, dustbin_row)
    rows = q.shape[1]
    d_ell = grad.sum(-1)  # d log alpha_K
    d_m = grad.sum(-2)  # d log beta_K
    w = d_ell[:, :rows].clone()
    d_log_a = torch.zeros_like(log_a)
    d_log_b = torch.zeros_like(log_b)
    left: list[Tensor] = []  # (B, M') columns of A
    right: list[Tensor] = []  # (B, N) columns of C
    for t in range(num_iters - 1, -1, -1):
        # column step: m_t = log b - log c_t,  c_t = Q^T alpha_t
        d_log_b += d_m
        d_c = -d_m / cs[t]
        q_dc = _q(q, d_c, dustbin_row)
        left.append(alphas[t][:, :rows])
        right.append(d_c)
        w += alphas[t][:, :rows] * q_dc[:, :rows]
        d_ell = d_ell + alphas[t] * q_dc
        # row step: ell_t = log a - log r_t  (r_1 = Q 1 = 1 does not depend on Z)
        d_log_a += d_ell
        if t == 0:
            break
        r = rs[t - 1]
        d_r = -d_ell / r
        left.append(d_r[:, :rows])
        right.append(betas[t - 1])
        w += d_r[:, :rows] * r[:, :rows]
        d_m = betas[t - 1] * _q_t(q, d_r, dustbin_row)
        d_ell = torch.zeros_like(d_ell)
    left.append(-w)  # the row-softmax correction rides along as one more rank-one term
    right.append(torch.ones_like(d_m))
    d_z = torch.bmm(torch.stack(left, dim=-1), torch.stack(right, dim=-2))  # rank 2K
    torch.addcmul(grad[:, :rows], q, d_z, out=d_z)
    return d_z, d_log_a, d_log_b


def _differentiable_backward() -> bool:
    """Whether a backward runs as a Function: when it records a graph (``create_graph=True``;
    its backward then raises a clear error) or runs under a ``torch.func`` transform (e.g.
    vmapped by ``jacrev``; its vmap rule serves it). Otherwise
    (plain ``backward()``, or under compile, where dynamo traces the backward) the adjoint
    runs directly, which saves a Function call."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


class _ScalingSinkhorn(torch.autograd.Function):
    """Scaling-form Sinkhorn: ``(log plan + shift, Q, ok)``; the plan is valid where ``ok``.

    ``src`` is the log-kernel (B, M, N), or SALAD's scores (B, M - 1, N) when ``dustbin`` is a
    0-dim tensor: then the kernel has one more, constant row whose value is not used (the plan
    does not depend on it; its gradient is exactly zero). ``Q`` and ``ok`` are returned
    non-differentiable: ``Q`` is what the backward saves, ``ok`` the guard, which the caller
    reads (:func:`fused_sinkhorn`) to fall back to the log domain.
    """

    @staticmethod
    def forward(src: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int,
                dustbin: Tensor | None, shift: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        log_q = torch.log_softmax(src, dim=-1)
        q = torch.exp(log_q)
        out, ok = scaling_forward(log_q, q, log_a, log_b, num_iters, dustbin is not None, shift)
        return out, q, ok

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, log_a, log_b, num_iters, dustbin, _ = inputs
        _, q, ok = output
        ctx.mark_non_differentiable(q, ok)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, log_a, log_b)
        ctx.num_iters, ctx.dustbin_row = num_iters, dustbin is not None

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_q: None, _grad_ok: None):
        if grad is None:
            return None, None, None, None, None, None
        q, log_a, log_b = ctx.saved_tensors
        args = (grad, q, log_a, log_b, ctx.num_iters, ctx.dustbin_row)
        if _differentiable_backward():
            d_z, d_a, d_b = _ScalingBackward.apply(*args)
        else:
            d_z, d_a, d_b = scaling_backward(*args)
        d_dustbin = grad.new_zeros(()) if ctx.needs_input_grad[4] else None
        return d_z, d_a, d_b, None, d_dustbin, None

    @staticmethod
    def jvp(ctx, *tangents):  # never traced by dynamo: compile takes the log domain
        raise RuntimeError(FORWARD_AD_ERROR)

    @staticmethod
    def vmap(info, in_dims, src, log_a, log_b, num_iters, dustbin, shift):
        v = info.batch_size
        src, log_a, log_b, dustbin = _fold(v, in_dims, (src, log_a, log_b, dustbin), (0, 1, 2, 4))
        out, q, ok = _apply(_ScalingSinkhorn, src, log_a, log_b, num_iters, dustbin, shift)
        return (_unfold(v, out), _unfold(v, q), ok), (0, 0, None)


class _NotDifferentiableAgain(torch.autograd.Function):
    """Base of the backward Functions: differentiating them again raises a clear error."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class _ScalingBackward(_NotDifferentiableAgain):
    """:func:`scaling_backward` as a Function whose own backward raises a clear error."""

    @staticmethod
    def forward(grad, q, log_a, log_b, num_iters, dustbin_row):
        return scaling_backward(grad, q, log_a, log_b, num_iters, dustbin_row)

    @staticmethod
    def vmap(info, in_dims, grad, q, log_a, log_b, num_iters, dustbin_row):
        v = info.batch_size
        tensors = _fold(v, in_dims, (grad, q, log_a, log_b), (0, 1, 2, 3))
        out = _ScalingBackward.apply(*tensors, num_iters, dustbin_row)
        return tuple(_unfold(v, x) for x in out), (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Log domain
# ---------------------------------------------------------------------------------------------


def log_domain_forward(
    z: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain log-domain iterations without autograd.

    Returns ``(log_plan (B, M, N), u (B, K, M), v (B, K + 1, N))``.
    """
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    us, vs = [], [v]
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(z + v[:, None, :], dim=-1)
        v = log_b - torch.logsumexp(z + u[:, :, None], dim=-2)
        us.append(u)
        vs.append(v)
    out = z + u[:, :, None]
    out += v[:, None, :]
    return out, torch.stack(us, dim=1), torch.stack(vs, dim=1)


def log_domain_backward(
    grad: Tensor, z: Tensor, us: Tensor, vs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward of :func:`log_domain_forward`, recomputing one softmax per half-step
    (docs/derivations.md section 1.5)."""
    d_z = grad.clone()
    d_u = grad.sum(-1)
    d_v = grad.sum(-2)
    d_log_a = torch.zeros_like(d_u)
    d_log_b = torch.zeros_like(d_v)
    for t in range(us.shape[1] - 1, -1, -1):
        d_log_b += d_v
        col = torch.softmax(z + us[:, t, :, None], dim=-2)
        col *= d_v[:, None, :]
        d_z -= col
        d_u = d_u - col.sum(-1)
        d_log_a += d_u
        row = torch.softmax(z + vs[:, t, None, :], dim=-1)
        row *= d_u[:, :, None]
        d_z -= row
        d_v = -row.sum(-2)
        d_u = torch.zeros_like(d_u)
    return d_z, d_log_a, d_log_b


class _LogDomainSinkhorn(torch.autograd.Function):
    """Log-domain Sinkhorn: ``(log plan + shift, u (B, K, M), v (B, K + 1, N))``.

    Saves ``Z`` and the potentials (flat in K for the (B, M, N)-sized part); the potentials are
    returned non-differentiable so that the caller can check them.
    """

    @staticmethod
    def forward(z: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int,
                shift: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        out, us, vs = log_domain_forward(z, log_a, log_b, num_iters)
        if shift:
            out += shift
        return out, us, vs

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z = inputs[0]
        _, us, vs = output
        ctx.mark_non_differentiable(us, vs)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, us, vs)

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_u: None, _grad_v: None):
        if grad is None:
            return None, None, None, None, None
        z, us, vs = ctx.saved_tensors
        if _differentiable_backward():
            d_z, d_a, d_b = _LogDomainBackward.apply(grad, z, us, vs)
        else:
            d_z, d_a, d_b = log_domain_backward(grad, z, us, vs)
        return d_z, d_a, d_b, None, None

    @staticmethod
    def vmap(info, in_dims, z, log_a, log_b, num_iters, shift):
        return _log_domain_vmap(
            _LogDomainSinkhorn, info, in_dims, z, log_a, log_b, num_iters, shift
        )


def _log_domain_vmap(function, info, in_dims, z, log_a, log_b, num_iters, shift):
    """The vmap rule of the log-domain solver Functions: the vmapped dimension joins the batch."""
    v = info.batch_size
    z, log_a, log_b = _fold(v, in_dims, (z, log_a, log_b), (0, 1, 2))
    out = _apply(function, z, log_a, log_b, num_iters, shift)
    return tuple(_unfold(v, x) for x in out), (0, 0, 0)


class _LogDomainSinkhornEager(_LogDomainSinkhorn):
    """:class:`_LogDomainSinkhorn` with a forward-mode rule that raises a clear error (dynamo
    cannot trace a Function that defines ``jvp``, so compiled code uses the parent)."""

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(FORWARD_AD_ERROR)

    @staticmethod
    def vmap(info, in_dims, z, log_a, log_b, num_iters, shift):
        return _log_domain_vmap(
            _LogDomainSinkhornEager, info, in_dims, z, log_a, log_b, num_iters, shift
        )


class _LogDomainBackward(_NotDifferentiableAgain):
    """:func:`log_domain_backward` as a Function whose own backward raises a clear error."""

    @staticmethod
    def forward(grad, z, us, vs):
        return log_domain_backward(grad, z, us, vs)

    @staticmethod
    def vmap(info, in_dims, grad, z, us, vs):
        v = info.batch_size
        out = _LogDomainBackward.apply(*_fold(v, in_dims, (grad, z, us, vs), (0, 1, 2, 3)))
        return tuple(_unfold(v, x) for x in out), (0, 0, 0)


class _ZeroGradient(torch.autograd.Function):
    """Identity whose gradient is exactly zero: keeps a parameter in the graph (DDP sees it used)
    while declaring that the output does not depend on it (docs/derivations.md section 2)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)


def _plain_twin(cls: type) -> type:
    """The same Function written in the ``forward(ctx, ...)`` style.

    ``Function.apply`` binds the arguments of a ``setup_context`` Function with
    ``inspect.signature`` on every call (tens of microseconds); outside ``torch.func``
    transforms and compile, where ``setup_context`` is not needed, :func:`_apply` runs the twin.
    """

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    body = {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)}
    return type(f"{cls.__name__}Plain", (torch.autograd.Function,), body)


_TWINS: dict[type, type] = {}


def _apply(cls: type, *args):
    """``cls.apply(*args)``, through the plain twin where no transform needs ``setup_context``."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return cls.apply(*args)
    twin = _TWINS.get(cls)
    if twin is None:
        twin = _TWINS[cls] = _plain_twin(cls)
    return twin.apply(*args)


def zero_gradient(x: Tensor) -> Tensor:
    """``x`` with an exact zero gradient, kept in the autograd graph (:class:`_ZeroGradient`)."""
    if x.requires_grad and torch.is_grad_enabled() and not is_tracing():
        return _apply(_ZeroGradient, x)
    return x


# ---------------------------------------------------------------------------------------------
# vmap support and the entry point
# ---------------------------------------------------------------------------------------------


def _fold(v: int, in_dims, args, positions) -> list:
    """Folds the vmapped dimension of ``args`` (``in_dims[positions]``) into the batch dimension.

    Batch-first tensors become (v * B, ...); a 0-dim tensor (the dustbin, whose value the
    Functions do not read) keeps one element; ``None`` stays ``None``.
    """
    out = []
    for x, p in zip(args, positions):
        d = in_dims[p]
        if isinstance(x, Tensor):
            if d is None and x.dim() == 0:
                pass
            elif x.dim() == 1 and d is not None:  # a vmapped 0-dim tensor
                x = x.select(d, 0)
            else:
                x = x.expand(v, *x.shape) if d is None else x.movedim(d, 0)
                x = x.reshape(v * x.shape[1], *x.shape[2:])
        out.append(x)
    return out


def _unfold(v: int, x: Tensor) -> Tensor:
    return x.reshape(v, x.shape[0] // v, *x.shape[1:])


def fused_sinkhorn(
    src: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    num_iters: int,
    *,
    dustbin: Tensor | None = None,
    shift: float = 0.0,
    diagnose=None,
) -> Tensor:
    """The fused solve: scaling form, or the log domain where its guard fails or under compile.

    ``src``/``dustbin``/``shift`` as in :class:`_ScalingSinkhorn`. ``diagnose(z, log_a, log_b,
    potentials)`` (None: no checks) raises a clear error for input that no solver can serve.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        out, _, ok = _apply(_ScalingSinkhorn, src, log_a, log_b, num_iters, dustbin, shift)
        if diagnose is not None and dustbin is not None:
            ok = ok & torch.isfinite(dustbin)
        if bool(ok):
            return out
    z = src
    if dustbin is not None:
        z = torch.cat([src, zero_gradient(dustbin).expand(src.shape[0], 1, src.shape[2])], 1)
    if diagnose is not None:
        diagnose(z, log_a, log_b, None)
    log_domain = _LogDomainSinkhorn if compiling else _LogDomainSinkhornEager
    out, us, vs = _apply(log_domain, z, log_a, log_b, num_iters, shift)
    if diagnose is not None:
        diagnose(z, log_a, log_b, (us[:, -1], vs[:, -1]))
    return out
