"""Low-rank evaluation of the GSRA block. Private; see ``layers/gsra.py``.

The derivation, with the symbols used here, is in docs/derivations.md, section 3 ("GSRA in
low-rank form"): 3.1 the rank identity, 3.2 the BatchNorm moment identities, 3.3 the folding of
the 1-channel conv, 3.4 eval folding, 3.5 what the backward recomputes, 3.6 mixed precision.

Per group sample ``s`` (batch x groups), ``theta_s`` and ``phi_s`` are (Ci, P) with P = H W,
``z_j = [theta_j; phi_j]`` and ``C_s = [Wa phi_s^T | Wb theta_s^T]`` (P/2 x 2Ci). No P x P or
P/2 x P tensor is ever formed.

Everything the computation needs besides tensors is recorded once, at forward time, in a
:class:`GSRAPlan` (mode, batch-statistics flags, running-statistics update factors, autocast
state), so a backward that runs after ``module.eval()`` or a change of ``momentum`` recomputes
the forward that actually ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..ops._dispatch import autocast_state

__all__: list[str] = []

BN_NAMES = ("theta_spatial.1", "phi_spatial.1", "gg_spatial.1", "gg_spatial.3")
_STATS = ("running_mean", "running_var")
_DOUBLE_BACKWARD = (
    "GlobalSpatialRelationAttention: the fused path's backward is not differentiable again "
    "(double backward, e.g. a gradient penalty or torch.func.hessian); build the module with "
    "impl='reference' (or set module.impl = 'reference') for higher-order derivatives"
)


@dataclass(frozen=True)
class BNPlan:
    """What one BatchNorm does in this forward, fixed when the forward runs."""

    eps: float
    batch_stats: bool  # normalise with the batch statistics (training or no running stats)
    factor: float  # running-statistics update factor (0: no update)

    @staticmethod
    def of(bn: nn.BatchNorm2d) -> BNPlan:
        """Mirror ``nn.BatchNorm2d.forward``; the caller has already incremented
        ``num_batches_tracked``."""
        batch_stats = bn.training or bn.running_mean is None
        factor = 0.0
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
            else:
                factor = float(bn.momentum)
        return BNPlan(float(bn.eps), batch_stats, factor)


@dataclass(frozen=True)
class GSRAPlan:
    """Everything except tensors that the forward and its recomputation need."""

    groups: int
    gn_groups: int
    gn_eps: float
    bn: tuple[BNPlan, BNPlan, BNPlan, BNPlan]  # in the order of BN_NAMES
    autocast: tuple[str, bool, torch.dtype]  # (device type, enabled, lower-precision dtype)

    @staticmethod
    def of(module, x: Tensor) -> GSRAPlan:
        bns = tuple(BNPlan.of(module.get_submodule(name)) for name in BN_NAMES)
        gn = module.gn
        return GSRAPlan(
            int(module.groups), int(gn.num_groups), float(gn.eps), bns, autocast_state(x.device)
        )

    def recomputation(self) -> GSRAPlan:
        """The same forward without running-statistics updates."""
        bns = tuple(BNPlan(b.eps, b.batch_stats, 0.0) for b in self.bn)
        return GSRAPlan(self.groups, self.gn_groups, self.gn_eps, bns, self.autocast)

    def stat_names(self, for_backward: bool) -> list[str]:
        """Buffers the forward reads or updates (``for_backward``: those the recomputation
        reads, i.e. the running statistics of eval-mode BatchNorms)."""
        names = []
        for prefix, bn in zip(BN_NAMES, self.bn):
            used = not bn.batch_stats if for_backward else (not bn.batch_stats or bn.factor > 0)
            if used:
                names += [f"{prefix}.{stat}" for stat in _STATS]
        return names


def _autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (a no-op where it is off anyway)."""
    if autocast_state(torch.device(device_type))[1]:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_as(state: tuple[str, bool, torch.dtype]):
    """A context that restores a recorded autocast state."""
    device_type, enabled, dtype = state
    if enabled:
        return torch.autocast(device_type, dtype=dtype)
    return _autocast_off(device_type)


def _batch_norm(
    y: Tensor, plan: BNPlan, prefix: str, params: Mapping[str, Tensor], stats: Mapping[str, Tensor]
) -> Tensor:
    """Functional BatchNorm over dim 1 of ``y`` (compute dtype), as ``plan`` says; updates the
    running statistics in place when ``plan.factor > 0`` (also when they are stored in another
    dtype than ``y``'s)."""
    weight, bias = params.get(prefix + ".weight"), params.get(prefix + ".bias")
    weight = None if weight is None else weight.to(y.dtype)
    bias = None if bias is None else bias.to(y.dtype)
    buffers = [stats.get(f"{prefix}.{s}") for s in _STATS]
    if plan.batch_stats and plan.factor == 0:
        buffers = [None, None]
    cast = [None if b is None else b.to(y.dtype) for b in buffers]
    out = F.batch_norm(y, cast[0], cast[1], weight, bias, plan.batch_stats, plan.factor, plan.eps)
    if plan.factor > 0:
        with torch.no_grad():
            for buffer, updated in zip(buffers, cast):
                if buffer is not updated:
                    buffer.copy_(updated)
    return out


def _matrix(weight: Tensor) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as a matrix (out, in)."""
    return weight.reshape(weight.shape[0], weight.shape[1])


def _pooling_gate(gx: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean over W and over H, the shared 1x1 conv ``conv1x1``, split back: logits
    (S, Ci, H) and (S, Ci, W) of the coordinate gates."""
    h, w = gx.shape[2:]
    pooled = torch.cat([gx.mean(3), gx.mean(2)], dim=2)  # (S, Ci, H + W)
    weight = _matrix(params["conv1x1.weight"]).to(gx.dtype)
    pooled = torch.einsum("dc,scl->sdl", weight, pooled)
    if "conv1x1.bias" in params:
        pooled = pooled + params["conv1x1.bias"].to(gx.dtype)[:, None]
    a_h, a_w = pooled.split([h, w], dim=2)
    return a_h, a_w


def _theta_phi(
    xs: Tensor, plan: GSRAPlan, params: Mapping[str, Tensor], stats: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``theta``, ``phi`` = ReLU(BN(1x1 conv(X))), each (S, Ci, P)."""
    out = []
    for name, bn in zip(("theta_spatial", "phi_spatial"), plan.bn[:2]):
        y = torch.einsum("dc,scp->sdp", _matrix(params[f"{name}.0.weight"]).to(xs.dtype), xs)
        out.append(torch.relu(_batch_norm(y, bn, f"{name}.1", params, stats)))
    return out[0], out[1]


def _first_bn_moments(
    theta: Tensor,
    phi: Tensor,
    w_a: Tensor,
    w_b: Tensor,
    projections: dict[str, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of ``y = gg_spatial[0](R)`` per output channel o
    (derivations 3.2), without forming y: ``mu = (Wa u_a + Wb u_b) / S`` and
    ``E[y^2]_o = mean_s C_s[o]^T M_s C_s[o]``."""
    s, ci, p = theta.shape
    z = torch.cat([theta, phi], dim=1)  # (S, 2Ci, P)
    zbar = z.mean(2)  # (S, 2Ci)
    u_a = zbar[:, :ci].reshape(1, -1) @ phi.reshape(s * ci, p)
    u_b = zbar[:, ci:].reshape(1, -1) @ theta.reshape(s * ci, p)
    mean = (u_a @ w_a.T + u_b @ w_b.T).squeeze(0) / s
    # einsum folds (S, Ci) into one GEMM (a broadcast matmul would form the weight's gradient
    # as an (S, P/2, P) tensor); the reduction is a broadcast product, not an einsum, whose bmm
    # backward would copy a stride-0 gradient one sample at a time.
    if projections is not None and "cm" in projections:
        cm = _Projections.apply(w_a, w_b, phi, theta, projections["cm"])
    else:
        c_a = torch.einsum("oi,sci->soc", w_a, phi)  # (S, P/2, Ci)
        c_b = torch.einsum("oi,sci->soc", w_b, theta)
        cm = torch.cat([c_a, c_b], dim=2)  # C_s: (S, P/2, 2Ci)
        if projections is not None:
            projections["cm"] = cm
    second = torch.matmul(z, z.transpose(1, 2)) / p  # M_s: (S, 2Ci, 2Ci)
    sq = (torch.matmul(cm, second) * cm).sum((0, 2)) / s
    return mean, (sq - mean * mean).clamp_min(0)


def _relation_gate(
    theta: Tensor,
    phi: Tensor,
    plan: GSRAPlan,
    params: Mapping[str, Tensor],
    stats: Mapping[str, Tensor],
    projections: dict[str, Tensor] | None,
) -> Tensor:
    """``gg_spatial(cat(R^T, R))`` as (S, P) without R (derivations 3.1-3.4)."""
    s, _, p = theta.shape
    dt = theta.dtype
    w1 = _matrix(params["gg_spatial.0.weight"]).to(dt)  # (P/2, 2P)
    w2 = _matrix(params["gg_spatial.2.weight"]).to(dt)[0]  # (P/2,)
    w_a, w_b = w1[:, :p], w1[:, p:]
    bn1, gamma1, beta1 = (
        plan.bn[2],
        params.get("gg_spatial.1.weight"),
        params.get("gg_spatial.1.bias"),
    )
    gamma1 = torch.ones_like(w2) if gamma1 is None else gamma1.to(dt)
    beta1 = torch.zeros_like(w2) if beta1 is None else beta1.to(dt)
    if bn1.batch_stats:
        mean, var = _first_bn_moments(theta, phi, w_a, w_b, projections)
        if bn1.factor > 0:
            n = s * p
            with torch.no_grad():
                for key, value in (("mean", mean), ("var", var * (n / max(n - 1, 1)))):
                    buffer = stats[f"gg_spatial.1.running_{key}"]
                    buffer.lerp_(value.detach().to(buffer), bn1.factor)
    else:  # eval folding (derivations 3.4): the running statistics, no C_s at all
        mean = stats["gg_spatial.1.running_mean"].to(dt)
        var = stats["gg_spatial.1.running_var"].to(dt)
    inv = torch.rsqrt(var + bn1.eps)
    kappa = w2 * gamma1 * inv
    # derivations 3.3: d_s = sum_o kappa_o C_s[o] = [phi_s (Wa^T kappa); theta_s (Wb^T kappa)]
    d = torch.cat([phi @ (kappa @ w_a), theta @ (kappa @ w_b)], dim=1)  # (S, 2Ci)
    e = (w2 * (beta1 - gamma1 * mean * inv)).sum()
    rel = torch.einsum("sc,scp->sp", d, torch.cat([theta, phi], dim=1)) + e  # (S, P)
    return torch.relu(_batch_norm(rel.unsqueeze(1), plan.bn[3], "gg_spatial.3", params, stats))


def gsra_lowrank(
    x: Tensor,
    params: Mapping[str, Tensor],
    stats: Mapping[str, Tensor],
    plan: GSRAPlan,
    projections: dict[str, Tensor] | None = None,
) -> Tensor:
    """The GSRA forward in low-rank form, with plain differentiable torch ops.

    Under autocast the block is computed in float32 (at least: the BatchNorm moment identities
    cancel in lower precision) and only the final GroupNorm runs under the recorded autocast
    state, on the dtype the reference's ``X * weight`` has, so both paths return one dtype.

    Args:
        x: (B, C, H, W) input.
        params: the module's parameters by state-dict name (or stand-ins for them).
        stats: the BatchNorm buffers ``plan.stat_names(...)`` names, by state-dict name.
        plan: the forward's configuration (:meth:`GSRAPlan.of`); its update factors say whether
            the running statistics are updated (first forward) or not (recomputation).
        projections: a dict to keep the (S, P/2, 2Ci) projections ``C_s`` in (first forward)
            or to take them from (recomputation: only their backward runs again).

    Returns:
        (B, C, H, W), equal to the literal formulation up to rounding.
    """
    device_type, autocast_on, lower = plan.autocast
    pre_dtype = torch.promote_types(x.dtype, lower) if autocast_on else x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    g, h = plan.groups, x.shape[2]
    with _autocast_off(device_type):
        gx = rearrange(x.to(compute), "b (g c) h w -> (b g) c h w", g=g)  # group split
        a_h, a_w = _pooling_gate(gx, params)
        theta, phi = _theta_phi(rearrange(gx, "s c h w -> s c (h w)"), plan, params, stats)
        rel = _relation_gate(theta, phi, plan, params, stats, projections)  # (S, 1, P)
        weight = (
            a_h.sigmoid()[..., None]
            * a_w.sigmoid()[:, :, None, :]
            * rearrange(rel, "s 1 (h w) -> s 1 h w", h=h).sigmoid()
        )
        pre = (gx * weight).to(pre_dtype)
    with _autocast_as(plan.autocast):
        gn_w, gn_b = params.get("gn.weight"), params.get("gn.bias")
        out = F.group_norm(pre, plan.gn_groups, gn_w, gn_b, plan.gn_eps)
    return rearrange(out, "(b g) c h w -> b (c g) h w", g=g)  # channel shuffle


class _Projections(torch.autograd.Function):
    """``C_s = [Wa phi_s^T | Wb theta_s^T]`` given its saved value: the recomputation skips the
    two large GEMMs of the forward and runs only their backward."""

    @staticmethod
    def forward(w_a, w_b, phi, theta, value: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:4])

    @staticmethod
    def backward(ctx, grad: Tensor):
        w_a, w_b, phi, theta = ctx.saved_tensors
        ci = phi.shape[1]
        g_a, g_b = grad[..., :ci], grad[..., ci:]
        need = ctx.needs_input_grad
        with _autocast_off(grad.device.type):
            return (
                torch.einsum("soc,sci->oi", g_a, phi) if need[0] else None,
                torch.einsum("soc,sci->oi", g_b, theta) if need[1] else None,
                torch.einsum("oi,soc->sci", w_a, g_a) if need[2] else None,
                torch.einsum("oi,soc->sci", w_b, g_b) if need[3] else None,
                None,
            )


class _NoDoubleBackward(torch.autograd.Function):
    """``apply(k, *tensors)``: identity on ``tensors[k:]`` (the first-order gradients), connected
    to all of ``tensors`` (the block's inputs too), whose backward raises a clear error (torch's
    ``once_differentiable`` does the same with a generic message, and only when the incoming
    gradient requires grad)."""

    @staticmethod
    def forward(k: int, *tensors: Tensor):
        return tuple(t.view_as(t) for t in tensors[k:])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(_DOUBLE_BACKWARD)


class RecomputedGSRA(torch.autograd.Function):
    """Runs :func:`gsra_lowrank` without autograd and saves only the input, the parameters,
    (training mode) the projections ``C_s``, as large as the input, and (eval mode) the running
    statistics; the backward recomputes the block from its input with the forward's plan
    (running statistics untouched, the projections' GEMMs skipped). Derivations 3.5.

    ``apply(plan, names, num_params, x, *params, *stats)`` returns ``(out, C_s or None)``.
    """

    @staticmethod
    def forward(plan: GSRAPlan, names: tuple[str, ...], num_params: int, x: Tensor, *tensors):
        params = dict(zip(names[:num_params], tensors[:num_params]))
        stats = dict(zip(names[num_params:], tensors[num_params:]))
        projections: dict[str, Tensor] = {}
        out = gsra_lowrank(x, params, stats, plan, projections)
        return out, projections.get("cm")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        plan, names, num_params, x, *tensors = inputs
        _, cm = output
        if cm is not None:
            ctx.mark_non_differentiable(cm)
        ctx.plan, ctx.names, ctx.num_params = plan.recomputation(), names, num_params
        keep = set(plan.stat_names(for_backward=True))
        ctx.stat_names = [n for n in names[num_params:] if n in keep]
        stats = [t for n, t in zip(names[num_params:], tensors[num_params:]) if n in keep]
        ctx.save_for_backward(x, *tensors[:num_params], *stats, cm)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_cm):
        x, *rest = ctx.saved_tensors
        k = ctx.num_params
        params, stats, cm = rest[:k], rest[k:-1], rest[-1]
        inputs = [x, *params]
        needs = ctx.needs_input_grad[3 : 4 + k]
        wanted = [i for i, n in enumerate(needs) if n]

        def block(*leaves: Tensor) -> Tensor:
            args = list(inputs)
            for i, leaf in zip(wanted, leaves):
                args[i] = leaf
            return gsra_lowrank(
                args[0],
                dict(zip(ctx.names[:k], args[1:])),
                dict(zip(ctx.stat_names, stats)),
                ctx.plan,
                None if cm is None else {"cm": cm},
            )

        try:
            leaves = [inputs[i].detach().requires_grad_() for i in wanted]
        except RuntimeError:  # inside a torch.func transform: autograd.grad is not allowed there
            with torch.no_grad():
                _, vjp = torch.func.vjp(block, *[inputs[i].detach() for i in wanted])
                grads = list(vjp(grad))
        else:  # torch.func.vjp would work here too, but costs more per operation
            with torch.enable_grad():
                out = block(*leaves)
            grads = list(torch.autograd.grad(out, leaves, grad, allow_unused=True))
        if torch.is_grad_enabled():  # create_graph=True: make a second backward fail clearly
            grads = list(_NoDoubleBackward.apply(len(inputs) + 1, *inputs, grad, *grads))
        out: list[Tensor | None] = [None] * len(needs)
        for i, g in zip(wanted, grads):
            out[i] = g
        return (None, None, None, *out, *[None] * (len(ctx.needs_input_grad) - 4 - k))
