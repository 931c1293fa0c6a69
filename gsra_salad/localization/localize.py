"""``localize``: where was each photo taken? Top-k tiles, an estimated position, a confidence."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..evaluation import embed, geodesic_distance
from ._tiles import PathImages, Transformed, is_path_list, resolve_transform, view_function
from .index import Backend, GalleryIndex

__all__ = ["ESTIMATES", "Localization", "TileMatch", "estimate_position", "localize"]

ESTIMATES = ("weighted", "top1")
# tiles searched per query for the estimate and the confidence, beyond the k reported
_CANDIDATES = 32


@dataclass
class TileMatch:
    """One retrieved tile: its index in the gallery, id (path), score and position.

    Example:
        >>> TileMatch(3, "tiles/3.png", 0.91, (10.0, 20.0)).to_dict()["path"]
        'tiles/3.png'
    """

    index: int
    path: str
    score: float
    position: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """``{"index", "path", "score", "position"}``, JSON-serialisable."""
        return {**asdict(self), "position": list(self.position)}


@dataclass
class Localization:
    """The answer for one photo.

    Attributes:
        position: the estimated position, (lat, lon) degrees or (x, y) metres (``metric``).
        confidence: the score margin between the best tile and the best tile farther than
            ``radius_m`` from it (0 = a tie between two places; larger = surer). When none of
            the searched candidates lies that far, the margin to the last candidate: a lower
            bound.
        top: the top-k tiles, most similar first.
        metric: ``"haversine"`` or ``"euclidean"``.
        estimate: how ``position`` was obtained (``"weighted"`` or ``"top1"``).
        radius_m: the radius used by the estimate and the confidence, in metres.
        photo: the photo's id (its path) when known.

    Example:
        >>> r = Localization((1.0, 2.0), 0.1, [TileMatch(0, "a", 0.9, (1.0, 2.0))], "euclidean")
        >>> r.to_dict()["x"], json.loads(r.to_json())["top"][0]["path"]
        (1.0, 'a')
    """

    position: tuple[float, float]
    confidence: float
    top: list[TileMatch]
    metric: str
    estimate: str = "weighted"
    radius_m: float = 0.0
    photo: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: ``photo``, ``lat``/``lon`` (haversine) or ``x``/``y``,
        ``confidence``, ``estimate``, ``radius_m`` and ``top`` (each tile's ``path``,
        ``score`` and ``lat``/``lon`` or ``x``/``y``)."""
        a, b = ("lat", "lon") if self.metric == "haversine" else ("x", "y")
        out: dict[str, Any] = {"photo": self.photo} if self.photo is not None else {}
        out.update({a: self.position[0], b: self.position[1], "confidence": self.confidence})
        out["estimate"], out["radius_m"] = self.estimate, self.radius_m
        out["top"] = [
            {"path": t.path, "score": t.score, a: t.position[0], b: t.position[1]} for t in self.top
        ]
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as one line of JSON."""
        return json.dumps(self.to_dict())


def estimate_position(
    scores: Tensor,
    positions: Tensor,
    metric: str,
    *,
    radius_m: float,
    estimate: Literal["weighted", "top1"] = "weighted",
    temperature: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Positions and confidences from each query's ranked candidate tiles.

    The confidence is the margin ``best score - s_far``, where ``s_far`` is the best score of
    a candidate farther than ``radius_m`` from the best tile (with none that far: the last
    candidate's score, and the margin is a lower bound).

    - ``"top1"``: the best tile's position.
    - ``"weighted"``: the weighted mean position of the candidates within ``radius_m`` of the
      best tile. With ``temperature=None`` (default) a tile weighs ``score - s_far`` (at least
      0): how much better it matches than the best place elsewhere, free of the scores'
      scale. With a temperature, it weighs ``exp((score - best) / temperature)``. Positions
      are averaged as given (degrees or metres): fine at the scale of tiles.

    Args:
        scores: (Q, C) candidate scores, descending.
        positions: (Q, C, 2) the candidates' positions.
        metric: ``"haversine"`` or ``"euclidean"``.
        radius_m: radius around the best tile, in metres.
        estimate: ``"weighted"`` or ``"top1"``.
        temperature: ``None`` for margin weights, or the temperature of softmax weights.

    Returns:
        ``(positions (Q, 2) float64, confidences (Q,) float32)``.

    Example:
        >>> s = torch.tensor([[0.9, 0.9, 0.5]])
        >>> p = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [500.0, 0.0]]])
        >>> pos, conf = estimate_position(s, p, "euclidean", radius_m=50.0)
        >>> pos.tolist(), round(conf.item(), 3)
        ([[5.0, 0.0]], 0.4)
        >>> estimate_position(s, p, "euclidean", radius_m=50.0, estimate="top1")[0].tolist()
        [[0.0, 0.0]]
    """
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if (temperature is not None and temperature <= 0) or radius_m < 0:
        raise ValueError("estimate_position: temperature must be > 0 and radius_m >= 0")
    q, c = scores.shape
    positions = positions.to(torch.float64)
    best = positions[:, :1].expand(q, c, 2).reshape(-1, 2)
    dist = geodesic_distance(best, positions.reshape(-1, 2), metric).reshape(q, c)
    near = dist <= radius_m
    far_scores = scores.masked_fill(near, float("-inf")).max(1).values
    fallback = scores.masked_fill(~torch.isfinite(scores), float("inf")).min(1).values
    far = torch.where(torch.isfinite(far_scores), far_scores, fallback)
    confidence = scores[:, 0] - far
    if estimate == "top1":
        return positions[:, 0].clone(), confidence.float()
    if temperature is None:  # scale-free: how much better than the best elsewhere
        weights = (scores.double() - far.double().unsqueeze(1)).clamp(min=0) * near
        weights[:, 0] = weights[:, 0].clamp(min=1e-12)  # the best tile always counts
    else:
        weights = torch.exp((scores.double() - scores[:, :1].double()) / temperature) * near
    weights = weights / weights.sum(1, keepdim=True)
    return (weights.unsqueeze(2) * positions).sum(1), confidence.float()


def _query_dataset(images: Any, model: Any, transform: Any) -> tuple[Dataset, list[str] | None]:
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"localize: images must be (B, 3, H, W), got {tuple(images.shape)}")
        data: Dataset = TensorDataset(images, torch.arange(len(images)))
        return (Transformed(data, transform) if transform is not None else data), None
    if is_path_list(images):
        transform = resolve_transform(model, "query", transform, "localize")
        return PathImages(images, transform), [str(p) for p in images]
    if isinstance(images, Dataset):
        return (Transformed(images, transform) if transform is not None else images), None
    raise TypeError(
        f"localize: images must be a (B, 3, H, W) tensor, a list of paths or a dataset of "
        f"(image, label) items, got {type(images).__name__}"
    )


def localize(
    model: Callable[[Tensor], Tensor],
    index: GalleryIndex,
    images: Tensor | Sequence[str | os.PathLike] | Dataset,
    k: int = 5,
    *,
    estimate: Literal["weighted", "top1"] = "weighted",
    radius_m: float | None = None,
    temperature: float | None = None,
    backend: Backend = "exact",
    transform: Callable[[Tensor], Tensor] | None = None,
    check_fingerprint: bool = True,
    photos: Sequence[str] | None = None,
    **embed_options: Any,
) -> list[Localization]:
    """Geo-localises photos against a gallery index: top-k tiles, a position, a confidence.

    The photos are embedded with ``model`` (query view; :func:`~gsra_salad.evaluation.embed`,
    batched), the index is searched for the best ``max(k, 32)`` tiles, and
    :func:`estimate_position` turns them into a position and a confidence. ``"weighted"`` is
    the default: on the synthetic region it has the lower median error (measured in
    ``docs/localization.md``).

    Args:
        model: the model that built ``index`` (checked by fingerprint) or a callable
            images -> descriptors.
        index: the gallery.
        images: a (B, 3, H, W) tensor (preprocessed, or raw with ``transform``), image paths
            (decoded, then ``transform`` or the model's own query preprocessing), or a dataset
            of ``(image, label)`` items.
        k: tiles reported per photo, 1 <= k <= N.
        estimate: ``"weighted"`` or ``"top1"`` (see :func:`estimate_position`).
        radius_m: radius of the estimate and the confidence in metres; default: twice the
            gallery's tile spacing (:meth:`GalleryIndex.tile_spacing_m`).
        temperature: ``None`` (margin weights) or a softmax temperature, see
            :func:`estimate_position`.
        backend: search backend of :meth:`GalleryIndex.search`.
        transform: preprocessing of one image.
        check_fingerprint: ``False`` skips the model check.
        photos: ids of the photos (default: their paths, if paths were given).
        **embed_options: ``batch_size``, ``device``, ``amp``, ``progress``, ``num_workers``.

    Returns:
        One :class:`Localization` per photo, in order.

    Raises:
        ValueError: a model other than the index's, descriptors of another size, bad k.
        OSError: a photo that is missing or cannot be decoded (named).

    Example:
        >>> net = torch.nn.Flatten()  # one-hot images: unit descriptors
        >>> tiles = torch.eye(12)[:5].view(5, 3, 2, 2)
        >>> index = GalleryIndex.build(net, TensorDataset(tiles, torch.arange(5)),
        ...     [[100.0 * i, 0.0] for i in range(5)], metric="euclidean", progress=False)
        >>> [r] = localize(net, index, tiles[[2]], k=3, progress=False)
        >>> r.top[0].index, r.top[0].score, r.position, len(r.top)
        (2, 1.0, (200.0, 0.0), 3)
    """
    index.check_model(model, check_fingerprint=check_fingerprint)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(index):
        raise ValueError(f"localize: k must be an int in [1, {len(index)}] (the tiles), got {k}")
    dataset, paths = _query_dataset(images, model, transform)
    options = {"progress": False, **embed_options}
    queries, _ = embed(view_function(model, "query"), dataset, **options)
    return locate_descriptors(
        index, queries, k, estimate=estimate, radius_m=radius_m, temperature=temperature,
        backend=backend, photos=photos if photos is not None else paths,
    )  # fmt: skip


def locate_descriptors(
    index: GalleryIndex,
    queries: Tensor,
    k: int,
    *,
    estimate: str = "weighted",
    radius_m: float | None = None,
    temperature: float | None = None,
    backend: Backend = "exact",
    photos: Sequence[str] | None = None,
) -> list[Localization]:
    """:func:`localize` from query descriptors (Q, D) already computed. Private."""
    candidates = min(len(index), max(k, _CANDIDATES))
    scores, ids = index.search(queries, candidates, backend=backend)
    valid = ids >= 0  # faiss-ivf: fewer candidates than asked; they weigh nothing
    ids = torch.where(valid, ids, ids[:, :1])
    scores = scores.masked_fill(~valid, float("-inf"))
    all_pos = torch.from_numpy(index.positions)
    positions = all_pos[ids]
    radius = 2.0 * index.tile_spacing_m() if radius_m is None else float(radius_m)
    where, confidence = estimate_position(
        scores, positions, index.metric, radius_m=radius, estimate=estimate,
        temperature=temperature,
    )  # fmt: skip
    out = []
    for i in range(len(queries)):
        top = [
            TileMatch(int(j), index.paths[int(j)], float(s), tuple(map(float, all_pos[int(j)])))
            for s, j in zip(scores[i, :k].tolist(), ids[i, :k].tolist())
        ]
        out.append(
            Localization(
                position=(float(where[i, 0]), float(where[i, 1])),
                confidence=float(confidence[i]),
                top=top,
                metric=index.metric,
                estimate=estimate,
                radius_m=radius,
                photo=None if photos is None else str(photos[i]),
            )
        )
    return out
