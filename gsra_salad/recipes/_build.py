"""From a :class:`Recipe` to the objects of a run: the model, the loss, the data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._input import InputConfig
from ..training import RetrievalTask, TrainData
from ._recipe import Recipe

__all__ = ["RunData", "build_loss", "build_model", "load_data", "write_demo"]

# the "demo-convnext" trunk, chosen by measurement (docs/synthetic-benchmark.md)
_DEMO_CONVNEXT_WIDTHS, _DEMO_CONVNEXT_DEPTHS = (16, 32, 64), (1, 1, 2)


def build_model(recipe: Recipe, *, backbone_weights: Any = True):
    """The recipe's model, recording the recipe's input per view.

    Args:
        recipe: the recipe.
        backbone_weights: ``"lrfr"`` models only: ``True`` (torchvision's ImageNet weights,
            from its cache or downloaded), ``False`` (random) or a weights file.

    Returns:
        A :class:`~gsra_salad.CrossViewGeoLocalizer` in training mode.

    Example:
        >>> from gsra_salad import recipes
        >>> model = build_model(recipes.get("cvusa-demo"))
        >>> model.input_config["reference"].view_transform
        'polar'
    """
    from .. import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention
    from ..models import SmallConvNeXt, TinyCNN

    inputs = {"query": recipe.query_input, "reference": recipe.reference_input}
    query_size = recipe.query_input.image_size
    reference_size = recipe.reference_input.image_size
    if recipe.model == "lrfr":
        kwargs = {} if query_size == reference_size else {"query_img_size": query_size}
        model = CrossViewGeoLocalizer.lrfr(
            img_size=reference_size, pretrained_backbone=backbone_weights, **kwargs
        )
        model.input_config = inputs
        return model.train()
    if recipe.model == "demo-convnext":
        trunk: Any = SmallConvNeXt(_DEMO_CONVNEXT_WIDTHS, _DEMO_CONVNEXT_DEPTHS)
    else:
        trunk = TinyCNN(64, width=16)
    channels, stride = trunk.out_channels, trunk.stride
    q_map = (query_size[0] // stride, query_size[1] // stride)
    r_map = (reference_size[0] // stride, reference_size[1] // stride)
    clusters = min(16, q_map[0] * q_map[1], r_map[0] * r_map[1])
    reference_attention = (
        None if r_map == q_map else GlobalSpatialRelationAttention(channels, r_map, groups=8)
    )
    return CrossViewGeoLocalizer(
        trunk,
        GlobalSpatialRelationAttention(channels, q_map, groups=8),
        SALAD(channels, num_clusters=clusters, cluster_dim=16, token_dim=0, dropout=0.0),
        reference_attention=reference_attention,
        input_config=inputs,
    )


def build_loss(recipe: Recipe, *, gather: bool = False):
    """The recipe's loss: LRFR's soft-margin triplet (semi-hard, alpha 10) or Sample4Geo's
    InfoNCE (temperature 0.07, learnable, label smoothing 0.1); ``gather`` takes negatives from
    every process.

    Example:
        >>> from gsra_salad import recipes
        >>> type(build_loss(recipes.get("cvusa"))).__name__
        'InfoNCELoss'
        >>> type(build_loss(recipes.get("lrfr-cvusa"))).__name__
        'SoftMarginTripletLoss'
    """
    from ..losses import InfoNCELoss, SoftMarginTripletLoss

    if recipe.loss == "infonce":
        return InfoNCELoss(temperature=0.07, learnable=True, label_smoothing=0.1, gather=gather)
    return SoftMarginTripletLoss(alpha=10.0, negatives="semi-hard", gather=gather)


def write_demo(recipe: Recipe, root: str | os.PathLike, seed: int = 1) -> Path:
    """Writes the demo recipe's synthetic dataset (the real layout on disk) to ``root``.

    Training locations scale with ``recipe.demo_locations``: 2x for CVUSA and CVACT, 4x
    buildings (4 drone views each, plus distractors) for University-1652.

    Raises:
        ValueError: a recipe that is not a demo (``demo_locations`` is None).
    """
    from ..data import synthetic

    locations = recipe.demo_locations
    if locations is None:
        raise ValueError(f"recipe {recipe.name!r} is not a demo: it reads a real dataset")
    if recipe.dataset == "cvusa":
        return synthetic.write_cvusa(root, num_train=2 * locations, num_val=locations, seed=seed)
    if recipe.dataset == "cvact":
        return synthetic.write_cvact(
            root,
            num_train=2 * locations,
            num_val=locations,
            num_test=locations if recipe.split == "test" else 0,
            seed=seed,
        )
    return synthetic.write_university1652(
        root,
        num_train=4 * locations,
        num_test=locations,
        num_distractors=max(1, locations // 5),
        drones_per_building=4,
        seed=seed,
    )


@dataclass
class RunData:
    """What :func:`load_data` returns: the training data (``None`` for evaluation only), the
    evaluation tasks and the evaluation split's name."""

    train: TrainData | None
    tasks: list[RetrievalTask]
    split: str
    inputs: dict[str, InputConfig] = field(default_factory=dict)


def load_data(
    recipe: Recipe,
    root: str | os.PathLike,
    inputs: dict[str, InputConfig] | None = None,
    *,
    train: bool = True,
    seed: int = 1,
) -> RunData:
    """Reads the recipe's dataset under ``root`` with each view's preprocessing.

    Args:
        recipe: which dataset, split, augmentation and path (in memory or per item).
        root: the dataset's directory.
        inputs: ``{"query": InputConfig, "reference": InputConfig}``, the model's own
            (``model.input_config``); default: the recipe's.
        train: also read the training pairs (``False``: evaluation only).
        seed: seeds the augmentation's generator.

    Returns:
        :class:`RunData`.
    """
    inputs = inputs or {"query": recipe.query_input, "reference": recipe.reference_input}
    if recipe.in_memory:
        tasks, pairs, mining = _in_memory(recipe, root, inputs, train)
    else:
        tasks, pairs, mining = _per_item(recipe, root, inputs, train)
    data = None
    if train:
        _check_positions(recipe, root, pairs)
        augmentation = None if recipe.augmentation is None else recipe.augmentation.build(seed)
        references, queries = mining if mining is not None else (None, None)
        data = TrainData(pairs, augmentation, references, queries)
    return RunData(data, tasks, recipe.split, inputs)


def _check_positions(recipe: Recipe, root, pairs) -> None:
    """GPS batches need positions: say where they come from when the dataset has none."""
    if recipe.train.mining not in ("gps", "gps+embedding"):
        return
    if getattr(pairs, "positions", None) is not None:
        return
    where = (
        f"{Path(root) / 'split_locations' / 'all.csv'} (part of the full CVUSA release; the "
        "19zl splits hold no positions)"
        if recipe.dataset == "cvusa"
        else "the dataset"
    )
    raise ValueError(
        f"recipe {recipe.name!r} builds its first batches from GPS neighbours "
        f"(mining={recipe.train.mining!r}), but the training pairs have no positions: they are "
        f"read from {where}. Add the file, or train with --mining embedding (random batches "
        "until the first evaluation)"
    )


def _threads() -> int:
    return min(8, os.cpu_count() or 1)


def _reader(recipe: Recipe):
    from ..data import CVACT, CVUSA

    return CVUSA if recipe.dataset == "cvusa" else CVACT


def _university_tasks(split) -> list[RetrievalTask]:
    """Both directions; ``split(view, side)`` reads one test view of University-1652."""
    return [
        RetrievalTask(
            "drone->satellite",
            split("query_drone", "query"),
            split("gallery_satellite", "reference"),
            query_view="query",
            reference_view="reference",
            protocol="university1652",
            papers_scoring=True,
        ),
        RetrievalTask(
            "satellite->drone",
            split("query_satellite", "reference"),
            split("gallery_drone", "query"),
            query_view="reference",
            reference_view="query",
            protocol="university1652",
            papers_scoring=True,
        ),
    ]


def _in_memory(recipe: Recipe, root, inputs, train: bool):
    """Decoded once into memory at the inputs' sizes (polar transform included); whole
    batches augmented later."""
    from ..data import PreloadedImages, PreloadedPairs, University1652

    if recipe.dataset == "university1652":

        def split(view, side):
            return PreloadedImages(
                University1652(root, "test", view=view),
                input_config=inputs[side],
                workers=_threads(),
            )

        tasks = _university_tasks(split)
        if not train:
            return tasks, None, None
        pairs = PreloadedPairs(
            University1652(root, "train", query_view="drone"),
            query_input=inputs["query"],
            reference_input=inputs["reference"],
            workers=_threads(),
        )
        return tasks, pairs, None

    reader = _reader(recipe)

    def load_split(split):
        return PreloadedPairs(
            reader(root, split),
            query_input=inputs["query"],
            reference_input=inputs["reference"],
            workers=_threads(),
        )

    evaluation = load_split(recipe.split)
    tasks = [RetrievalTask(recipe.split, evaluation.query_set(), evaluation.reference_set())]
    if not train:
        return tasks, None, None
    pairs = load_split("train")
    return tasks, pairs, (pairs.reference_set(), pairs.query_set())


def _per_item(recipe: Recipe, root, inputs, train: bool):
    """Read and transformed per item in DataLoader workers; the training images stay pixels
    (uint8) so that the batch augmentation runs before the normalisation."""
    from ..data import University1652, create_transform, train_transform

    evaluation = {side: create_transform(inputs[side], side) for side in inputs}
    augment = {"augmentations": recipe.image_augmentation}
    if recipe.dataset == "university1652":
        tasks = _university_tasks(
            lambda view, side: University1652(root, "test", view=view, transform=evaluation[side])
        )
        if not train:
            return tasks, None, None
        query = inputs["query"]
        drone = (
            train_transform(
                "drone", query.image_size, normalize=False, mean=query.mean, std=query.std,
                augmentations=recipe.image_augmentation,
            )
            if query.view_transform == "none"
            else create_transform(query, "query", train=True, normalize=False, **augment)
        )  # fmt: skip
        pairs = University1652(
            root,
            "train",
            query_view="drone",
            query_transform=drone,
            reference_transform=create_transform(
                inputs, "reference", train=True, normalize=False, **augment
            ),
        )
        return tasks, pairs, None
    reader = _reader(recipe)
    evaluation_set = reader(
        root,
        recipe.split,
        query_transform=evaluation["query"],
        reference_transform=evaluation["reference"],
    )
    tasks = [
        RetrievalTask(recipe.split, evaluation_set.query_set(), evaluation_set.reference_set())
    ]
    if not train:
        return tasks, None, None
    pairs = reader(
        root,
        "train",
        query_transform=create_transform(inputs, "query", train=True, normalize=False, **augment),
        reference_transform=create_transform(
            inputs, "reference", train=True, normalize=False, **augment
        ),
    )
    plain = reader(
        root,
        "train",
        query_transform=evaluation["query"],
        reference_transform=evaluation["reference"],
    )
    return tasks, pairs, (plain.reference_set(), plain.query_set())
