"""Global Spatial Relation Attention (GSRA), the attention block of LRFR (Gan et al., 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._dispatch import Impl, check_impl, has_forward_grad, is_tracing
from ._gsra_fused import _RecomputedGSRA, gsra_lowrank

__all__ = ["GlobalSpatialRelationAttention"]


def _pair(spatial_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(spatial_size, int) and not isinstance(spatial_size, bool):
        return spatial_size, spatial_size
    if (
        isinstance(spatial_size, (tuple, list))
        and len(spatial_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in spatial_size)
    ):
        return int(spatial_size[0]), int(spatial_size[1])
    raise TypeError(f"spatial_size must be an int or a pair (H, W) of ints, got {spatial_size!r}")


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
    module, so its state dicts load with ``strict=True``.

    ``impl="reference"`` runs the literal formulation (materialises the HW x HW relation).
    ``impl="fused"`` uses the relation's rank (Ci) and BatchNorm moment identities to compute the
    same function without any HW x HW or HW/2 x HW tensor, in training (batch statistics; running
    statistics updated exactly as ``nn.BatchNorm2d`` does, ``momentum=None`` included) and in eval
    (folded to a few vectors). With gradients enabled it saves for backward only its input, its
    parameters and (training) one input-sized tensor of projections, and recomputes the rest of
    the block in the backward pass (77x fewer saved bytes than the reference at B=32, 24x24);
    its backward is not differentiable
    again (double backward needs ``impl="reference"``). Without gradients, and while tracing or
    exporting, it is plain torch operations (exportable). ``impl="auto"`` is ``"fused"`` except
    under forward-mode AD.

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
        check_impl(type(self).__name__, impl)
        self.channels = channels
        self.spatial_size = (h, w)
        self.groups = groups
        self.inter_channel = ci = channels // groups
        self.spatial = hw = h * w
        self.impl = impl
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

    def _resolved_impl(self, x: Tensor) -> str:
        if self.impl == "fused" and has_forward_grad(x):
            raise RuntimeError(
                "GlobalSpatialRelationAttention: impl='fused' does not support forward-mode AD "
                "(dual tensors); use impl='reference' or impl='auto'"
            )
        if self.impl != "auto":
            return self.impl
        return "reference" if has_forward_grad(x) else "fused"

    def _count_batches(self) -> None:
        if not self.training:
            return
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
            return self._forward_reference(x)
        self._count_batches()
        params = dict(self.named_parameters())
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params.values())
        )
        if needs_grad and not is_tracing():
            return _RecomputedGSRA.apply(self, tuple(params), x, *params.values())
        # inference, tracing and export: the low-rank form in plain torch operations
        return gsra_lowrank(x, self, params, update=True)

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
