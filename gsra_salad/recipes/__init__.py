"""Training recipes as data: the published and demo settings of CVUSA, CVACT and
University-1652, and what builds a run from them.

A :class:`Recipe` holds everything a run needs to know: the training hyper-parameters (a
:class:`~gsra_salad.training.TrainConfig`), the model, the loss, each view's
:class:`~gsra_salad.InputConfig` and the augmentation. ``python -m gsra_salad train`` (and the
example scripts) build their command line from these fields, so there is one source for every
default. Sits on top of the package: it imports models, data, losses and training.

- ``"sample4geo-cvusa"``, ``"sample4geo-cvact"``: Sample4Geo's recipe (InfoNCE, its schedule,
  sampling and augmentations) on LRFR's model; ``"cvusa"`` and ``"cvact"`` are the same
  recipes under the dataset's name (the defaults);
- ``"lrfr-university1652"``: LRFR's recipe; ``"university1652"`` is the same (the default);
- ``"lrfr-cvusa"``, ``"lrfr-cvact"``: Sample4Geo's recipe with LRFR's loss;
- ``"cvusa-demo"``, ``"cvact-demo"``, ``"university1652-demo"``: synthetic data, CPU, minutes
  (the satellite tiles polar-transformed into panoramas);
- ``"cvusa-raw-demo"``: the paper's pipeline on the synthetic CVUSA (raw tiles, one GSRA per
  view, a :class:`~gsra_salad.models.SmallConvNeXt` trunk), a few CPU minutes.

Example:
    >>> from gsra_salad import recipes
    >>> [name for name in recipes.names() if "cvusa" in name]
    ['cvusa', 'cvusa-demo', 'cvusa-raw-demo', 'lrfr-cvusa', 'sample4geo-cvusa']
    >>> recipe = recipes.get("cvusa")
    >>> recipe.train.batch_size, recipe.loss, recipe.source
    (128, 'infonce', "Sample4Geo's recipe (train_cvusa.py / train_cvact.py) on LRFR's model")
    >>> import dataclasses
    >>> short = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=2))
    >>> short.train.epochs == recipe.replace(epochs=2).train.epochs == 2
    True
"""

from __future__ import annotations

from ._build import RunData, build_loss, build_model, load_data, write_demo
from ._catalogue import RECIPES
from ._recipe import Augmentation, Recipe

__all__ = [
    "Augmentation",
    "Recipe",
    "RunData",
    "build_loss",
    "build_model",
    "get",
    "load_data",
    "names",
    "write_demo",
]


def names() -> list[str]:
    """The names :func:`get` knows, sorted."""
    return sorted(RECIPES)


def get(name: str) -> Recipe:
    """The recipe called ``name`` (a frozen value: change it with ``replace``).

    Raises:
        KeyError: an unknown name, listing the known ones.

    Example:
        >>> get("university1652-demo").train.epochs
        16
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"no recipe {name!r}; known recipes: {', '.join(names())}") from None
