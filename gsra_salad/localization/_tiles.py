"""Models, fingerprints, transforms and tile sources of the gallery index. Private."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data._base import load_rgb

METRICS = ("euclidean", "haversine")


def module_of(model: Any) -> nn.Module | None:
    """The module behind ``model``: itself, a bound method's owner, or inside a partial."""
    if isinstance(model, functools.partial):
        return module_of(model.func)
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def model_fingerprint(model: Any) -> str | None:
    """``"sha256:<hex>"`` of a model's config (``describe()``) and weights, or ``None``.

    The digest covers the JSON of ``describe()`` (keys sorted; the class name for modules
    without one) and every ``state_dict`` entry's name, dtype, shape and bytes, so two models
    agree exactly when they compute the same descriptors. For a callable that is no module
    (nor a bound method or partial of one) there is nothing to hash: ``None``.

    Args:
        model: a ``CrossViewGeoLocalizer``, any ``nn.Module``, a bound method such as
            ``model.embed``, a ``functools.partial`` of those, or any callable.

    Returns:
        The fingerprint, or ``None`` for a plain callable.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> model_fingerprint(m) == model_fingerprint(m.forward), model_fingerprint(len)
        (True, None)
    """
    module = module_of(model)
    if module is None:
        return None
    config: Any = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    describe = getattr(module, "describe", None)
    if callable(describe):
        try:
            config = describe()
        except ValueError:  # an unregistered component: the weights still tell models apart
            pass
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def view_function(model: Any, view: str) -> Callable[[Tensor], Tensor]:
    """``model.embed(images, view=view)`` for a model with views, else ``model`` itself."""
    if isinstance(model, nn.Module) and callable(getattr(model, "embed", None)):
        return functools.partial(model.embed, view=view)
    if not callable(model):
        raise TypeError(f"model must be callable (images -> descriptors), got {type(model)}")
    return model


def resolve_transform(model: Any, view: str, transform: Any, owner: str) -> Any:
    """``transform`` if given; else the model's own preprocessing for ``view``.

    The one place where the gallery and ``localize`` reach for
    ``gsra_salad.data.create_transform(model, view, train=False)``.
    """
    if transform is not None:
        return transform
    try:
        from ..data import create_transform  # type: ignore[attr-defined]
    except ImportError:
        create_transform = None
    if create_transform is None:
        raise ValueError(
            f"{owner}: no transform given, and this version of gsra_salad cannot build one from "
            "the model (gsra_salad.data.create_transform is missing); pass transform=..., e.g. "
            "gsra_salad.data.eval_transform(image_size) for the model's input size"
        )
    module = module_of(model)
    return create_transform(module if module is not None else model, view, train=False)


class PathImages(Dataset):
    """(image, index) items decoded from paths with ``load_rgb`` then ``transform``."""

    def __init__(self, paths: Sequence[str | Path], transform: Any) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = load_rgb(self.paths[i])
        return (self.transform(image) if self.transform is not None else image), i


class Transformed(Dataset):
    """(transform(image), label) items of a dataset of (image, label) items."""

    def __init__(self, dataset: Dataset, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[i]
        return self.transform(image), label


def is_path_list(tiles: Any) -> bool:
    return isinstance(tiles, (list, tuple)) and all(isinstance(t, (str, Path)) for t in tiles)


def check_positions(positions: Any, count: int, metric: str, owner: str) -> np.ndarray:
    """(count, 2) float64 positions, finite and in range for ``metric``; else a clear error."""
    if metric not in METRICS:
        raise ValueError(
            f"{owner}: metric must be 'haversine' ((lat, lon) in degrees) or 'euclidean' "
            f"(planar metres, e.g. UTM), got {metric!r}"
        )
    if positions is None:
        raise ValueError(
            f"{owner}: the tiles' positions are missing; pass positions=(N, 2) "
            "((lat, lon) degrees or (x, y) metres), or a dataset with a positions attribute"
        )
    p = np.asarray(positions.cpu() if isinstance(positions, Tensor) else positions, np.float64)
    if p.shape != (count, 2):
        raise ValueError(
            f"{owner}: positions must have shape ({count}, 2), one (lat, lon) or (x, y) per "
            f"tile, got {p.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(p).all(1))
    if len(bad):
        raise ValueError(
            f"{owner}: positions are missing (NaN or inf) for {len(bad)} tile(s), at rows "
            f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}; drop those tiles or fill in "
            "their positions"
        )
    if metric == "haversine":
        lat_bad = np.flatnonzero((np.abs(p[:, 0]) > 90) | (np.abs(p[:, 1]) > 180))
        if len(lat_bad):
            raise ValueError(
                f"{owner}: metric='haversine' takes (lat, lon) in degrees, but rows "
                f"{lat_bad[:5].tolist()} are out of range (|lat| <= 90, |lon| <= 180); planar "
                "metres need metric='euclidean'"
            )
    return p
