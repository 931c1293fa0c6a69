"""Backbones: a torchvision ConvNeXt trunk, any timm model, and small trunks for tests and demos.

Any ``nn.Module`` that maps images (B, 3, H, W) to features (B, C, h, w) can serve as a backbone
of :class:`~gsra_salad.CrossViewGeoLocalizer`. The adapters here also carry ``out_channels``,
``stride`` (so a head can be sized for an image size) and ``get_config()`` (their constructor
arguments, so ``save_pretrained`` can rebuild them; see
:func:`~gsra_salad.models.register_component` for your own backbone). torchvision and timm are
optional: they are imported only when such a backbone is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._optional import require
from ..ops._dispatch import is_tracing
from ._registry import register_component

__all__ = ["ConvNeXtTrunk", "SmallConvNeXt", "TimmBackbone", "TinyCNN", "feature_size"]

_CONVNEXT_CHANNELS = {"tiny": 384, "small": 384, "base": 512, "large": 768}


def feature_size(image_size: int | tuple[int, int], stride: int) -> tuple[int, int]:
    """(h, w) of the feature map a stride-``stride`` backbone gives for ``image_size``.

    Example:
        >>> feature_size(384, 16), feature_size((128, 512), 16)
        ((24, 24), (8, 32))
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return h // stride, w // stride


@register_component
class ConvNeXtTrunk(nn.Module):
    """torchvision's ConvNeXt truncated after its third stage (stride 16), as in LRFR.

    ``features`` holds torchvision's ``convnext_<variant>().features[:-2]`` (stem, stage 1,
    downsample, stage 2, downsample, stage 3), so its state dict keys are torchvision's.

    Args:
        variant: ``"tiny"``, ``"small"``, ``"base"`` or ``"large"``.
        weights: ``None`` (random), ``True`` (torchvision's ImageNet-1k weights, from its cache or
            the network), or the path of a saved state dict (of the whole torchvision model or of
            this trunk).
        stochastic_depth_prob: torchvision's stochastic depth rate.
        grad_checkpointing: recompute each stage's activations in the backward pass instead of
            keeping them (much less training memory for about one more trunk forward); also
            set by :meth:`set_grad_checkpointing`.

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, C, H // 16, W // 16) with C = 384 (tiny, small), 512 (base), 768 (large)
    """

    stride = 16

    def __init__(
        self,
        variant: str = "tiny",
        weights: bool | str | os.PathLike | None = None,
        *,
        stochastic_depth_prob: float = 0.1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if variant not in _CONVNEXT_CHANNELS:
            raise ValueError(
                f"variant must be one of {sorted(_CONVNEXT_CHANNELS)}, got {variant!r}"
            )
        tv = require("torchvision.models", "torchvision")
        build = getattr(tv, f"convnext_{variant}")
        model = build(weights=None, stochastic_depth_prob=stochastic_depth_prob)
        if weights is True:
            model.load_state_dict(_torchvision_imagenet_state(tv, variant))
        elif weights not in (None, False):
            _load_local_weights(model, weights)
        self.features = nn.Sequential(*list(model.features.children())[:-2])
        self.variant = variant
        self.grad_checkpointing = grad_checkpointing
        self.stochastic_depth_prob = stochastic_depth_prob
        self.out_channels = _CONVNEXT_CHANNELS[variant]

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (``weights`` left out: the rebuilt trunk starts random)."""
        return {
            "variant": self.variant,
            "stochastic_depth_prob": self.stochastic_depth_prob,
            "grad_checkpointing": self.grad_checkpointing,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass (timm's method name)."""
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not is_tracing():
            for stage in self.features:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.features(x)


def _torchvision_imagenet_state(tv, variant: str) -> dict[str, Tensor]:
    enum = getattr(tv, f"ConvNeXt_{variant.capitalize()}_Weights").IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False)
    except Exception as err:  # no network, proxy, partial cache: say what to do
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        raise RuntimeError(
            f"could not load torchvision's ImageNet weights for convnext_{variant} "
            f"({type(err).__name__}: {err}). They are looked up in the cache at {hub} and "
            f"otherwise downloaded from {enum.url}. Without network access, copy that file "
            "into the cache, or pass its path: "
            f"pretrained_backbone='/path/to/{Path(enum.url).name}'"
        ) from err


def _load_local_weights(model: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return
    # a trunk-only state dict (features.0 .. features.5), with or without the "features." prefix
    trunk = {k if k.startswith("features.") else f"features.{k}": v for k, v in state.items()}
    missing = [k for k in own if k.startswith(tuple(f"features.{i}." for i in range(6)))]
    if set(trunk) == set(missing):
        model.load_state_dict(trunk, strict=False)
        return
    raise ValueError(
        f"{path} does not match torchvision's ConvNeXt: expected the keys of the whole model "
        f"or of its first six feature blocks; unexpected keys include "
        f"{sorted(set(state) - set(own))[:5]}"
    )


@register_component
class TimmBackbone(nn.Module):
    """Any timm model as a backbone: ``features_only=True``, one chosen stage.

    Args:
        name: timm model name, e.g. ``"convnext_tiny"``.
        out_index: which feature stage to return (timm's ``out_indices`` entry; -1 = last).
        pretrained: load timm's pretrained weights (needs them cached or the network).
        **kwargs: passed to ``timm.create_model``.

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, out_channels, H // stride, W // stride)
    """

    def __init__(self, name: str, out_index: int = -1, pretrained: bool = False, **kwargs) -> None:
        super().__init__()
        timm = require("timm", "timm")
        probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
        n_stages = len(probe.feature_info)
        index = out_index % n_stages
        del probe
        self.model = timm.create_model(
            name, features_only=True, out_indices=(index,), pretrained=pretrained, **kwargs
        )
        info = self.model.feature_info
        self.out_channels = int(info.channels()[-1])
        self.stride = int(info.reduction()[-1])
        self.name, self.out_index, self.kwargs = name, out_index, dict(kwargs)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (``pretrained`` left out: the rebuilt model starts random)."""
        return {"name": self.name, "out_index": self.out_index, **self.kwargs}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Forwards to timm's ``set_grad_checkpointing`` (models that support it)."""
        if not hasattr(self.model, "set_grad_checkpointing"):
            raise NotImplementedError(f"timm's {self.name} has no gradient checkpointing")
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[-1]


@register_component
class TinyCNN(nn.Module):
    """A small stride-16 CNN (four conv-BN-ReLU stages) for tests and CPU demos.

    Args:
        out_channels: channels of the output features.
        width: channels of the first stage (doubled at each stage up to ``out_channels``).

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, out_channels, H // 16, W // 16)

    Example:
        >>> TinyCNN(32)(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 32, 4, 6])
    """

    stride = 16

    def __init__(self, out_channels: int = 64, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            nxt = out_channels if i == 3 else min(width * 2**i, out_channels)
            layers += [
                nn.Conv2d(channels, nxt, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(nxt),
                nn.ReLU(inplace=True),
            ]
            channels = nxt
        self.features = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.width = width

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments: ``TinyCNN(**m.get_config())`` rebuilds the architecture."""
        return {"out_channels": self.out_channels, "width": self.width}

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt's block with BatchNorm: depthwise k x k conv, norm, 1x1 expansion x4, GELU,
    1x1 projection, residual. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels
        )
        self.norm = nn.BatchNorm2d(channels)
        self.pwconv1 = nn.Conv2d(channels, 4 * channels, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


@register_component
class SmallConvNeXt(nn.Module):
    """A small ConvNeXt-style trunk at stride 16 for CPU demos on small images.

    A 4 x 4 stride-4 patchify stem, then three stages (strides 4, 8 and 16, a 2 x 2 stride-2
    downsampling between them) of ConvNeXt blocks (depthwise 7 x 7 conv, 1 x 1 expansion x4,
    GELU, 1 x 1 projection, residual), with BatchNorm instead of LayerNorm (faster on the CPU,
    and no layer scale: runs of a few minutes need the blocks to learn from the first step).
    With the default depths and kernel the receptive field is 4 + 6 x 4 + 4 + 6 x 8 + 8 +
    2 x 6 x 16 = 280 pixels (stem, stage, downsampling, ...): the whole of a 64 x 64 tile or of
    a 32 x 128 panorama reaches every output position, where :class:`TinyCNN`'s 31 pixels see
    under a quarter of a tile. Chosen by measurement on the
    synthetic CVUSA with raw tiles (docs/synthetic-benchmark.md).

    Args:
        widths: channels of the three stages; the last is ``out_channels``.
        depths: blocks per stage.
        kernel_size: the depthwise convolution's size.

    Shape:
        - Input: (B, 3, H, W)
        - Output: (B, widths[-1], H // 16, W // 16)

    Example:
        >>> SmallConvNeXt((16, 32, 64), (1, 1, 1))(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 64, 4, 6])
    """

    stride = 16

    def __init__(
        self,
        widths: tuple[int, int, int] | list[int] = (16, 32, 64),
        depths: tuple[int, int, int] | list[int] = (1, 1, 2),
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if len(widths) != 3 or len(depths) != 3 or min(widths) < 1 or min(depths) < 0:
            raise ValueError(
                f"need three positive widths and three depths >= 0, got {widths}, {depths}"
            )
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=4), nn.BatchNorm2d(widths[0])]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            if i:
                layers += [
                    nn.BatchNorm2d(widths[i - 1]),
                    nn.Conv2d(widths[i - 1], width, 2, stride=2),
                ]
            layers += [_ConvNeXtBlock(width, kernel_size) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.widths, self.depths, self.kernel_size = widths, depths, kernel_size
        self.out_channels = widths[-1]

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments: ``SmallConvNeXt(**m.get_config())`` rebuilds the architecture."""
        return {"widths": self.widths, "depths": self.depths, "kernel_size": self.kernel_size}

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)
