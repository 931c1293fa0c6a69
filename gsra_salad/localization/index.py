"""``GalleryIndex``: the descriptors, positions and ids of a region's geo-tagged tiles."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._version import __version__
from ..evaluation import embed, geodesic_distance
from ..evaluation.retrieval import _all_finite
from . import _backends
from ._tiles import (
    PathImages,
    Transformed,
    check_positions,
    is_path_list,
    model_fingerprint,
    resolve_transform,
    view_function,
)

__all__ = ["FORMAT_VERSION", "GalleryIndex", "model_fingerprint"]

logger = logging.getLogger(__name__)

FORMAT = "gsra_salad.gallery_index"
FORMAT_VERSION = 1
BACKENDS = ("exact", "faiss-exact", "faiss-ivf")
Backend = Literal["exact", "faiss-exact", "faiss-ivf"]
_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_APPROX = "approximate"


class GalleryIndex:
    """The geo-tagged tiles of a region, embedded once: descriptors, positions, ids, metric.

    Holds per tile a descriptor (float16 by default), a position — ``(lat, lon)`` in degrees
    with ``metric="haversine"`` or ``(x, y)`` in planar metres with ``metric="euclidean"`` — and
    an id (its path); plus the :func:`model_fingerprint` of the model that built it, which
    :meth:`check_model` compares with the model asking (see ``docs/localization.md``).

    Build it with :meth:`build` (from a model and tiles) or from descriptors; :meth:`add` and
    :meth:`add_descriptors` append tiles; :meth:`save` writes a directory atomically and
    :meth:`load` reads it memory-mapped, so a gallery larger than RAM is searched exactly by
    streaming it from disk. :meth:`search` offers ``"exact"`` (streamed, torch),
    ``"faiss-exact"`` (``IndexFlatIP``) and ``"faiss-ivf"`` (approximate: PCA + inverted file,
    for large galleries; the ``faiss`` extra).

    Args:
        descriptors: (N, D) float16 or float32 array or tensor (L2-normalised, as models give).
        positions: (N, 2) positions of the tiles.
        paths: N tile ids (paths relative to wherever the caller keeps the tiles).
        metric: ``"haversine"`` or ``"euclidean"``, as in
            :func:`~gsra_salad.evaluation.geodesic_distance`.
        fingerprint: the fingerprint of the model that computed the descriptors, or ``None``.

    Attributes:
        info: free JSON-serialisable notes saved with the index (the command line records
            the checkpoint and the tiles' folder there).

    Shape:
        - descriptors: (N, D); positions: (N, 2)

    Example:
        >>> d = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> index = GalleryIndex(d, [[0.0, 100.0 * i] for i in range(6)],
        ...                      [f"t{i}.png" for i in range(6)], metric="euclidean")
        >>> scores, ids = index.search(d[[4]], k=2)
        >>> len(index), index.dim, ids[0, 0].item(), index.paths[4]
        (6, 8, 4, 't4.png')
    """

    def __init__(
        self,
        descriptors: np.ndarray | Tensor,
        positions: Any,
        paths: Sequence[str],
        *,
        metric: Literal["haversine", "euclidean"],
        fingerprint: str | None = None,
    ) -> None:
        array = _as_descriptor_array(descriptors, "GalleryIndex")
        self._parts: list[np.ndarray] = [array]
        self._positions = check_positions(positions, len(array), metric, "GalleryIndex")
        self._paths = _as_paths(paths, len(array), "GalleryIndex")
        self._metric = metric
        self._fingerprint = fingerprint
        self._spacing: float | None = None
        self._faiss: dict[str, Any] = {}
        self.info: dict[str, Any] = {}

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: Callable[[Tensor], Tensor],
        tiles: Dataset | Sequence[str | os.PathLike],
        positions: Any = None,
        *,
        metric: Literal["haversine", "euclidean"],
        paths: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype = torch.float16,
        fingerprint: str | None = None,
        **embed_options: Any,
    ) -> GalleryIndex:
        """Embeds the tiles with ``model`` (reference view) and indexes them.

        Embedding is :func:`gsra_salad.evaluation.embed`: batched, optionally under autocast,
        with a progress bar, and sharded across ranks under ``torchrun`` (every rank returns
        the whole gallery; save it on rank 0).

        Args:
            model: a ``CrossViewGeoLocalizer`` (its ``embed(images, view="reference")`` is
                used) or any callable mapping images (B, 3, H, W) to descriptors (B, D).
            tiles: image paths (decoded with Pillow, then ``transform``), or a dataset of
                ``(image, label)`` items (``transform``, if given, is applied to each image).
            positions: (N, 2); default: the dataset's ``positions`` attribute.
            metric: ``"haversine"`` ((lat, lon) degrees) or ``"euclidean"`` (planar metres).
            paths: N tile ids; default: the paths given, the dataset's ``paths``, or "0", "1"...
            transform: preprocessing of one image; default (for paths): the model's own for
                the reference view (``gsra_salad.data.create_transform``).
            dtype: ``torch.float16`` (default, half the bytes) or ``torch.float32``.
            fingerprint: the model's fingerprint; default: :func:`model_fingerprint` (``None``
                for a plain callable).
            **embed_options: ``batch_size``, ``device``, ``amp``, ``progress``,
                ``num_workers`` of :func:`~gsra_salad.evaluation.embed`.

        Returns:
            The index, in memory.

        Raises:
            ValueError: missing or bad positions, an unknown metric, an unsupported dtype, no
                transform available for image paths.
            OSError: a tile image that is missing or cannot be decoded (named).

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> tiles = TensorDataset(torch.rand(4, 3, 8, 8), torch.arange(4))
            >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16))
            >>> index = GalleryIndex.build(net, tiles, torch.rand(4, 2) * 100, metric="euclidean",
            ...                            progress=False)
            >>> len(index), index.dtype, index.fingerprint == model_fingerprint(net)
            (4, dtype('float16'), True)
        """
        descriptors, paths = _embed_tiles(
            model, tiles, paths, transform, dtype, embed_options, "GalleryIndex.build"
        )
        if positions is None:
            positions = getattr(tiles, "positions", None)
        if fingerprint is None:
            fingerprint = model_fingerprint(model)
        return cls(descriptors, positions, paths, metric=metric, fingerprint=fingerprint)

    def add(
        self,
        model: Callable[[Tensor], Tensor],
        tiles: Dataset | Sequence[str | os.PathLike],
        positions: Any = None,
        *,
        paths: Sequence[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        check_fingerprint: bool = True,
        **embed_options: Any,
    ) -> GalleryIndex:
        """Embeds more tiles with ``model`` and appends them (arguments as in :meth:`build`).

        Args:
            model: the model that built the index (checked, see :meth:`check_model`).
            tiles: image paths or a dataset of ``(image, label)`` items.
            positions: (M, 2) in the index's metric; default: the dataset's ``positions``.
            paths: M tile ids.
            transform: preprocessing of one image (default: the model's own).
            check_fingerprint: ``False`` skips the model check (you vouch for the model).
            **embed_options: as in :meth:`build`.

        Returns:
            ``self``, with M more tiles.

        Raises:
            ValueError: a model other than the index's, bad positions.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
            >>> tiles = TensorDataset(torch.rand(3, 3, 2, 2), torch.arange(3))
            >>> index = GalleryIndex.build(net, tiles, torch.zeros(3, 2), metric="euclidean",
            ...                            progress=False)
            >>> len(index.add(net, tiles, torch.ones(3, 2), paths=["a", "b", "c"], progress=False))
            6
        """
        self.check_model(model, check_fingerprint=check_fingerprint)
        descriptors, paths = _embed_tiles(
            model, tiles, paths, transform, _TORCH_DTYPE[self.dtype.type], embed_options,
            "GalleryIndex.add",
        )  # fmt: skip
        if positions is None:
            positions = getattr(tiles, "positions", None)
        return self.add_descriptors(descriptors, positions, paths)

    def add_descriptors(
        self, descriptors: np.ndarray | Tensor, positions: Any, paths: Sequence[str]
    ) -> GalleryIndex:
        """Appends tiles whose descriptors are already computed (by the index's model).

        Args:
            descriptors: (M, D), converted to the index's dtype.
            positions: (M, 2) in the index's metric.
            paths: M tile ids.

        Returns:
            ``self``. Approximate search structures built before are dropped (rebuilt on use).

        Raises:
            ValueError: a descriptor size other than the index's D, bad positions.

        Example:
            >>> index = GalleryIndex(torch.eye(3), torch.zeros(3, 2), ["a", "b", "c"],
            ...                      metric="euclidean")
            >>> len(index.add_descriptors(torch.eye(3)[:1], [[5.0, 5.0]], ["d"]))
            4
        """
        owner = "GalleryIndex.add_descriptors"
        array = _as_descriptor_array(descriptors, owner).astype(self.dtype, copy=False)
        if array.shape[1] != self.dim:
            raise ValueError(
                f"{owner}: descriptors have D = {array.shape[1]}, the index holds D = {self.dim}"
                "; they come from another model"
            )
        new_positions = check_positions(positions, len(array), self._metric, owner)
        new_paths = _as_paths(paths, len(array), owner)
        self._parts.append(array)
        self._positions = np.concatenate([self._positions, new_positions])
        self._paths += new_paths
        self._spacing = None
        self._faiss.clear()
        return self

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex({len(self)} tiles, D={self.dim}, {self.dtype}, metric={self._metric!r},"
            f" fingerprint={self._fingerprint!r})"
        )

    @property
    def dim(self) -> int:
        """D, the descriptor size."""
        return int(self._parts[0].shape[1])

    @property
    def dtype(self) -> np.dtype:
        """The stored descriptors' numpy dtype (float16 or float32)."""
        return self._parts[0].dtype

    @property
    def metric(self) -> str:
        """``"haversine"`` ((lat, lon) degrees) or ``"euclidean"`` (planar metres)."""
        return self._metric

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the model that built the index (``None``: a plain callable)."""
        return self._fingerprint

    @property
    def positions(self) -> np.ndarray:
        """(N, 2) float64 positions of the tiles."""
        return self._positions

    @property
    def paths(self) -> list[str]:
        """The N tile ids (paths)."""
        return self._paths

    @property
    def descriptors(self) -> np.ndarray:
        """(N, D) descriptors: the memory-mapped array after :meth:`load` (no copy); after
        :meth:`add` on a loaded index, a concatenation in memory."""
        return self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the parts: ``{"descriptors", "positions", "approximate"}`` (the last for a
        built ``faiss-ivf`` index, in RAM; 0 otherwise)."""
        approx = self._faiss.get(_APPROX)
        return {
            "descriptors": int(sum(p.nbytes for p in self._parts)),
            "positions": int(self._positions.nbytes),
            "approximate": _backends.ivf_bytes(approx) if approx is not None else 0,
        }

    def tile_spacing_m(self) -> float:
        """Median distance (metres) from a tile to its nearest other tile, estimated on up to
        64 tiles (cached; saved with the index). 0.0 for a one-tile gallery."""
        if self._spacing is None:
            self._spacing = _spacing(self._positions, self._metric)
        return self._spacing

    # -- the model check -------------------------------------------------------------------------

    def check_model(self, model: Any, *, check_fingerprint: bool = True) -> None:
        """Raises unless ``model`` is the model that built the index (same fingerprint).

        Args:
            model: the model about to embed queries or tiles.
            check_fingerprint: ``False`` skips the check (e.g. a plain callable you know
                computes the index's descriptors, or a deliberate comparison of models).

        Raises:
            ValueError: the fingerprints differ, naming both and the override.

        Example:
            >>> net = torch.nn.Linear(4, 4)
            >>> index = GalleryIndex(torch.eye(4), torch.zeros(4, 2), list("abcd"),
            ...                      metric="euclidean", fingerprint=model_fingerprint(net))
            >>> index.check_model(net)  # the same weights: fine
        """
        if not check_fingerprint:
            return
        got = model_fingerprint(model)
        if got == self._fingerprint:
            return
        if got is None:
            what = "a plain callable, which has no fingerprint"
        else:
            what = f"a model with fingerprint {got[:19]}..."
        built = "a plain callable" if self._fingerprint is None else self._fingerprint[:19] + "..."
        raise ValueError(
            f"this gallery index was built by {built}, but it is being used with {what}: its "
            "descriptors would not be comparable. Use the model that built the index (same "
            "config and weights), rebuild the index with this model, or pass "
            "check_fingerprint=False if you know the two compute the same descriptors"
        )

    # -- search ----------------------------------------------------------------------------------

    def search(
        self,
        query_descriptors: Tensor,
        k: int = 5,
        *,
        backend: Backend = "exact",
        nprobe: int | None = None,
        rerank: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` most similar tiles of each query (inner product).

        Args:
            query_descriptors: (Q, D) float tensor (any device; searched on the CPU).
            k: tiles per query, 1 <= k <= N.
            backend: ``"exact"`` (streamed from memory or disk, torch), ``"faiss-exact"``
                (``IndexFlatIP`` on a float32 copy of the gallery: 4 N D bytes of RAM) or
                ``"faiss-ivf"`` (approximate; built on first use with
                :meth:`build_approximate`'s defaults unless built before).
            nprobe: ``faiss-ivf`` only: inverted lists visited per query (default: the one
                chosen at build time).
            rerank: ``faiss-ivf`` only: re-score the approximate top ``max(k, rerank)``
                exactly (from the stored descriptors) and keep the best k; 0: the top k.

        Returns:
            ``(scores (Q, k) float32, indices (Q, k) int64)``, most similar first. With
            ``faiss-ivf`` the scores are exact (recomputed from the stored descriptors) and a
            query with fewer than k candidates gets index -1 and score -inf at the end.

        Raises:
            ValueError: an unknown backend, bad descriptors (shape, D, NaN) or k.
            ImportError: a FAISS backend without the ``faiss`` extra.

        Example:
            >>> index = GalleryIndex(torch.eye(3), torch.zeros(3, 2), ["a", "b", "c"],
            ...                      metric="euclidean")
            >>> index.search(torch.tensor([[0.2, 0.9, 0.1]]), k=2)[1]
            tensor([[1, 0]])
        """
        queries = self._check_queries(query_descriptors, k, backend)
        if backend == "exact":
            return _backends.exact_search(self._parts, queries, k)
        if backend == "faiss-exact":
            if "flat" not in self._faiss:
                self._faiss["flat"] = _backends.flat_index(self._parts, self.dim)
            return _backends.faiss_search(self._faiss["flat"], queries, k)
        if _APPROX not in self._faiss:
            self.build_approximate()
        return self._faiss[_APPROX].search(self._parts, queries, k, nprobe, rerank)

    def build_approximate(
        self,
        *,
        encoding: Literal["flat", "sq8", "pq"] = "sq8",
        pca_dim: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Builds (or rebuilds) the ``faiss-ivf`` index: PCA, then an inverted file.

        A PCA to ``pca_dim`` dimensions is trained on up to 16,384 sampled tiles; one streamed
        pass over the stored descriptors projects every tile (held as float16 while building:
        N x pca_dim x 2 bytes); ``nlist`` k-means cells are trained on ``train_size`` of the
        projections, then every projection is added. The defaults come from the gallery size
        (``docs/localization.md`` has the measurements behind them): ``pca_dim = min(D,
        256)``, ``nlist`` = the power of two nearest sqrt(N) (at most N / 39), ``nprobe =
        max(32, nlist / 16)`` capped at nlist, ``train_size = min(N, max(64 nlist, 20000))``.

        Args:
            encoding: ``"sq8"`` (one byte a dimension, default), ``"flat"`` (float32) or
                ``"pq"`` (``pca_dim / 8`` bytes a tile).
            pca_dim: projected dimension.
            nlist: number of inverted lists (k-means cells).
            nprobe: lists visited per query by default.
            train_size: projected tiles sampled to train the k-means.
            seed: seed of the sample, the PCA and k-means.

        Returns:
            The parameters used.

        Raises:
            ImportError: without the ``faiss`` extra.
            ValueError: an unknown encoding.
        """
        if encoding not in _backends.ENCODINGS:
            raise ValueError(
                f"GalleryIndex.build_approximate: encoding must be one of "
                f"{_backends.ENCODINGS}, got {encoding!r}"
            )
        ivf = _backends.build_ivf(
            self._parts, len(self), self.dim, encoding=encoding, seed=seed,
            pca_dim=pca_dim, nlist=nlist, nprobe=nprobe, train_size=train_size,
        )  # fmt: skip
        self._faiss[_APPROX] = ivf
        logger.info("built the approximate index: %s", ivf.params)
        return dict(ivf.params)

    def _check_queries(self, queries: Any, k: int, backend: str) -> Tensor:
        owner = "GalleryIndex.search"
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(queries, Tensor) or queries.dim() != 2 or not queries.is_floating_point():
            shape = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
            raise ValueError(
                f"{owner}: query_descriptors must be a (Q, D) float tensor, got {shape}"
            )
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"{owner}: query descriptors have D = {queries.shape[1]}, the index holds "
                f"D = {self.dim}: embed the queries with the model that built the index"
            )
        if not _all_finite(queries):
            raise ValueError(f"{owner}: query_descriptors hold NaN or inf")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f"{owner}: k must be an int in [1, {len(self)}] (the tiles), got {k}")
        return queries.detach().to("cpu", torch.float32)

    # -- storage ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to ``directory``, atomically.

        Everything is written to a temporary directory beside it, which then replaces
        ``directory`` by a rename: a crash leaves the old index (or none), never half of one.
        Files: ``meta.json`` (format version, count, D, dtype, metric, fingerprint),
        ``descriptors.npy``, ``positions.npy``, ``tiles.json`` and, if built,
        ``approximate.faiss`` / ``approximate.npz``.

        Args:
            directory: the index directory; an existing gallery index there is replaced, any
                other non-empty directory is refused.

        Returns:
            ``directory``.

        Raises:
            ValueError: ``directory`` holds something other than a gallery index.

        Example:
            >>> import tempfile, os
            >>> index = GalleryIndex(torch.eye(3), torch.zeros(3, 2), ["a", "b", "c"],
            ...                      metric="euclidean")
            >>> with tempfile.TemporaryDirectory() as d:
            ...     loaded = GalleryIndex.load(index.save(os.path.join(d, "index")))
            ...     len(loaded), type(loaded.descriptors).__name__
            (3, 'memmap')
        """
        target = Path(directory)
        if target.exists() and any(target.iterdir()) and not (target / "meta.json").is_file():
            raise ValueError(
                f"GalleryIndex.save: {target} exists and is not a gallery index; choose a new or "
                "empty directory (an existing index there would be replaced)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            self._write(tmp)
            _replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _write(self, directory: Path) -> None:
        out = np.lib.format.open_memmap(
            directory / "descriptors.npy", mode="w+", dtype=self.dtype, shape=(len(self), self.dim)
        )
        for offset, block in _backends.iter_blocks(self._parts, _backends.block_rows(self.dim)):
            out[offset : offset + len(block)] = block
        out.flush()
        del out
        np.save(directory / "positions.npy", self._positions)
        (directory / "tiles.json").write_text(json.dumps(self._paths))
        approx = self._faiss.get(_APPROX)
        if approx is not None:
            _backends.write_ivf(approx, str(directory / _APPROX))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "gsra_salad_version": __version__,
            "count": len(self),
            "dim": self.dim,
            "dtype": str(self.dtype),
            "metric": self._metric,
            "fingerprint": self._fingerprint,
            "tile_spacing_m": self._spacing,
            "approximate": None if approx is None else approx.params,
            "info": self.info,
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> GalleryIndex:
        """Reads an index written by :meth:`save`; descriptors memory-mapped by default.

        Args:
            directory: the index directory.
            mmap: map ``descriptors.npy`` read-only (``numpy`` ``mmap_mode="r"``) instead of
                reading it into memory: the gallery may be larger than RAM.

        Returns:
            The index.

        Raises:
            FileNotFoundError: no index there.
            ValueError: an empty, corrupted or truncated index, or a newer format version.

        Example:
            See :meth:`save`.
        """
        return _load(cls, Path(directory), mmap)


_TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32}


def _as_descriptor_array(descriptors: Any, owner: str) -> np.ndarray:
    if isinstance(descriptors, Tensor):
        if descriptors.dtype not in _DTYPES:
            descriptors = descriptors.float()
        descriptors = descriptors.detach().cpu().numpy()
    array = descriptors if isinstance(descriptors, np.ndarray) else np.asarray(descriptors)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"{owner}: descriptors must be a non-empty (N, D) array, got {array.shape}"
        )
    if array.dtype not in (np.float16, np.float32):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{owner}: descriptors must be floating point, got {array.dtype}")
        array = array.astype(np.float32)
    return array


def _as_paths(paths: Any, count: int, owner: str) -> list[str]:
    out = [str(p) for p in paths]
    if len(out) != count:
        raise ValueError(f"{owner}: got {len(out)} paths for {count} tiles; give one id per tile")
    return out


def _embed_tiles(model, tiles, paths, transform, dtype, options, owner):
    if dtype not in _DTYPES:
        raise ValueError(f"{owner}: dtype must be torch.float16 or torch.float32, got {dtype}")
    if is_path_list(tiles):
        if paths is None:
            paths = [str(p) for p in tiles]
        transform = resolve_transform(model, "reference", transform, owner)
        dataset: Any = PathImages(tiles, transform)
    elif isinstance(tiles, Dataset):
        if paths is None:
            known = getattr(tiles, "paths", None)
            paths = [str(p) for p in known] if known is not None else None
        dataset = Transformed(tiles, transform) if transform is not None else tiles
    else:
        raise TypeError(
            f"{owner}: tiles must be a list of image paths or a dataset of (image, label) items, "
            f"got {type(tiles).__name__}"
        )
    descriptors, _ = embed(view_function(model, "reference"), dataset, dtype=dtype, **options)
    if paths is None:
        paths = [str(i) for i in range(len(descriptors))]
    return descriptors.cpu(), paths


def _spacing(positions: np.ndarray, metric: str) -> float:
    n = len(positions)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=min(n, 64), replace=False)
    everything = torch.from_numpy(positions)
    nearest = []
    for i in sample.tolist():
        best = float("inf")
        for start in range(0, n, 2**16):
            block = everything[start : start + 2**16]
            d = geodesic_distance(everything[i].expand_as(block), block, metric)
            if start <= i < start + len(block):
                d[i - start] = float("inf")
            best = min(best, float(d.min()))
        nearest.append(best)
    return float(np.median(nearest))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Moves ``tmp`` to ``target``; an old index there is moved aside first, then removed."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a gallery index (no meta.json); build one with "
            "GalleryIndex.build(...).save(directory) or the 'index' command"
        )
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{meta_path} is corrupted or not a gallery index ({err})") from err
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format version {meta.get('version')!r}; this gsra_salad reads "
            f"versions up to {FORMAT_VERSION}: upgrade gsra_salad"
        )
    if not meta.get("count"):
        raise ValueError(f"{directory}: the gallery index is empty (0 tiles); rebuild it")
    return meta


def _load(cls: type[GalleryIndex], directory: Path, mmap: bool) -> GalleryIndex:
    meta = _read_meta(directory)
    try:
        descriptors = np.load(directory / "descriptors.npy", mmap_mode="r" if mmap else None)
        positions = np.load(directory / "positions.npy")
        paths = json.loads((directory / "tiles.json").read_text())
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(
            f"{directory}: the gallery index is corrupted or truncated ({type(err).__name__}: "
            f"{err}); rebuild it"
        ) from err
    expected = (meta["count"], meta["dim"])
    if descriptors.shape != expected or str(descriptors.dtype) != meta["dtype"]:
        raise ValueError(
            f"{directory}: descriptors.npy holds {descriptors.shape} {descriptors.dtype}, "
            f"meta.json says {expected} {meta['dtype']}: the index is corrupted; rebuild it"
        )
    if positions.shape != (meta["count"], 2) or len(paths) != meta["count"]:
        raise ValueError(
            f"{directory}: positions.npy or tiles.json do not hold {meta['count']} tiles: the "
            "index is corrupted; rebuild it"
        )
    index = cls.__new__(cls)
    index._parts = [descriptors]
    index._positions = check_positions(positions, meta["count"], meta["metric"], str(directory))
    index._paths = [str(p) for p in paths]
    index._metric = meta["metric"]
    index._fingerprint = meta.get("fingerprint")
    index._spacing = meta.get("tile_spacing_m")
    index._faiss = {}
    index.info = dict(meta.get("info") or {})
    if meta.get("approximate") and (directory / f"{_APPROX}.faiss").is_file():
        try:
            index._faiss[_APPROX] = _backends.read_ivf(
                str(directory / _APPROX), meta["approximate"]
            )
        except ImportError:
            logger.warning("%s has an approximate index but faiss is not installed", directory)
    return index
