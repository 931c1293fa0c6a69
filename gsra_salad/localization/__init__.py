"""Geo-localisation of new photos against a saved gallery of geo-tagged tiles.

Sits on top of the package: imports models, data and evaluation.

- :class:`GalleryIndex`: a region's tiles embedded once (descriptors, positions, ids, the
  model's fingerprint), saved atomically, loaded memory-mapped, searched exactly (streamed, or
  FAISS ``IndexFlatIP``) or approximately (FAISS PCA + IVF);
- :func:`localize`: top-k tiles, an estimated position and a confidence for each photo, as
  :class:`Localization` results that serialise to JSON;
- :func:`model_fingerprint`: the hash of a model's config and weights that ties an index to it;
- ``gsra_salad.localization.cli``: the ``index`` and ``locate`` commands.

See ``docs/localization.md``.
"""

from .index import FORMAT_VERSION, GalleryIndex, model_fingerprint
from .localize import ESTIMATES, Localization, TileMatch, estimate_position, localize

__all__ = [
    "ESTIMATES",
    "FORMAT_VERSION",
    "GalleryIndex",
    "Localization",
    "TileMatch",
    "estimate_position",
    "localize",
    "model_fingerprint",
]
