"""The :class:`Recipe` type: one dataset's training and data settings, as one typed value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .._input import InputConfig
from ..training import TrainConfig

__all__ = ["Augmentation", "Recipe"]

Dataset = Literal["cvusa", "cvact", "university1652"]
DATASETS = ("cvusa", "cvact", "university1652")


@dataclass(frozen=True)
class Augmentation:
    """A recipe's paired batch augmentation (:class:`~gsra_salad.data.PairedBatchAugmentation`):
    one flip and one quarter turn per pair, then a colour change per image.

    Attributes:
        mode: ``"panorama"`` (tile turns, panorama rolls), ``"polar"`` (both views are
            panoramas: both roll) or ``"drone"`` (only the tile turns).
        flip_p: probability of mirroring a pair.
        rotate: draw a quarter turn per pair.
        brightness, contrast, saturation, channel_gain: colour-change strengths (0: none).

    Example:
        >>> Augmentation("panorama").build(seed=1).mode
        'panorama'
    """

    mode: Literal["panorama", "polar", "drone"] = "panorama"
    flip_p: float = 0.5
    rotate: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    channel_gain: float = 0.0

    def build(self, seed: int):
        """The augmentation, with its own generator seeded from ``seed``."""
        import torch

        from ..data import PairedBatchAugmentation

        return PairedBatchAugmentation(
            **dataclasses.asdict(self), generator=torch.Generator().manual_seed(seed)
        )


@dataclass(frozen=True)
class Recipe:
    """Everything a run of one dataset needs to know, as data: the training hyper-parameters,
    the model, the loss, each view's input and the augmentation.

    Get one with :func:`gsra_salad.recipes.get` and change it with :meth:`replace` (or
    ``dataclasses.replace``); ``python -m gsra_salad train`` builds its command line from these
    fields, so ``--help`` shows every default with its :attr:`source`.

    Attributes:
        name: the recipe's name (``"cvusa"``, ``"cvusa-demo"``, ...).
        dataset: ``"cvusa"``, ``"cvact"`` or ``"university1652"`` (which reader).
        source: where the values come from (e.g. ``"Sample4Geo's recipe"``).
        train: the :class:`~gsra_salad.training.TrainConfig`.
        model: ``"lrfr"`` (ConvNeXt-T, GSRA per view size, SALAD; ImageNet-initialised),
            ``"demo"`` (:class:`~gsra_salad.models.TinyCNN`, GSRA per view, a small SALAD; CPU,
            seconds) or ``"demo-convnext"`` (:class:`~gsra_salad.models.SmallConvNeXt`, whose
            receptive field covers a whole small tile, GSRA per view, a small SALAD; CPU,
            a minute).
        loss: ``"triplet"`` (soft-margin, semi-hard, alpha 10: LRFR) or ``"infonce"``
            (temperature 0.07 learnable, label smoothing 0.1: Sample4Geo).
        query_input, reference_input: each view's :class:`~gsra_salad.InputConfig` (size,
            normalisation, view transform); the model records them.
        split: the evaluation split (``"val"`` or ``"test"``).
        augmentation: the paired augmentation of the training batches (``None``: none).
        image_augmentation: the per-image training augmentations: ``"library"`` (this
            library's colour jitter, blur, sharpness and erasing) or ``"published"`` (LRFR's and
            Sample4Geo's: :func:`~gsra_salad.data.published_augmentation`); ``"published"``
            needs per-item loading (an ``in_memory`` recipe augments whole batches only).
        in_memory: decode and resize every image once into memory
            (:class:`~gsra_salad.data.PreloadedPairs`) instead of a DataLoader per item.
        demo_locations: evaluation locations of the synthetic dataset (demo recipes only).
        notes: free text shown by ``--help``.

    Example:
        >>> from gsra_salad import recipes
        >>> recipe = recipes.get("cvusa").replace(epochs=2, batch_size=16)
        >>> recipe.train.epochs, recipe.query_input.image_size
        (2, (140, 768))
    """

    name: str
    dataset: Dataset
    source: str
    train: TrainConfig
    model: Literal["lrfr", "demo", "demo-convnext"]
    loss: Literal["triplet", "infonce"]
    query_input: InputConfig
    reference_input: InputConfig
    split: str = "val"
    augmentation: Augmentation | None = None
    image_augmentation: Literal["library", "published"] = "library"
    in_memory: bool = False
    demo_locations: int | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.model not in ("lrfr", "demo", "demo-convnext"):
            raise ValueError(f"model must be 'lrfr', 'demo' or 'demo-convnext', got {self.model!r}")
        if self.loss not in ("triplet", "infonce"):
            raise ValueError(f"loss must be 'triplet' or 'infonce', got {self.loss!r}")
        splits = ("val", "test") if self.dataset != "university1652" else ("test",)
        if self.split not in splits:
            raise ValueError(
                f"{self.dataset} evaluates on {' or '.join(splits)}, got split={self.split!r}"
            )
        if self.image_augmentation not in ("library", "published"):
            raise ValueError(
                f"image_augmentation must be 'library' or 'published', got "
                f"{self.image_augmentation!r}"
            )
        if self.in_memory and self.image_augmentation == "published":
            raise ValueError(
                "image_augmentation='published' runs per image, in the DataLoader; an in_memory "
                "recipe augments whole batches only: use image_augmentation='library'"
            )
        if self.demo_locations is not None and self.demo_locations < 2:
            raise ValueError(f"demo_locations must be >= 2, got {self.demo_locations}")

    @property
    def demo(self) -> bool:
        """Whether the recipe trains on a synthetic dataset it writes itself."""
        return self.demo_locations is not None

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes``; :class:`~gsra_salad.training.TrainConfig` fields
        (``epochs``, ``lr``, ...) go to :attr:`train`, ``query_size`` / ``reference_size``
        change the size of a view's input, everything else is a field of the recipe.

        Raises:
            TypeError: an unknown field, named with the fields there are.

        Example:
            >>> from gsra_salad import recipes
            >>> recipes.get("cvusa-demo").replace(lr=1e-3, query_size=(16, 64)).query_input
            InputConfig(image_size=(16, 64), ...)
        """
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        own = {f.name for f in dataclasses.fields(self)}
        train = {k: v for k, v in changes.items() if k in train_fields}
        rest = {k: v for k, v in changes.items() if k not in train_fields}
        for view in ("query", "reference"):
            size = rest.pop(f"{view}_size", None)
            if size is not None:
                current = rest.get(f"{view}_input", getattr(self, f"{view}_input"))
                rest[f"{view}_input"] = dataclasses.replace(current, image_size=tuple(size))
        unknown = sorted(set(rest) - own)
        if unknown:
            raise TypeError(
                f"Recipe.replace: unknown field(s) {unknown}; recipe fields: {sorted(own)}, "
                f"training fields: {sorted(train_fields)}, and query_size / reference_size"
            )
        if train:
            rest["train"] = dataclasses.replace(rest.get("train", self.train), **train)
        return dataclasses.replace(self, **rest)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as JSON values (what a run folder's ``recipe.json`` holds)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "notes":
                continue
            if isinstance(value, InputConfig):
                value = value.to_dict()
            elif isinstance(value, (TrainConfig, Augmentation)):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Rebuilds :meth:`as_dict`'s output.

        Raises:
            ValueError: a missing or unknown key, or an invalid value (named).
        """
        try:
            values = dict(data)
            values["train"] = TrainConfig(**values["train"])
            for view in ("query_input", "reference_input"):
                values[view] = InputConfig.from_dict(values[view])
            if values.get("augmentation") is not None:
                values["augmentation"] = Augmentation(**values["augmentation"])
            return cls(**values)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a valid recipe ({err})") from err
