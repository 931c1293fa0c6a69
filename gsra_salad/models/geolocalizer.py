"""CrossViewGeoLocalizer: backbone -> attention -> aggregation -> L2-normalised descriptor."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .._input import _IMAGENET_MEAN, _IMAGENET_STD, VIEWS, InputConfig, input_configs
from ..layers import SALAD, GlobalSpatialRelationAttention
from . import _serialization
from ._registry import build_component, component_config
from .backbones import ConvNeXtTrunk, feature_size

__all__ = ["CrossViewGeoLocalizer"]

View = Literal["query", "reference"]

_LRFR_DEFAULTS: dict[str, Any] = {
    "backbone_variant": "tiny",
    "groups": 32,
    "num_clusters": 128,
    "cluster_dim": 64,
    "dropout": 0.3,
    "sinkhorn_iters": 3,
    "impl": "auto",
    "share_weights": True,
    "stochastic_depth_prob": 0.1,
}


class CrossViewGeoLocalizer(nn.Module):
    """A retrieval model for cross-view geo-localization: one descriptor per image.

    ``embed(images, view)`` runs ``backbone -> attention -> aggregation`` and L2-normalises the
    result, so the dot product of two descriptors is their cosine similarity.
    ``forward(query)`` returns the query descriptors; ``forward(query, reference)`` returns both
    views' descriptors, the reference view through the same weights (``share_weights=True``, as
    in LRFR) or through a second copy of the whole stack (``share_weights=False``).

    Views of different sizes (e.g. CVUSA's (140, 768) panoramas against 384 x 384 satellite
    tiles): a GSRA is built for one feature-map size, so give the reference view its own
    ``reference_attention``; the trunk and the aggregation stay shared.

    Under ``torch.autocast`` (bfloat16 on CPU, float16 / bfloat16 on CUDA) the Sinkhorn solve
    stays in float32 and the descriptors have a cosine similarity of at least 0.99 to the
    float32 ones (tested; 0.99999 measured for ``lrfr()`` at 384 x 384 with bfloat16 on CPU).

    Args:
        backbone: any module mapping images (B, 3, H, W) to features (B, C, h, w).
        attention: a module (B, C, h, w) -> (B, C, h, w), or ``None`` for none; the query
            view's, and the reference view's too unless ``reference_attention`` is given.
        aggregation: a module mapping features (B, C, h, w) to descriptors (B, D).
        share_weights: one stack for both views (``True``) or a copy for the reference view.
        reference_attention: the reference view's attention when its feature maps differ in
            size from the query view's (``None``: the reference view uses ``attention``). With
            ``share_weights=False`` it becomes the attention of the reference stack.
        input_config: the preprocessing each view expects (:class:`~gsra_salad.InputConfig`):
            a mapping ``{"query": ..., "reference": ...}``, one config for both views, or
            ``None`` (unknown). Kept in :attr:`input_config`, saved by
            :meth:`save_pretrained`, read by :func:`gsra_salad.data.create_transform`.

    Shape:
        - Input: query (B, 3, H, W); reference (B', 3, H', W') (its own size is allowed)
        - Output: (B, D), or a pair ((B, D), (B', D)); unit L2 norm

    Example:
        >>> import torch
        >>> from gsra_salad.models import TinyCNN
        >>> model = CrossViewGeoLocalizer(
        ...     TinyCNN(32),
        ...     GlobalSpatialRelationAttention(32, (2, 8), groups=8),  # query: 32 x 128 panoramas
        ...     SALAD(32, num_clusters=8, cluster_dim=4, token_dim=0),
        ...     reference_attention=GlobalSpatialRelationAttention(32, (4, 4), groups=8),  # 64 x 64
        ...     input_config={"query": InputConfig((32, 128)), "reference": InputConfig(64)},
        ... )
        >>> q, r = model(torch.randn(2, 3, 32, 128), torch.randn(2, 3, 64, 64))
        >>> q.shape, r.shape, model.descriptor_dim
        (torch.Size([2, 32]), torch.Size([2, 32]), 32)
        >>> model.input_config["reference"].image_size
        (64, 64)
    """

    def __init__(
        self,
        backbone: nn.Module,
        attention: nn.Module | None,
        aggregation: nn.Module,
        *,
        share_weights: bool = True,
        reference_attention: nn.Module | None = None,
        input_config: Mapping[str, InputConfig] | InputConfig | None = None,
    ) -> None:
        super().__init__()
        self.input_config = input_config  # validated by the property's setter
        for name, module in (("backbone", backbone), ("aggregation", aggregation)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        optional = {"attention": attention, "reference_attention": reference_attention}
        for name, module in optional.items():
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module or None, got {type(module)}")
        self.backbone = backbone
        self.attention = attention if attention is not None else nn.Identity()
        self.aggregation = aggregation
        self.share_weights = share_weights
        self.reference_stack: nn.ModuleDict | None = None
        self.reference_attention: nn.Module | None = None
        if share_weights:
            self.reference_attention = reference_attention
        else:
            self.reference_stack = nn.ModuleDict(
                {
                    "backbone": copy.deepcopy(backbone),
                    "attention": (
                        reference_attention
                        if reference_attention is not None
                        else copy.deepcopy(self.attention)
                    ),
                    "aggregation": copy.deepcopy(aggregation),
                }
            )

    # -- input preprocessing -------------------------------------------------------------------

    @property
    def input_config(self) -> dict[str, InputConfig] | None:
        """The preprocessing each view expects: ``{"query": InputConfig, "reference":
        InputConfig}``, or ``None`` when unknown (a model built without it, or loaded from a
        ``config.json`` written before gsra_salad recorded it).

        Set it by assignment, validated: a mapping of both views (:class:`InputConfig` or its
        ``to_dict()``), one :class:`InputConfig` for both views, or ``None``, e.g.
        ``model.input_config = {"query": InputConfig((140, 768)), "reference":
        InputConfig(384)}``. :func:`gsra_salad.data.create_transform` and
        :func:`gsra_salad.data.resolve_input_config` read it.

        Raises:
            TypeError, ValueError: (on assignment) anything else, naming what was expected.
        """
        return None if self._input_config is None else dict(self._input_config)

    @input_config.setter
    def input_config(self, value: Mapping[str, Any] | InputConfig | None) -> None:
        self._input_config = input_configs(value, "CrossViewGeoLocalizer.input_config")

    def extra_repr(self) -> str:
        """``share_weights`` and the recorded input preprocessing of each view."""
        config = self._input_config
        if config is None:
            text = "input_config=None (unknown preprocessing)"
        else:
            text = "input_config={" + ", ".join(_short(v, config[v]) for v in VIEWS) + "}"
        return f"share_weights={self.share_weights}, {text}"

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def lrfr(
        cls,
        img_size: int | tuple[int, int] = 384,
        pretrained_backbone: bool | str | os.PathLike = False,
        *,
        query_img_size: int | tuple[int, int] | None = None,
        **overrides: Any,
    ) -> CrossViewGeoLocalizer:
        """The paper's model: ConvNeXt-Tiny stage-3 trunk, GSRA and SALAD (128 x 64, no token).

        Args:
            img_size: the reference (satellite / aerial) view's input size, an int (square) or
                (H, W); the feature map is (H // 16, W // 16), which GSRA is built for.
            pretrained_backbone: ``False``; ``True`` for torchvision's ImageNet weights (from its
                cache or the network); or the path of a local weights file.
            query_img_size: the query (ground panorama or drone) view's input size; default
                ``img_size``. When the two feature maps differ in size the model holds one GSRA
                per view (``attention`` for the query, ``reference_attention`` for the
                reference) and shares the trunk and SALAD, e.g. CVUSA's
                ``lrfr(img_size=384, query_img_size=(140, 768))``.
            **overrides: ``backbone_variant`` ("tiny"), ``groups`` (32), ``num_clusters``
                (128), ``cluster_dim`` (64), ``dropout`` (0.3), ``sinkhorn_iters`` (3),
                ``impl`` ("auto"), ``share_weights`` (True), ``stochastic_depth_prob`` (0.1).

        Returns:
            The model, in training mode, with random weights (but for the trunk's, if
            ``pretrained_backbone`` says so); its :attr:`input_config` records the two sizes
            with ImageNet's mean and std and no view transform (LRFR's preprocessing).

        Raises:
            ValueError: an image size too small for SALAD's clusters or giving an odd number of
                feature positions.
            TypeError: an unknown override.

        Example (needs the ``torchvision`` extra)::

            model = CrossViewGeoLocalizer.lrfr(img_size=384)
            model.descriptor_dim  # 8192
            cvusa = CrossViewGeoLocalizer.lrfr(img_size=384, query_img_size=(140, 768))
        """
        options = _lrfr_options(overrides)
        clusters = options["num_clusters"]
        reference_hw = _lrfr_feature_size("img_size", img_size, clusters)
        query_hw = reference_hw
        if query_img_size is not None:
            query_hw = _lrfr_feature_size("query_img_size", query_img_size, clusters)
        backbone = ConvNeXtTrunk(
            options["backbone_variant"],
            weights=pretrained_backbone or None,
            stochastic_depth_prob=options["stochastic_depth_prob"],
        )
        channels = backbone.out_channels
        return cls(
            backbone,
            _lrfr_gsra(channels, query_hw, options),
            _lrfr_salad(channels, options),
            share_weights=options["share_weights"],
            reference_attention=(
                _lrfr_gsra(channels, reference_hw, options) if reference_hw != query_hw else None
            ),
            input_config={
                "query": InputConfig(query_img_size if query_img_size is not None else img_size),
                "reference": InputConfig(img_size),
            },
        )

    @classmethod
    def from_lrfr_checkpoint(
        cls,
        path_or_state_dict: str | os.PathLike | dict[str, Tensor],
        img_size: int | tuple[int, int] = 384,
        **overrides: Any,
    ) -> CrossViewGeoLocalizer:
        """Loads a published LRFR checkpoint (strictly) into :meth:`lrfr`'s model, in eval mode.

        The checkpoint holds ``model.backbone.backbone.*`` (torchvision ConvNeXt features[:-2]),
        ``model.attention.*`` and ``model.aggregation.*``, optionally prefixed ``module.`` and
        optionally nested under a ``"state_dict"`` or ``"model"`` key. The model is returned in
        ``eval()`` mode (dropout off, BatchNorm running statistics), ready for inference: call
        ``.train()`` to fine-tune.

        Args:
            path_or_state_dict: a ``torch.save`` / ``.safetensors`` file or a state dict.
            img_size: the image size the checkpoint was trained at (GSRA depends on it).
            **overrides: passed to :meth:`lrfr`.

        Returns:
            The model, in eval mode.

        Raises:
            ValueError: listing missing, unexpected and mis-shaped keys, and the likely cause
                (e.g. the image size the checkpoint was trained at).
        """
        state = _serialization.read_state_dict(path_or_state_dict)
        model = cls.lrfr(img_size=img_size, **overrides)
        converted = _serialization.convert_lrfr_state_dict(state)
        _serialization.load_strict(model, converted, source="LRFR checkpoint")
        return model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CrossViewGeoLocalizer:
        """Rebuilds a model saved by :meth:`save_pretrained` (config + weights), in eval mode.

        Each component is rebuilt from its registered type and ``get_config()`` (see
        :func:`gsra_salad.models.register_component`; register your own classes before
        loading). Loading never executes pickled code: weights are read with safetensors or with
        ``torch.load(weights_only=True)``, and their SHA-256 is checked against the config. The
        model is returned in ``eval()`` mode, ready for inference: call ``.train()`` to
        fine-tune.

        Args:
            directory: a directory written by :meth:`save_pretrained`.

        Returns:
            The model, in eval mode.

        Raises:
            FileNotFoundError: no ``config.json`` or weights file.
            ValueError: an invalid or incomplete config (naming the file and the key), an
                unknown component type, or weights that do not match the config.
        """
        directory = Path(directory)
        config, state = _serialization.read_pretrained(directory)
        source = str(directory / _serialization.CONFIG_NAME)
        model = cls._from_config(config, source)
        _serialization.load_strict(model, state, source=str(directory))
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes ``config.json`` (:meth:`describe`) and the weights to ``directory``.

        The weights are written as safetensors if installed (else ``torch.save``), atomically.

        Args:
            directory: created if missing; files already there are replaced.

        Returns:
            ``directory``.

        Raises:
            ValueError: a component whose class is not registered (see :meth:`describe`).
        """
        return _serialization.write_pretrained(self, Path(directory), self.describe())

    def describe(self) -> dict[str, Any]:
        """The JSON-serialisable config :meth:`from_pretrained` rebuilds the model from.

        ``{"architecture": "modules", "backbone": ..., "attention": ..., "aggregation": ...,
        "reference_attention": ..., "share_weights": ..., "input": ...}``, each component as
        ``{"type": <registered name>, **module.get_config()}`` (``None`` for no attention),
        ``"input"`` as ``{"query": InputConfig.to_dict(), "reference": ...}`` (``None`` when
        :attr:`input_config` is unknown).

        Returns:
            The config dict.

        Raises:
            ValueError: a component whose class is not registered with
                :func:`gsra_salad.models.register_component`.
        """
        if self.reference_stack is not None:
            reference_attention = self.reference_stack["attention"]
        else:
            reference_attention = self.reference_attention
        return {
            "architecture": "modules",
            "backbone": component_config(self.backbone, "backbone"),
            "attention": _optional_config(self.attention, "attention"),
            "aggregation": component_config(self.aggregation, "aggregation"),
            "reference_attention": _optional_config(reference_attention, "reference_attention"),
            "share_weights": self.share_weights,
            "input": None if self._input_config is None else {
                view: config.to_dict() for view, config in self._input_config.items()
            },
        }  # fmt: skip

    @classmethod
    def _from_config(cls, config: dict[str, Any], source: str) -> CrossViewGeoLocalizer:
        arch = config.get("architecture") if isinstance(config, dict) else None
        if arch == "lrfr":  # written by 0.1.0.dev0 for lrfr() models
            size = _config_key(config, "img_size", source)
            return cls.lrfr(img_size=tuple(size), **_config_key(config, "options", source))
        if arch != "modules":
            raise ValueError(f"{source}: unknown architecture {arch!r} in the model config")
        try:  # "input" is absent from configs written before the model recorded it
            inputs = input_configs(config.get("input"), "the 'input' entry")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

        def build(key: str) -> nn.Module | None:
            value = _config_key(config, key, source)
            return None if value is None else build_component(_upgrade(value), source)

        return cls(
            build("backbone"),
            build("attention"),
            build("aggregation"),
            share_weights=_config_key(config, "share_weights", source),
            reference_attention=build("reference_attention")
            if "reference_attention" in config
            else None,
            input_config=inputs,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training: the backbone(s) recompute their activations in
        the backward pass. Needs a backbone with ``set_grad_checkpointing`` (the adapters here,
        timm models)."""
        backbones = [self.backbone]
        if self.reference_stack is not None:
            backbones.append(self.reference_stack["backbone"])
        for backbone in backbones:
            if not hasattr(backbone, "set_grad_checkpointing"):
                raise NotImplementedError(
                    f"{type(backbone).__name__} has no set_grad_checkpointing method"
                )
            backbone.set_grad_checkpointing(enable)

    # -- inference -----------------------------------------------------------------------------

    @property
    def descriptor_dim(self) -> int:
        """D, the size of the descriptors (the aggregation's ``output_dim``)."""
        dim = getattr(self.aggregation, "output_dim", None)
        if dim is None:
            raise AttributeError(
                f"{type(self.aggregation).__name__} has no output_dim: give the aggregation "
                "module an output_dim attribute, or embed one image and read the shape"
            )
        return int(dim)

    def _stack(self, view: str) -> tuple[nn.Module, nn.Module, nn.Module]:
        if view == "reference":
            if self.reference_stack is not None:
                s = self.reference_stack
                return s["backbone"], s["attention"], s["aggregation"]
            if self.reference_attention is not None:
                return self.backbone, self.reference_attention, self.aggregation
        return self.backbone, self.attention, self.aggregation

    def embed(self, images: Tensor, view: View = "query") -> Tensor:
        """Descriptors of a batch of images: (B, 3, H, W) -> (B, D), unit L2 norm.

        Args:
            images: float images, normalised as the backbone expects (the readers return
                uint8: apply :func:`gsra_salad.data.eval_transform` or your own normalisation).
            view: ``"query"`` or ``"reference"``: picks the attention (views of different
                sizes) and the stack (``share_weights=False``).

        Returns:
            (B, D) descriptors of unit L2 norm.

        Raises:
            TypeError: images that are not a floating-point tensor.
            ValueError: not 4-D, an unknown ``view``, or an image size the view's attention
                was not built for.
        """
        if view not in ("query", "reference"):
            raise ValueError(f"view must be 'query' or 'reference', got {view!r}")
        _check_images(images)
        backbone, attention, aggregation = self._stack(view)
        features = backbone(images)
        self._check_feature_size(features, images, view, attention)
        features = attention(features)
        return F.normalize(aggregation(features).flatten(1), p=2, dim=1)

    def forward(self, query: Tensor, reference: Tensor | None = None):
        q = self.embed(query, "query")
        if reference is None:
            return q
        return q, self.embed(reference, "reference")

    def _check_feature_size(
        self, features: Tensor, images: Tensor, view: str, attention: nn.Module
    ) -> None:
        want = getattr(attention, "spatial_size", None)
        got = tuple(features.shape[-2:])
        if want is None or tuple(want) == got:
            return
        stride = getattr(self.backbone, "stride", None)
        pixels = f" (images of {want[0] * stride}x{want[1] * stride} pixels)" if stride else ""
        other = "reference" if view == "query" else "query"
        hint = ""
        if tuple(getattr(self._stack(other)[1], "spatial_size", ())) == got:
            hint = f" These are the {other} view's size: pass view={other!r}."
        raise ValueError(
            f"CrossViewGeoLocalizer: the {view} view's attention is built for feature maps of "
            f"size (H, W) = {tuple(want)}{pixels}, but {view} images of "
            f"{images.shape[-2]}x{images.shape[-1]} pixels give {got}.{hint} Resize the "
            f"{view} images, or build the model for this size (lrfr(img_size=...) for the "
            "reference view, query_img_size=... for the query view)"
        )


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must have shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor, normalised as the backbone expects, got "
            f"dtype {images.dtype}. The dataset readers return uint8 images: apply "
            "gsra_salad.data.eval_transform(image_size) (scales to [0, 1] and normalises with "
            "the ImageNet mean and std), or (images.float() / 255 - mean) / std"
        )


def _short(view: str, config: InputConfig) -> str:
    """``query: 32x128 polar(crop=0.7)`` (mean and std only when they are not ImageNet's)."""
    h, w = config.image_size
    how = "resize" if config.view_transform == "none" else f"polar(crop={config.polar_crop:g})"
    text = f"{view}: {h}x{w} {how}"
    if (config.mean, config.std) != (_IMAGENET_MEAN, _IMAGENET_STD):
        text += f" mean={config.mean} std={config.std}"
    return text


def _optional_config(module: nn.Module | None, role: str) -> dict[str, Any] | None:
    if module is None or isinstance(module, nn.Identity):
        return None
    return component_config(module, role)


def _config_key(config: dict[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise ValueError(
            f"{source}: the model config has no {key!r} entry (keys: {sorted(config)}); the file "
            "was edited or written by another program: re-save the model with save_pretrained"
        )
    return config[key]


# component type names written by gsra_salad 0.1.0.dev0, before the registry
_LEGACY_TYPES = {
    "convnext": "ConvNeXtTrunk",
    "timm": "TimmBackbone",
    "tiny": "TinyCNN",
    "gsra": "GlobalSpatialRelationAttention",
    "salad": "SALAD",
}


def _upgrade(config: Any) -> Any:
    if not isinstance(config, dict) or config.get("type") not in _LEGACY_TYPES:
        return config
    config = dict(config, type=_LEGACY_TYPES[config["type"]])
    return {**config, **config.pop("kwargs", {})}


def _lrfr_options(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(_LRFR_DEFAULTS)
    if unknown:
        raise TypeError(
            f"lrfr() got unknown overrides {sorted(unknown)}; known: {sorted(_LRFR_DEFAULTS)}"
        )
    return {**_LRFR_DEFAULTS, **overrides}


def _lrfr_feature_size(
    name: str, img_size: int | tuple[int, int], num_clusters: int
) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    h, w = feature_size(size, ConvNeXtTrunk.stride)
    if h * w < num_clusters or (h * w) % 2:
        raise ValueError(
            f"lrfr({name}={img_size}): the stride-16 feature map is {h}x{w} = {h * w} "
            f"positions, but SALAD needs at least num_clusters={num_clusters} and "
            "GSRA an even number; use an image of at least 192x192 pixels (e.g. 384)"
        )
    return h, w


def _lrfr_gsra(
    channels: int, hw: tuple[int, int], options: dict[str, Any]
) -> GlobalSpatialRelationAttention:
    return GlobalSpatialRelationAttention(
        channels, hw, groups=options["groups"], impl=options["impl"]
    )


def _lrfr_salad(channels: int, options: dict[str, Any]) -> SALAD:
    return SALAD(
        channels,
        options["num_clusters"],
        options["cluster_dim"],
        token_dim=0,
        dropout=options["dropout"],
        sinkhorn_iters=options["sinkhorn_iters"],
        impl=options["impl"],
    )
