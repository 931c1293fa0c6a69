"""``evaluate_retrieval``: Recall@k, Recall@1%, AP and localisation error, streamed."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .metrics import average_precision, geodesic_distance, localisation_summary, recall_at_k
from .streaming import streaming_positions, true_match_indices

__all__ = ["JUNK_LABEL", "evaluate_retrieval"]

JUNK_LABEL = -1
PROTOCOLS = ("cvusa", "university1652")
DISTRACTORS = ("keep", "drop")
BACKENDS = ("torch", "faiss")
POSITION_METRICS = ("euclidean", "haversine")
TIES = ("pessimistic", "optimistic")
# descriptors whose rows all agree to within this fraction of their largest magnitude are
# reported as constant (a collapsed model)
CONSTANT_RTOL = 1e-4
# warn when more than this share of the queries have a true match tied with a wrong reference
TIED_SHARE = 0.01

Protocol = Literal["cvusa", "university1652"]


def _check_descriptors(query: Any, reference: Any, *, owner: str) -> None:
    for name, t in (("query_descriptors", query), ("reference_descriptors", reference)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{owner}: {name} must be floating point, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{owner}: {name} must have shape (N, D), got {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{owner}: {name} is empty (shape {tuple(t.shape)})")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"{owner}: query_descriptors and reference_descriptors must have the same dimension "
            f"D, got {query.shape[1]} and {reference.shape[1]}"
        )
    if query.device != reference.device:
        raise ValueError(
            f"{owner}: query_descriptors is on {query.device} and reference_descriptors on "
            f"{reference.device}; move both to one device"
        )
    for name, t in (("query_descriptors", query), ("reference_descriptors", reference)):
        if not _all_finite(t):
            raise ValueError(f"{owner}: {name} holds NaN or inf")


def _all_finite(t: Tensor) -> bool:
    """Row sums propagate NaN and inf and cost one read of the data (``torch.isfinite`` is
    several times slower on the CPU); only a non-finite sum, which huge finite values can also
    give, is confirmed element by element. Chunked: no mask as large as the descriptors."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    for part in t.split(max(1, 2**24 // t.shape[1])):
        if not bool(torch.isfinite(part.sum(dim=1, dtype=dtype)).all()):
            if not bool(torch.isfinite(part).all()):
                return False
    return True


def _constant_spread(t: Tensor) -> float | None:
    """The largest per-dimension spread (max - min over rows) of ``t`` relative to its largest
    magnitude when that is at most :data:`CONSTANT_RTOL` (every row nearly equal to the
    first), else None. One chunked pass over the rows."""
    lo = hi = None
    for part in t.split(max(1, 2**24 // t.shape[1])):
        p_lo, p_hi = part.amin(dim=0), part.amax(dim=0)
        lo = p_lo if lo is None else torch.minimum(lo, p_lo)
        hi = p_hi if hi is None else torch.maximum(hi, p_hi)
    lo, hi = lo.double(), hi.double()
    scale = float(torch.maximum(lo.abs(), hi.abs()).max())
    spread = float((hi - lo).max())
    if spread > CONSTANT_RTOL * scale:
        return None
    return spread / scale if scale > 0 else 0.0


def _warn_if_constant(query: Tensor, reference: Tensor, owner: str) -> bool:
    """One UserWarning naming the descriptors whose rows are (nearly) identical; True if so."""
    found = []
    for name, t in (("query_descriptors", query), ("reference_descriptors", reference)):
        spread = _constant_spread(t) if t.shape[0] > 1 else None
        if spread is not None:
            found.append(f"the {t.shape[0]} rows of {name} (largest spread {spread:.1e})")
    if found:
        warnings.warn(
            f"{owner}: {' and '.join(found)} are (nearly) identical: they agree to within "
            f"{CONSTANT_RTOL:g} of their largest magnitude. The model has probably collapsed "
            "to a constant output, and the metrics say little about it; exactly equal "
            "similarities count against the true match by default (ties='pessimistic'), so a "
            "fully collapsed model scores 0, not 100. Check the model and its training "
            "(learning rate, normalisation, untrained or frozen weights)",
            UserWarning,
            stacklevel=3,
        )
    return bool(found)


def _warn_if_tied(tied: Tensor, ties: str, owner: str) -> None:
    """A UserWarning when many true matches tie exactly with a wrong reference."""
    count = int(tied.sum())
    if count > TIED_SHARE * tied.numel():
        warnings.warn(
            f"{owner}: {count} of the {tied.numel()} queries ({100 * count / tied.numel():.1f}%) "
            "have a wrong reference exactly as similar as their true match, so the metrics "
            f"depend on the tie rule (ties={ties!r}). With informative float descriptors exact "
            "ties are rare; this many mean that the similarities take few distinct values: the "
            "descriptors are nearly collapsed (e.g. an untrained model, whose cosines may all "
            "lie within 1e-4 of 1) or coarsely quantised",
            UserWarning,
            stacklevel=3,
        )


def _as_labels(labels: Any, name: str, length: int, device: torch.device) -> Tensor:
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"evaluate_retrieval: {name} must be a sequence of integers") from error
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"evaluate_retrieval: {name} must hold integers, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"evaluate_retrieval: {name} must have shape ({length},) (one label per descriptor), "
            f"got {tuple(t.shape)}"
        )
    return t.to(device=device, dtype=torch.long)


def _as_positions(positions: Any, name: str, length: int) -> Tensor:
    t = torch.as_tensor(positions, dtype=torch.float64)
    if t.shape != (length, 2):
        raise ValueError(
            f"evaluate_retrieval: {name} must have shape ({length}, 2), got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"evaluate_retrieval: {name} holds NaN or inf")
    return t


def _preview(values: Tensor) -> str:
    shown = values[:5].tolist()
    more = f" and {len(values) - 5} more" if len(values) > 5 else ""
    return f"{shown}{more}"


def evaluate_retrieval(
    query_descriptors: Tensor,
    reference_descriptors: Tensor,
    query_labels: Tensor | Sequence[int],
    reference_labels: Tensor | Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
    protocol: Protocol = "cvusa",
    distractors: Literal["keep", "drop"] = "keep",
    query_positions: Tensor | None = None,
    reference_positions: Tensor | None = None,
    position_metric: Literal["euclidean", "haversine"] | None = None,
    chunk_size: int | None = None,
    backend: Literal["torch", "faiss"] = "torch",
    ties: Literal["pessimistic", "optimistic"] = "pessimistic",
    clip_ks: bool = False,
    one_percent: Literal["floor", "lrfr"] = "floor",
) -> dict[str, float]:
    """Retrieval metrics of cross-view geo-localisation, streamed in query chunks.

    Similarity is the inner product (the cosine for L2-normalised descriptors, as the models
    output). The query x reference matrix is never formed: each chunk of ``chunk_size`` queries
    is scored against the whole gallery (memory O(chunk_size x R)) and the positions of its
    true matches are counted exactly. Descriptors may be stored in float16/bfloat16 (scores
    are computed in float32) on any device. See ``docs/evaluation.md`` for the protocols.

    - ``protocol="cvusa"`` (CVUSA, CVACT): each query has exactly one true reference, the one
      with its label; its rank is the number of other references at least as similar
      (``ties="pessimistic"``, the default) or strictly more similar (``ties="optimistic"``,
      Sample4Geo's rule). ``R@k`` = share of queries with rank < k.
    - ``protocol="university1652"``: the official University-1652 CMC and AP. True matches are
      the gallery items with the query's label; items labelled -1 are junk and removed from the
      ranking; gallery buildings absent from the queries (distractors) stay in the ranking.
      ``R@k`` = CMC[k - 1] (first true match in the top k). Among equally similar items the
      true matches come after the wrong ones (``ties="pessimistic"``) or before them
      (``ties="optimistic"``). A query without any true match counts as a miss with AP 0, and
      stays in the denominator, as in the official code. ``distractors="drop"`` instead marks
      every gallery item whose label no query has as junk: the variant of some public code
      (e.g. LRFR's ``U1652DatasetEval(sample_ids=...)``), which is NOT the official protocol
      and scores higher.

    ``R@1%`` uses k = max(1, ⌊R/100⌋), R the number of gallery items left after junk removal
    (``one_percent="floor"``); ``one_percent="lrfr"`` reports LRFR's "Recall@top1%" instead,
    ``CMC[round(R/100)]`` (Python's ``round``), i.e. k = round(R/100) + 1: one position later.

    Ties are exactly equal similarities as computed. The default rule never rewards them: a
    collapsed model whose descriptors are all equal scores 0, not 100%, and a warning says
    that the descriptors are (nearly) constant. ``ties="optimistic"`` reproduces
    the published code for comparison with published numbers. With informative float
    descriptors exact ties are rare and both rules give the same numbers; a nearly collapsed
    (e.g. untrained) model can tie often (``docs/evaluation.md``, "Ties"). Both backends
    apply the same rule.

    Args:
        query_descriptors: (Q, D) float tensor.
        reference_descriptors: (R, D) float tensor on the same device.
        query_labels: (Q,) integer location ids.
        reference_labels: (R,) integer location ids; -1 marks junk (``university1652``).
        ks: the cut-offs k of ``R@k``, each in [1, R] (R: the gallery after junk removal).
        clip_ks: accept ks beyond the gallery: ``R@k`` for k >= R is then ``R@R`` (every match
            is in the top k), under the requested key (a 3-image gallery reports ``R@5`` and
            ``R@10``); otherwise such a k is an error.
        protocol: ``"cvusa"`` or ``"university1652"``.
        distractors: ``"keep"`` (official) or ``"drop"`` (``university1652`` only).
        query_positions: optional (Q, 2) positions of the queries, to report the localisation
            error of the top-1 reference.
        reference_positions: (R, 2) positions of the references, with ``query_positions``.
        position_metric: how positions are compared: ``"euclidean"`` (planar metres, e.g.
            UTM) or ``"haversine"`` ((latitude, longitude) in degrees). Required with positions.
        chunk_size: queries per similarity block; default: about 2**25 block elements
            (128 MiB in float32), and at most 2**24 / D queries.
        backend: ``"torch"`` (built-in) or ``"faiss"`` (exact ``IndexFlatIP``, the ``faiss``
            extra; see ``docs/evaluation.md``).
        ties: where a true match goes among references exactly as similar:
            ``"pessimistic"`` (after them) or ``"optimistic"`` (before them, as Sample4Geo
            counts; the University-1652 code leaves their order to ``np.argsort``).
        one_percent: how ``R@1%`` is defined: ``"floor"`` (k = max(1, ⌊R/100⌋)) or
            ``"lrfr"`` (LRFR's ``CMC[round(R/100)]``, k = round(R/100) + 1).

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ..., "R@1%": ...}`` (one ``R@k`` per k), plus ``"AP"``
        for ``university1652``, plus ``"median_error_m"``, ``"within_25m"`` and
        ``"within_1km"`` with positions. Recalls, AP and shares are percentages; the median
        error is in metres.

    Raises:
        ValueError: length or dimension mismatches, NaN/inf descriptors, an unknown protocol,
            ks larger than the gallery, empty inputs, a CVUSA query whose label is missing from
            (or repeated in) the references, an unknown tie rule.

    Warns:
        UserWarning: when the query or the reference descriptors are (nearly) constant, or
            else when more than 1% of the queries have a true match exactly as similar as a
            wrong reference (the result then depends on ``ties``).

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, -0.6]])
        >>> evaluate_retrieval(q, r, [0, 1, 2], [0, 1, 2], ks=(1, 3))
        {'R@1': 66.66..., 'R@3': 100.0, 'R@1%': 66.66...}
        >>> evaluate_retrieval(q, r, [0, 1, 1], [0, 1, -1], ks=(1,), protocol="university1652")
        {'R@1': 100.0, 'R@1%': 100.0, 'AP': 100.0}

        Ties: a wrong reference as similar as the true one ranks before it, unless
        ``ties="optimistic"``:

        >>> r_tied = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> evaluate_retrieval(q[:1], r_tied, [0], [0, 1, 2], ks=(1, 2))
        {'R@1': 0.0, 'R@2': 100.0, 'R@1%': 0.0}
        >>> evaluate_retrieval(q[:1], r_tied, [0], [0, 1, 2], ks=(1, 2), ties="optimistic")
        {'R@1': 100.0, 'R@2': 100.0, 'R@1%': 100.0}
    """
    owner = "evaluate_retrieval"
    if protocol not in PROTOCOLS:
        raise ValueError(f"{owner}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if distractors not in DISTRACTORS:
        raise ValueError(f"{owner}: distractors must be one of {DISTRACTORS}, got {distractors!r}")
    if distractors == "drop" and protocol != "university1652":
        raise ValueError(
            f"{owner}: distractors='drop' is a variant of the university1652 protocol; "
            f"protocol={protocol!r} keeps every reference"
        )
    if one_percent not in ("floor", "lrfr"):
        raise ValueError(f"{owner}: one_percent must be 'floor' or 'lrfr', got {one_percent!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{owner}: chunk_size must be a positive int or None, got {chunk_size}")
    if ties not in TIES:
        raise ValueError(
            f"{owner}: ties must be one of {TIES} ('pessimistic' ranks a true match after the "
            f"references exactly as similar, 'optimistic' before them), got {ties!r}"
        )
    _check_descriptors(query_descriptors, reference_descriptors, owner=owner)
    constant = _warn_if_constant(query_descriptors, reference_descriptors, owner)
    device = query_descriptors.device
    q_count, r_count = query_descriptors.shape[0], reference_descriptors.shape[0]
    q_labels = _as_labels(query_labels, "query_labels", q_count, device)
    r_labels = _as_labels(reference_labels, "reference_labels", r_count, device)

    with_positions = query_positions is not None or reference_positions is not None
    if with_positions:
        if query_positions is None or reference_positions is None:
            raise ValueError(f"{owner}: pass both query_positions and reference_positions")
        if position_metric not in POSITION_METRICS:
            raise ValueError(
                f"{owner}: position_metric must name how positions are compared, one of "
                f"{POSITION_METRICS} ('euclidean' for metres, 'haversine' for degrees), "
                f"got {position_metric!r}"
            )
        q_pos = _as_positions(query_positions, "query_positions", q_count)
        r_pos = _as_positions(reference_positions, "reference_positions", r_count)

    kept = _kept_references(q_labels, r_labels, protocol, distractors, owner)
    num_kept = int(kept.sum())
    requested = tuple(ks)
    if clip_ks:
        ks = tuple(min(k, num_kept) if isinstance(k, int) and k >= 1 else k for k in requested)
    ks = _check_ks(ks, num_kept, owner)
    true_index, counts = true_match_indices(q_labels, r_labels, kept)
    if protocol == "cvusa":
        _check_one_true_reference(q_labels, counts, owner)

    need_true = protocol == "university1652"
    search = dict(chunk_size=chunk_size, need_top1=with_positions, ties=ties)
    if backend == "faiss":
        from ._faiss import faiss_positions

        k_max = min(num_kept, max(*ks, _one_percent_k(num_kept, one_percent)))
        positions = faiss_positions(
            query_descriptors, reference_descriptors, true_index, kept,
            full=need_true, k_max=k_max, **search,
        )  # fmt: skip
    else:
        positions = streaming_positions(
            query_descriptors, reference_descriptors, true_index, kept,
            need_true=need_true, **search,
        )  # fmt: skip

    if not constant:
        _warn_if_tied(positions.tied, ties, owner)
    result = {f"R@{r}": recall_at_k(positions.first, k) for r, k in zip(requested, ks)}
    result["R@1%"] = recall_at_k(positions.first, _one_percent_k(num_kept, one_percent))
    if need_true:
        result["AP"] = 100.0 * float(average_precision(positions.true).mean())
    if with_positions:
        top1 = positions.top1.cpu()
        result.update(localisation_summary(geodesic_distance(q_pos, r_pos[top1], position_metric)))
    return result


def _one_percent_k(gallery: int, rule: str) -> int:
    """The cut-off k of ``R@1%``: ``max(1, ⌊G/100⌋)``, or LRFR's ``round(G/100) + 1``."""
    return max(1, gallery // 100) if rule == "floor" else round(0.01 * gallery) + 1


def _kept_references(
    q_labels: Tensor, r_labels: Tensor, protocol: str, distractors: str, owner: str
) -> Tensor:
    """(R,) bool: the references that stay in the ranking (University-1652 drops junk, and
    with ``distractors="drop"`` the buildings absent from the queries)."""
    if protocol == "university1652":
        if bool((q_labels == JUNK_LABEL).any()):
            raise ValueError(f"{owner}: query_labels holds the junk label {JUNK_LABEL}")
        kept = r_labels != JUNK_LABEL
        if distractors == "drop":
            kept &= torch.isin(r_labels, q_labels)
    else:
        kept = torch.ones(len(r_labels), dtype=torch.bool, device=r_labels.device)
    if not bool(kept.any()):
        raise ValueError(f"{owner}: reference_labels leaves no reference after junk removal")
    return kept


def _check_ks(ks: Sequence[int], num_kept: int, owner: str) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError(f"{owner}: ks is empty; pass at least one cut-off, e.g. ks=(1, 5, 10)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_kept:
            raise ValueError(
                f"{owner}: every k in ks must be an int in [1, {num_kept}] (the gallery size), "
                f"got ks={ks}"
            )
    return ks


def _check_one_true_reference(q_labels: Tensor, counts: Tensor, owner: str) -> None:
    """The CVUSA/CVACT protocol: exactly one true reference per query."""
    missing = q_labels[counts == 0]
    if len(missing):
        raise ValueError(
            f"{owner}: protocol='cvusa' needs the true reference of every query, but "
            f"{len(missing)} query label(s) are missing from reference_labels: "
            f"{_preview(missing)}"
        )
    repeated = q_labels[counts > 1]
    if len(repeated):
        raise ValueError(
            f"{owner}: protocol='cvusa' needs exactly one true reference per query, but "
            f"{len(repeated)} query label(s) occur several times in reference_labels: "
            f"{_preview(repeated.unique())}; use protocol='university1652' for many true "
            "matches"
        )
