"""Retrieval evaluation of cross-view geo-localisation. Imports no model code.

- :func:`evaluate_retrieval`: Recall@k, Recall@1% and (University-1652) AP under the CVUSA/CVACT
  and the official University-1652 protocols, streamed in query chunks, with an optional
  localisation error and an optional FAISS backend;
- :func:`embed`: descriptors and labels of an evaluation set from any model or callable, on one
  or many processes;
- :func:`search`: the top-k references of every query, streamed;
- :func:`save_retrieval_grid`: a PNG of queries and their top-k references;
- the metrics as pure functions of positions: :func:`recall_at_k`, :func:`average_precision`,
  :func:`geodesic_distance`.

See ``docs/evaluation.md`` for the protocols.
"""

from .embed import embed
from .grid import save_retrieval_grid
from .metrics import average_precision, geodesic_distance, recall_at_k
from .retrieval import evaluate_retrieval
from .streaming import search

__all__ = [
    "average_precision",
    "embed",
    "evaluate_retrieval",
    "geodesic_distance",
    "recall_at_k",
    "save_retrieval_grid",
    "search",
]
