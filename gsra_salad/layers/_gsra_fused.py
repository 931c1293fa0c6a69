"""Low-rank evaluation of the GSRA block (DESIGN 3.4). Private; see ``layers/gsra.py``.

Per group sample ``s`` (batch x groups), ``theta_s`` and ``phi_s`` are (Ci, P) with P = H W.
The published block builds the relation ``R_s = theta_s^T phi_s`` (P x P), stacks ``R_s^T`` and
``R_s`` as 2P channels and runs ``gg_spatial``: conv (2P -> P/2) -> BN -> conv (P/2 -> 1) -> BN ->
ReLU. The first conv is linear in ``R_s``, whose rank is Ci, so with ``W1 = [Wa | Wb]``

    y_s[o, j] = sum_c A_s[o, c] theta_s[c, j] + B_s[o, c] phi_s[c, j] = (C_s z_j)[o],
    A_s = Wa phi_s^T,  B_s = Wb theta_s^T,  C_s = [A_s | B_s] (P/2 x 2Ci),  z_j = [theta_j; phi_j].

BatchNorm's batch mean and (biased) variance of ``y`` follow from the per-sample moments of z,
``zbar_s = mean_j z_j`` and ``S_s = mean_j z_j z_j^T``:

    mu_o = mean_s C_s[o] . zbar_s,     E[y^2]_o = mean_s C_s[o]^T S_s C_s[o],

and the 1-channel conv of the normalised ``y`` is ``g_s[j] = d_s . z_j + e`` with
``d_s = sum_o kappa_o C_s[o] = [phi_s (Wa^T kappa); theta_s (Wb^T kappa)]``,
``kappa = w2 gamma1 / sigma`` and ``e = sum_o w2_o (beta1_o - gamma1_o mu_o / sigma_o)``; the
mean likewise folds to ``(Wa u_a + Wb u_b) / S`` with two P-vectors, so only ``E[y^2]`` needs
``C_s`` (training mode), and eval mode needs no ``C_s`` at all. No P x P or P/2 x P tensor is
ever formed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops._dispatch import autocast_state

__all__: list[str] = []


@dataclass
class _BN:
    """What one BatchNorm contributes to a functional forward."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float
    batch_stats: bool  # normalise with the batch statistics (training or no running stats)
    factor: float  # running-statistics update factor (0: no update)

    @staticmethod
    def of(bn: nn.BatchNorm2d, params: Mapping[str, Tensor], prefix: str, update: bool) -> _BN:
        """Mirror ``nn.BatchNorm2d.forward``: the caller has already incremented
        ``num_batches_tracked`` when ``update`` is true."""
        batch_stats = bn.training or bn.running_mean is None
        factor = 0.0
        if update and bn.training and bn.track_running_stats:
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
            else:
                factor = bn.momentum
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        return _BN(weight, bias, bn.running_mean, bn.running_var, bn.eps, batch_stats, factor)

    def __call__(self, x: Tensor) -> Tensor:
        """Functional BatchNorm over dim 1 of ``x``; updates running stats when ``factor > 0``."""
        update = self.factor > 0
        return F.batch_norm(
            x,
            self.running_mean if (update or not self.batch_stats) else None,
            self.running_var if (update or not self.batch_stats) else None,
            self.weight,
            self.bias,
            self.batch_stats,
            self.factor,
            self.eps,
        )


def _matrix(weight: Tensor) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as a matrix (out, in)."""
    return weight.reshape(weight.shape[0], weight.shape[1])


def gsra_lowrank(
    x: Tensor,
    module,
    params: Mapping[str, Tensor],
    update: bool,
    projections: dict[str, Tensor] | None = None,
) -> Tensor:
    """The GSRA forward in low-rank form, with plain differentiable torch ops.

    Args:
        x: (B, C, H, W) input.
        module: the ``GlobalSpatialRelationAttention`` whose configuration and BatchNorm buffers
            are used.
        params: its parameters by state-dict name (``dict(module.named_parameters())``, or
            stand-ins for them).
        update: update BatchNorm running statistics (first forward) or not (recomputation).
        projections: a dict to keep the (S, P/2, 2Ci) projections ``C_s`` in (first forward)
            or to take them from (recomputation: only their backward runs again).

    Returns:
        (B, C, H, W), equal to the literal formulation up to rounding.
    """
    b, c, h, w = x.shape
    g = module.groups
    ci = c // g
    s = b * g
    p = h * w
    gx = x.reshape(s, ci, h, w)

    # pooling branch: mean over W and over H, a shared 1x1 conv, split back
    pooled = torch.cat([gx.mean(3), gx.mean(2)], dim=2)  # (S, Ci, H + W)
    pooled = torch.einsum("dc,scl->sdl", _matrix(params["conv1x1.weight"]), pooled)
    if "conv1x1.bias" in params:
        pooled = pooled + params["conv1x1.bias"][:, None]
    a_h, a_w = pooled.split([h, w], dim=2)

    # theta / phi: 1x1 conv -> BN -> ReLU, as (S, Ci, P)
    xs = gx.reshape(s, ci, p)
    tp = []
    for name in ("theta_spatial", "phi_spatial"):
        y = torch.einsum("dc,scp->sdp", _matrix(params[f"{name}.0.weight"]), xs)
        bn = _BN.of(getattr(module, name)[1], params, f"{name}.1.", update)
        tp.append(torch.relu(bn(y)))
    theta, phi = tp
    z = torch.cat([theta, phi], dim=1)  # (S, 2Ci, P)

    gg = module.gg_spatial
    w1 = _matrix(params["gg_spatial.0.weight"])  # (P/2, 2P)
    w2 = _matrix(params["gg_spatial.2.weight"])[0]  # (P/2,)
    bn1 = _BN.of(gg[1], params, "gg_spatial.1.", update)
    bn2 = _BN.of(gg[3], params, "gg_spatial.3.", update)
    w_a, w_b = w1[:, :p], w1[:, p:]
    gamma1 = bn1.weight if bn1.weight is not None else torch.ones_like(w2)
    beta1 = bn1.bias if bn1.bias is not None else torch.zeros_like(w2)

    if bn1.batch_stats:
        # mean_o = mean_s C_s[o] . zbar_s = (Wa u_a + Wb u_b)_o / S, with
        # u_a = sum_s phi_s^T thetabar_s and u_b = sum_s theta_s^T phibar_s (P-vectors)
        zbar = z.mean(2)  # (S, 2Ci)
        u_a = zbar[:, :ci].reshape(1, -1) @ phi.reshape(s * ci, p)
        u_b = zbar[:, ci:].reshape(1, -1) @ theta.reshape(s * ci, p)
        mean = (u_a @ w_a.T + u_b @ w_b.T).squeeze(0) / s
        # E[y^2] needs C_s = [Wa phi_s^T | Wb theta_s^T]: (S, P/2, 2Ci), never (P/2, P).
        # einsum folds (S, Ci) into one GEMM (a broadcast matmul would form the weight's
        # gradient as an (S, P/2, P) tensor); the reduction is a broadcast product, not an
        # einsum, whose bmm backward would copy a stride-0 gradient one sample at a time.
        if projections is not None and "cm" in projections:
            cm = _Projections.apply(w_a, w_b, phi, theta, projections["cm"])
        else:
            c_a = torch.einsum("oi,sci->soc", w_a, phi)  # (S, P/2, Ci)
            c_b = torch.einsum("oi,sci->soc", w_b, theta)
            cm = torch.cat([c_a, c_b], dim=2)
            if projections is not None:
                projections["cm"] = cm
        second = torch.matmul(z, z.transpose(1, 2)) / p  # (S, 2Ci, 2Ci)
        sq = (torch.matmul(cm, second) * cm).sum((0, 2)) / s
        var = (sq - mean * mean).clamp_min(0)
        if bn1.factor > 0:
            n = s * p
            with torch.no_grad():
                bn1.running_mean.lerp_(mean.detach().to(bn1.running_mean), bn1.factor)
                unbiased = var.detach() * (n / max(n - 1, 1))
                bn1.running_var.lerp_(unbiased.to(bn1.running_var), bn1.factor)
    else:
        mean = bn1.running_mean
        var = bn1.running_var
    inv = torch.rsqrt(var + bn1.eps)
    kappa = w2 * gamma1 * inv
    # d_s = sum_o kappa_o C_s[o] = [phi_s (Wa^T kappa); theta_s (Wb^T kappa)]
    d = torch.cat([phi @ (kappa @ w_a), theta @ (kappa @ w_b)], dim=1)  # (S, 2Ci)
    e = (w2 * (beta1 - gamma1 * mean * inv)).sum()
    rel = torch.einsum("sc,scp->sp", d, z) + e  # (S, P): gg_spatial's 1-channel conv output
    rel = torch.relu(bn2(rel.unsqueeze(1)))  # (S, 1, P)

    weight = (
        a_h.sigmoid()[..., None] * a_w.sigmoid()[:, :, None, :] * rel.view(s, 1, h, w).sigmoid()
    )
    gn = module.gn
    gn_w, gn_b = params.get("gn.weight"), params.get("gn.bias")
    out = F.group_norm(gx * weight, gn.num_groups, gn_w, gn_b, gn.eps)
    # channel shuffle: (B, g, Ci, H, W) -> (B, Ci, g, H, W)
    return out.view(b, g, ci, h, w).transpose(1, 2).reshape(b, c, h, w)


class _Projections(torch.autograd.Function):
    """``C_s = [Wa phi_s^T | Wb theta_s^T]`` given its saved value: the recomputation skips the
    two large GEMMs of the forward and runs only their backward."""

    @staticmethod
    def forward(ctx, w_a, w_b, phi, theta, value: Tensor) -> Tensor:
        ctx.save_for_backward(w_a, w_b, phi, theta)
        return value.view_as(value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        w_a, w_b, phi, theta = ctx.saved_tensors
        ci = phi.shape[1]
        g_a, g_b = grad[..., :ci], grad[..., ci:]
        return (
            torch.einsum("soc,sci->oi", g_a, phi) if ctx.needs_input_grad[0] else None,
            torch.einsum("soc,sci->oi", g_b, theta) if ctx.needs_input_grad[1] else None,
            torch.einsum("oi,soc->sci", w_a, g_a) if ctx.needs_input_grad[2] else None,
            torch.einsum("oi,soc->sci", w_b, g_b) if ctx.needs_input_grad[3] else None,
            None,
        )


class _RecomputedGSRA(torch.autograd.Function):
    """Runs :func:`gsra_lowrank` without autograd and saves only the input, the parameters and
    (training mode) the projections ``C_s``, as large as the input; the backward recomputes the
    block from its input (running statistics untouched, the projections' GEMMs skipped)."""

    @staticmethod
    def forward(ctx, module, names: tuple[str, ...], x: Tensor, *params: Tensor) -> Tensor:
        ctx.module, ctx.names = module, names
        ctx.autocast = autocast_state(x.device)
        projections: dict[str, Tensor] = {}
        out = gsra_lowrank(x, module, dict(zip(names, params)), True, projections)
        ctx.num_params = len(params)
        ctx.save_for_backward(x, *params, *projections.values())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        needs = ctx.needs_input_grad[2:]
        saved = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in zip(saved, needs)]
        projections = {"cm": saved[-1]} if len(saved) > 1 + ctx.num_params else None
        device_type, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            params = dict(zip(ctx.names, leaves[1:]))
            out = gsra_lowrank(leaves[0], ctx.module, params, False, projections)
        wanted = [t for t, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needs])
