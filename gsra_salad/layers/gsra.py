"""Global Spatial Relation Attention (GSRA), the attention block of LRFR (Gan et al., 2025)."""

from __future__ import annotations

import operator
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ops._dispatch import (
    Impl,
    autocast_state,
    check_impl,
    checks_enabled,
    has_forward_grad,
    is_tracing,
)
from ._gsra_fused import GSRAPlan, RecomputedGSRA, gsra_lowrank

__all__ = ["GlobalSpatialRelationAttention"]

# The submodule layout the fused path implements: exact types (SyncBatchNorm also where it
# acts as BatchNorm), 1x1 convolutions, no hooks, no parametrizations.
_LAYOUT: dict[str, tuple[type[nn.Module], ...]] = {
    "conv1x1": (nn.Conv2d,),
    "gn": (nn.GroupNorm,),
    "theta_spatial": (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    "phi_spatial": (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    "gg_spatial": (nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
}


def _as_int(name: str, value: object) -> int:
    """``value`` as a Python int (NumPy integers included); bools and floats are rejected."""
    if isinstance(value, bool):
        raise TypeError(f"GlobalSpatialRelationAttention: {name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"GlobalSpatialRelationAttention: {name} must be an int, got {value!r} "
            f"({type(value).__name__})"
        ) from None


def _pair(spatial_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(spatial_size, (tuple, list)) and len(spatial_size) == 2:
        return _as_int("spatial_size[0]", spatial_size[0]), _as_int(
            "spatial_size[1]", spatial_size[1]
        )
    try:
        side = _as_int("spatial_size", spatial_size)
    except TypeError:
        raise TypeError(
            f"spatial_size must be an int or a pair (H, W) of ints, got {spatial_size!r}"
        ) from None
    return side, side


def _all_finite(x: Tensor) -> bool:
    """No NaN or inf in ``x``: one summing pass (NaN and inf propagate to the sum), and the exact
    elementwise test only if the sum itself is not finite."""
    x = x.detach()
    total = x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _is_type(m: nn.Module, want: type[nn.Module]) -> bool:
    """``type(m) is want``; while tracing, any subclass (torch.export's non-strict tracing swaps
    module classes for same-named subclasses)."""
    return type(m) is want or (is_tracing() and isinstance(m, want))


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _sync_needed(bn: nn.Module) -> bool:
    """Whether a SyncBatchNorm synchronises in this forward (torch's own condition: training in
    an initialised process group; it then also requires a GPU input)."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _unsupported(name: str, m: nn.Module, want: type[nn.Module]) -> str | None:
    """Why submodule ``m`` (expected of type ``want``) keeps the fused path from running."""
    if _hooked(m):
        return (
            f"{name} has forward, forward-pre or backward hooks (pruning and the old-style "
            "weight_norm / spectral_norm add forward-pre hooks)"
        )
    if parametrize.is_parametrized(m):
        return f"{name} has parametrizations (e.g. torch.nn.utils.parametrizations.weight_norm)"
    if not _is_type(m, want) and not (want is nn.BatchNorm2d and _is_type(m, nn.SyncBatchNorm)):
        return f"{name} is a {type(m).__name__}, not the standard nn.{want.__name__}"
    if want is nn.Conv2d and not (
        m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
    ):
        return f"{name} is not a plain 1x1 convolution (kernel, stride, padding, dilation, groups)"
    if _sync_needed(m):
        return (
            f"{name} is a SyncBatchNorm training in an initialised process group (the fused path "
            "does not reduce its statistics across processes)"
        )
    return None


class GlobalSpatialRelationAttention(nn.Module):
    """GSRA: grouped coordinate gates times a gate learned from global spatial relations.

    The C channels are split into ``groups`` groups of ``Ci = C / groups`` channels, each group
    treated as its own sample. Per group map ``X`` (Ci, H, W):

    - pooling gates: ``x_h``, ``x_w`` = mean over W, mean over H; one shared 1x1 conv
      (``conv1x1``) on their concatenation, split back;
    - relation gate: ``theta``, ``phi`` = ReLU(BN(1x1 conv(X))); the relation
      ``R = theta^T phi`` (HW x HW) is read as 2HW channels on the H x W grid (``R^T`` then
      ``R``) and reduced by ``gg_spatial`` = conv (2HW -> HW/2), BN, conv (HW/2 -> 1), BN, ReLU;
    - ``out = GroupNorm(X * sigmoid(x_h) * sigmoid(x_w) * sigmoid(gg))``, then a channel shuffle
      ``(B, g, Ci, H, W) -> (B, Ci, g, H, W)``.

    Parameter and buffer names and shapes are exactly those of the published LRFR ``GSRA``
    module, so its state dicts load with ``strict=True``. In training mode the bias of
    ``gg_spatial``'s first BatchNorm (``gg_spatial.1.bias``) is a constant shift that the next
    1x1 conv carries into ``BatchNorm2d(1)``, whose batch mean removes it: its gradient is zero
    up to rounding (in eval mode it acts through the running statistics).

    ``impl="reference"`` runs the literal formulation (materialises the HW x HW relation).
    ``impl="fused"`` uses the relation's rank (Ci) and BatchNorm moment identities
    (docs/derivations.md, section 3) to compute the same function without any HW x HW or
    HW/2 x HW tensor, in training (batch statistics; running statistics updated exactly as
    ``nn.BatchNorm2d`` does, ``momentum=None`` included) and in eval (folded to a few vectors).
    With gradients enabled it saves for backward only its input, its parameters, (training) one
    input-sized tensor of projections and (eval) the running statistics, and recomputes the rest
    of the block in the backward pass (77x fewer saved bytes than the reference at B=32, 24x24)
    with the configuration recorded at forward time (a backward after ``eval()`` differentiates
    the training-mode forward that ran). Its backward is not differentiable again (double
    backward raises and asks for ``impl="reference"``). Without gradients, while tracing or
    exporting and under ``torch.compile``, it is plain torch operations (exportable,
    compilable; compiled training then saves what autograd saves for those operations).

    The fused path implements the standard submodules only: when a submodule was replaced (other
    type), hooked (forward, forward-pre or backward hooks, pruning), parametrized (weight_norm) or
    is a ``SyncBatchNorm`` that synchronises (training in a process group of more than one
    process), the block runs the reference path, which calls the submodules, and warns once per
    instance saying why.

    Under ``torch.autocast`` the fused path computes in float32 (the moment identities cancel in
    lower precision) and returns the dtype the reference returns. Outside autocast the input
    must have the parameters' floating dtype, as for ``nn.Conv2d``. Inputs with NaN or inf, or
    so large that the output overflows, raise a ``ValueError`` (checks skipped while tracing or
    compiling).

        Args:
        channels: C, divisible by ``groups``.
        spatial_size: (H, W) of the feature maps the block will see (or one int for H = W); the
            relation conv has 2HW input channels, so the block only accepts that size. H W must
            be even.
        groups: number of channel groups g.
        impl: ``"auto"``, ``"fused"`` or ``"reference"``.

    Shape:
        - Input: (B, C, H, W)
        - Output: (B, C, H, W)

    Example:
        >>> gsra = GlobalSpatialRelationAttention(64, (6, 8), groups=8)
        >>> gsra(torch.randn(2, 64, 6, 8)).shape
        torch.Size([2, 64, 6, 8])
    """

    def __init__(
        self,
        channels: int,
        spatial_size: int | tuple[int, int],
        groups: int = 32,
        *,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        h, w = _pair(spatial_size)
        channels, groups = _as_int("channels", channels), _as_int("groups", groups)
        if groups < 1 or channels < 1 or channels % groups:
            raise ValueError(
                f"GlobalSpatialRelationAttention: channels={channels} must be a positive multiple "
                f"of groups={groups} (each group gets channels / groups channels); choose groups "
                f"among the divisors of {channels}"
            )
        if h < 1 or w < 1 or (h * w) % 2:
            raise ValueError(
                f"GlobalSpatialRelationAttention: spatial_size (H, W) = {(h, w)} gives H*W = "
                f"{h * w}, but gg_spatial reduces H*W relation channels to H*W/2, so H*W must be "
                "a positive even number; change the input size so the feature map has an even "
                "number of positions"
            )
        self.impl = impl
        self.channels = channels
        self.spatial_size = (h, w)
        self.groups = groups
        self.inter_channel = ci = channels // groups
        self.spatial = hw = h * w
        self._fallback_warned = False
        self.conv1x1 = nn.Conv2d(ci, ci, kernel_size=1)
        self.gn = nn.GroupNorm(ci, ci)
        self.theta_spatial = nn.Sequential(
            nn.Conv2d(ci, ci, kernel_size=1, bias=False), nn.BatchNorm2d(ci), nn.ReLU()
        )
        self.phi_spatial = nn.Sequential(
            nn.Conv2d(ci, ci, kernel_size=1, bias=False), nn.BatchNorm2d(ci), nn.ReLU()
        )
        self.gg_spatial = nn.Sequential(
            nn.Conv2d(2 * hw, hw // 2, kernel_size=1, bias=False),
            nn.BatchNorm2d(hw // 2),
            nn.Conv2d(hw // 2, 1, kernel_size=1, bias=False),
            nn.BatchNorm2d(1),
            nn.ReLU(),
        )

    @property
    def impl(self) -> Impl:
        """``"auto"``, ``"fused"`` or ``"reference"``; validated on assignment."""
        try:
            return self._impl
        except AttributeError:  # a module pickled before impl became a property
            return self.__dict__.get("impl", "auto")

    @impl.setter
    def impl(self, value: Impl) -> None:
        check_impl(type(self).__name__, value)
        self._impl = value

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, spatial_size={self.spatial_size}, groups={self.groups}, "
            f"impl={self.impl!r}"
        )

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected input of shape (B, C, H, W), got {shape}")
        _, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(
                f"{name}: built for {self.channels} channels, got input with {c} channels"
            )
        if (h, w) != self.spatial_size:
            raise ValueError(
                f"{name}: built for feature maps of size (H, W) = {self.spatial_size}, got "
                f"{(h, w)}. The relation conv has 2*H*W input channels, so the block only accepts "
                f"the size it was built for: build one for this input with "
                f"{name}({c}, spatial_size=({h}, {w}), groups={self.groups}), or resize the "
                f"input image so the feature map is {self.spatial_size}"
            )
        self._check_dtype(x)
        if checks_enabled() and not _all_finite(x):
            kind = "NaN" if bool(torch.isnan(x.detach()).any()) else "inf"
            raise ValueError(
                f"{name}: the input contains {kind}; the block needs finite values. Check the "
                "layer that produced it, e.g. for overflow under float16 autocast"
            )

    def _check_dtype(self, x: Tensor) -> None:
        name = type(self).__name__
        dtype = self.conv1x1.weight.dtype
        if not x.is_floating_point():
            raise TypeError(
                f"{name}: expected a floating-point input like the module's parameters "
                f"({dtype}), got {x.dtype}; convert it, e.g. x.to({dtype})"
            )
        if x.dtype == dtype:
            return
        autocast = autocast_state(x.device)[1]
        if not (autocast and torch.float64 not in (x.dtype, dtype)):
            raise TypeError(
                f"{name}: input dtype {x.dtype} and parameter dtype {dtype} differ (as for "
                f"nn.Conv2d, they must be the same outside torch.autocast); convert the input "
                f"(x.to({dtype})) or the module (module.to({x.dtype})), or run under torch.autocast"
            )

    def _check_output(self, x: Tensor, out: Tensor) -> None:
        if checks_enabled() and not _all_finite(out):
            largest = x.detach().abs().max().item()
            raise ValueError(
                f"{type(self).__name__}: the output is not finite although the input is: the "
                f"input is too large for {out.dtype} (max |x| = {largest:.3g}; "
                "the relation multiplies two projections of it). Normalise the input, or compute "
                "in a wider dtype; this batch may already have updated the running statistics"
            )

    def _resolved_impl(self, x: Tensor) -> str:
        forward_ad = not torch.compiler.is_compiling() and has_forward_grad(x)
        if self.impl == "fused" and forward_ad:
            raise RuntimeError(
                "GlobalSpatialRelationAttention: impl='fused' does not support forward-mode AD "
                "(dual tensors); use impl='reference' or impl='auto'"
            )
        if self.impl == "reference" or forward_ad:
            return "reference"
        reason = self._fused_unsupported()
        if reason is None:
            return "fused"
        if not getattr(self, "_fallback_warned", False):
            self._fallback_warned = True
            warnings.warn(
                f"{type(self).__name__}: running the reference path (slower, more memory) "
                f"instead of impl={self.impl!r}: {reason}. The fused path implements only the "
                "standard submodules; this warning is shown once per module",
                stacklevel=3,
            )
        return "reference"

    def _fused_unsupported(self) -> str | None:
        """Why the fused path cannot stand for this module's submodules (None: it can)."""
        module = nn.modules.module
        if module._global_forward_hooks or module._global_forward_pre_hooks:
            return "global module forward hooks are registered"
        if module._global_backward_hooks or module._global_backward_pre_hooks:
            return "global module backward hooks are registered"
        for name, layout in _LAYOUT.items():
            m = self._modules.get(name)
            if len(layout) == 1:
                reason = _unsupported(name, m, layout[0]) if m is not None else f"{name} is missing"
            elif not _is_type(m, nn.Sequential) or len(m) != len(layout):
                reason = f"{name} is not the standard nn.Sequential of {len(layout)} modules"
            else:
                reason = _hooked(m) and f"{name} has forward, forward-pre or backward hooks"
                for i, (sub, want) in enumerate(zip(m, layout)):
                    reason = reason or _unsupported(f"{name}[{i}]", sub, want)
            if reason:
                return reason
        return None

    def _count_batches(self) -> None:
        for bn in (
            self.theta_spatial[1],
            self.phi_spatial[1],
            self.gg_spatial[1],
            self.gg_spatial[3],
        ):
            if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self._resolved_impl(x) == "reference":
            out = self._forward_reference(x)
        else:
            out = self._forward_fused(x)
        self._check_output(x, out)
        return out

    def _forward_fused(self, x: Tensor) -> Tensor:
        self._count_batches()
        plan = GSRAPlan.of(self, x)
        params = dict(self.named_parameters())
        stats = {n: self.get_buffer(n) for n in plan.stat_names(for_backward=False)}
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params.values())
        )
        if needs_grad and not (is_tracing() or torch.compiler.is_compiling()):
            names = (*params, *stats)
            tensors = (*params.values(), *stats.values())
            out, _ = RecomputedGSRA.apply(plan, names, len(params), x, *tensors)
            return out
        # inference, tracing, export and torch.compile: the low-rank form in plain operations
        return gsra_lowrank(x, params, stats, plan)

    def _forward_reference(self, x: Tensor) -> Tensor:
        """The literal published formulation."""
        b, c, h, w = x.shape
        s, ci, p = b * self.groups, self.inter_channel, h * w
        gx = x.reshape(s, ci, h, w)
        x_h = gx.mean(3, keepdim=True)
        x_w = gx.mean(2, keepdim=True).permute(0, 1, 3, 2)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        theta = self.theta_spatial(gx).view(s, ci, p).permute(0, 2, 1)
        phi = self.phi_spatial(gx).view(s, ci, p)
        rel = torch.matmul(theta, phi)  # (S, P, P)
        rel_in = rel.permute(0, 2, 1).reshape(s, p, h, w)
        rel_out = rel.view(s, p, h, w)
        g = self.gg_spatial(torch.cat([rel_in, rel_out], dim=1))
        weight = x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid() * g.sigmoid()
        out = self.gn(gx * weight)
        return out.view(b, self.groups, ci, h, w).transpose(1, 2).reshape(b, c, h, w)

    def get_config(self) -> dict[str, object]:
        """Constructor arguments as JSON values: ``type(m)(**m.get_config())`` rebuilds it."""
        return {
            "channels": self.channels,
            "spatial_size": list(self.spatial_size),
            "groups": self.groups,
            "impl": self.impl,
        }
