"""Fused Sinkhorn kernels: a scaling-form solver with an exact backward, and its log-domain twin.

Private module; the public entry points are :func:`gsra_salad.ops.log_sinkhorn` and
:func:`gsra_salad.ops.dustbin_sinkhorn`.

Notation (DESIGN 3.1/3.2). ``Z`` is the (B, M, N) log-kernel, ``a``/``b`` the marginals. The log
domain iterates ``u_t = log a - LSE_j(Z + v_{t-1})``, ``v_t = log b - LSE_i(Z + u_t)`` from
``v_0 = 0`` and returns ``Z + u_K + v_K``.

Every iterate is a diagonal rescaling of ONE matrix, the row-softmax ``Q = softmax_j(Z)``:
with ``alpha_t = exp(u_t + LSE_j Z)`` and ``beta_t = exp(v_t)``,

    alpha_1 = a                       (rows of Q sum to one)
    c_t     = Q^T alpha_t,   beta_t  = b / c_t
    r_t     = Q beta_{t-1},  alpha_t = a / r_t          (t >= 2)
    log P   = log_softmax(Z) + log alpha_K + log beta_K

so the forward costs one softmax and ``2K - 1`` matrix-vector products instead of ``2K``
log-sum-exp passes. The backward recomputes the ``2K - 1`` cheap products from ``Q`` (nothing
but ``Q`` is saved, so saved memory does not grow with ``K``), runs the adjoint recursion on the
vectors, and assembles ``dZ = G + Q * (A C^T - w 1^T)`` with one rank-2K batched matmul,
where ``A`` and ``C`` collect the (row, column) vector pairs of every step and ``w`` the
row-softmax correction (folded in as one more pair, ``(-w, 1)``). It is the exact gradient of
the K-step map.

Scalings can under/overflow (a column whose every kernel entry is below float range). A guard
checks every denominator of the recursion; if one leaves ``(tiny / eps, inf)`` the call is solved
again in the log domain by :class:`_LogDomainSinkhorn`, whose backward recomputes each softmax
from ``Z`` and the saved potentials (DESIGN 3.2).

SALAD's dustbin row is a constant row of the log-kernel, so its row of ``Q`` is exactly ``1/N``;
with ``dustbin_row=True`` that row is kept implicit (``Q`` holds the ``M - 1`` score rows only)
and the dustbin value never enters the computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__: list[str] = []


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
    """Runs the recursion; returns ``alpha_1..K``, ``beta_1..K``, ``r_2..K``, ``c_1..K``."""
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
    """One boolean tensor: every denominator in (tiny/eps, inf) and the final scalings finite."""
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
) -> Tensor | None:
    """Forward of the scaling form: the log plan plus ``shift``, or None if the guard failed.

    ``log_q``/``q``: (B, M', N) row-log-softmax and row-softmax of the (non-dustbin) rows;
    ``log_a``: (B, M) with M = M' (+1 with a dustbin row); ``log_b``: (B, N).
    """
    a, b = log_a.exp(), log_b.exp()
    alphas, betas, rs, cs = _scaling_iterates(q, a, b, num_iters, dustbin_row)
    if not bool(_scalings_ok(alphas, betas, rs, cs)):
        return None
    log_alpha, log_beta = alphas[-1].log() + shift, betas[-1].log()
    rows = q.shape[1]
    if not dustbin_row:  # log_q is ours: write the plan into it
        log_q += log_alpha[:, :, None]
        log_q += log_beta[:, None, :]
        return log_q
    batch, _, n = q.shape
    out = log_q.new_empty(batch, rows + 1, n)
    torch.add(log_q, log_alpha[:, :rows, None], out=out[:, :rows])
    out[:, rows:] = log_alpha[:, rows:, None] - math.log(n)
    out += log_beta[:, None, :]
    return out


def scaling_backward(
    grad: Tensor, q: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int, dustbin_row: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward of :func:`scaling_forward`: ``(d log_kernel rows of Q, d log_a, d log_b)``."""
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


class _ScalingSinkhorn(torch.autograd.Function):
    """Scaling-form Sinkhorn whose guard falls back to the log domain inside the same call.

    ``src`` is the log-kernel (B, M, N), or SALAD's scores (B, M - 1, N) when ``dustbin`` is a
    0-dim tensor: then the kernel has one more, constant row, and ``dustbin`` only serves the
    log-domain fallback (the plan does not depend on it; its gradient is exactly zero).
    The constant ``shift`` is added to the returned log plan.
    ``diagnose(z, log_a, log_b)`` raises a clear error for input that no solver can serve.
    """

    @staticmethod
    def forward(ctx, src: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int,
                dustbin: Tensor | None, diagnose, shift: float) -> Tensor:  # fmt: skip
        dustbin_row = dustbin is not None
        ctx.num_iters, ctx.dustbin_row = num_iters, dustbin_row
        log_q = torch.log_softmax(src, dim=-1)
        q = torch.exp(log_q)
        out = scaling_forward(log_q, q, log_a, log_b, num_iters, dustbin_row, shift)
        if out is not None:
            ctx.mode = "scaling"
            ctx.save_for_backward(q, log_a, log_b)
            return out
        # Guard failed: either the input is bad (raise) or the scalings left float range.
        del log_q, q
        z = src
        if dustbin_row:
            z = torch.cat([src, dustbin.to(src.dtype).expand(src.shape[0], 1, src.shape[2])], 1)
        diagnose(z, log_a, log_b, None)
        out, us, vs = log_domain_forward(z, log_a, log_b, num_iters)
        diagnose(z, log_a, log_b, (us[-1], vs[-1]))
        if shift:
            out += shift
        ctx.mode = "log"
        ctx.save_for_backward(z, log_a, log_b, us, vs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.mode == "scaling":
            q, log_a, log_b = ctx.saved_tensors
            d_z, d_a, d_b = scaling_backward(grad, q, log_a, log_b, ctx.num_iters, ctx.dustbin_row)
        else:
            z, log_a, log_b, us, vs = ctx.saved_tensors
            d_z, d_a, d_b = log_domain_backward(grad, z, us, vs)
            if ctx.dustbin_row:
                d_z = d_z[:, :-1]
        d_dustbin = grad.new_zeros(()) if ctx.needs_input_grad[4] else None
        return d_z, d_a, d_b, None, d_dustbin, None, None


# ---------------------------------------------------------------------------------------------
# Log domain
# ---------------------------------------------------------------------------------------------


def log_domain_forward(
    z: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain log-domain iterations without autograd.

    Returns ``(log_plan (B, M, N), u (K, B, M), v (K + 1, B, N))``.
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
    return out, torch.stack(us), torch.stack(vs)


def log_domain_backward(
    grad: Tensor, z: Tensor, us: Tensor, vs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact backward of :func:`log_domain_forward`, recomputing one softmax per half-step."""
    d_z = grad.clone()
    d_u = grad.sum(-1)
    d_v = grad.sum(-2)
    d_log_a = torch.zeros_like(d_u)
    d_log_b = torch.zeros_like(d_v)
    for t in range(us.shape[0] - 1, -1, -1):
        d_log_b += d_v
        col = torch.softmax(z + us[t][:, :, None], dim=-2)
        col *= d_v[:, None, :]
        d_z -= col
        d_u = d_u - col.sum(-1)
        d_log_a += d_u
        row = torch.softmax(z + vs[t][:, None, :], dim=-1)
        row *= d_u[:, :, None]
        d_z -= row
        d_v = -row.sum(-2)
        d_u = torch.zeros_like(d_u)
    return d_z, d_log_a, d_log_b


class _ZeroGradient(torch.autograd.Function):
    """Identity whose gradient is exactly zero: keeps a parameter in the graph (DDP sees it used)
    while declaring that the output does not depend on it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)
