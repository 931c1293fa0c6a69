"""Retrieval losses of the published cross-view training recipes. Imports no model code.

Two objectives, each a function plus a Module that stores its arguments (and, for InfoNCE, the
learnable logit scale):

- :func:`info_nce_loss` / :class:`InfoNCELoss`: the symmetric InfoNCE of CLIP and Sample4Geo
  with label smoothing;
- :func:`soft_margin_triplet_loss` / :class:`SoftMarginTripletLoss`: LRFR's ``SemiSoftTriHard``
  (``negatives="semi-hard"``) and ``SoftTripletLoss`` (``negatives="all"``).

Both take a batch of B pairs, ``query (B, D)`` and ``reference (B, D)``, where row i of each is
a matching pair and every other row is a negative. The descriptors are L2-normalised inside
the loss: on descriptors that are already normalised (SALAD's output) this changes neither the
value nor the gradient reaching the model's parameters, since the normalisation is idempotent
and its Jacobian is a projection.

Same-location pairs. With ``labels=`` (B,) (e.g. location ids), two rows with the same label
are never used as each other's negatives: those entries are left out of the softmax
(InfoNCE) or of the negatives (triplet). Without labels every off-diagonal entry is a negative,
as in the published code.

Across processes (``gather=True``). Every process scores its local B queries against the
references of all processes (and its local references against all queries), with the
gathered descriptors carrying gradients back to the process that produced them
(the semantics of ``torch.distributed.nn.functional.all_gather``, on public collectives);
labels are offset by ``rank * B``, as in
open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``. Each process returns the mean
over its own rows, so after DistributedDataParallel averages the gradients over the W
processes, the loss and every gradient equal those of the single-process loss on the
concatenated batch of W * B pairs (no ``loss * world_size`` compensation: it would double-count
gradients that already flow through the gather). All processes must hold the same B. Without
an initialised process group (or with one process) ``gather=True`` is the single-process loss.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributed import rank_and_world_size

__all__ = [
    "InfoNCELoss",
    "SoftMarginTripletLoss",
    "info_nce_loss",
    "soft_margin_triplet_loss",
]

MAX_LOGIT_SCALE = 100.0
Negatives = Literal["semi-hard", "all"]
NEGATIVES = ("semi-hard", "all")


# --------------------------------------------------------------------------------------------
# plumbing: input checks and the gather
# --------------------------------------------------------------------------------------------


def _check_pair(owner: str, query: Tensor, reference: Tensor, labels: Tensor | None) -> None:
    for name, t in (("query", query), ("reference", reference)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(
                f"{owner}: {name} must be a floating-point tensor, got {t.dtype}; "
                "pass the descriptors, e.g. x.float()"
            )
        if t.dim() != 2:
            raise ValueError(f"{owner}: {name} must have shape (B, D), got {tuple(t.shape)}")
    if query.shape != reference.shape:
        raise ValueError(
            f"{owner}: query and reference must have the same shape (B, D) (row i of each is a "
            f"matching pair), got {tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if query.shape[0] < 2:
        raise ValueError(
            f"{owner}: a batch of {query.shape[0]} pair(s) has no negatives; use at least 2 "
            "pairs per batch (per process)"
        )
    if query.shape[1] < 1:
        raise ValueError(f"{owner}: descriptors must have D >= 1, got {tuple(query.shape)}")
    if _checks_enabled():
        for name, t in (("query", query), ("reference", reference)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{owner}: {name} holds NaN or inf; check the model's output (mixed "
                    "precision overflow, a diverged run) before the loss"
                )
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.is_complex():
            raise ValueError(
                f"{owner}: labels must be an integer tensor of shape (B,), got "
                f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}"
            )
        if labels.shape != (query.shape[0],):
            raise ValueError(
                f"{owner}: labels must have shape (B,) = ({query.shape[0]},), "
                f"got {tuple(labels.shape)}"
            )


def _checks_enabled() -> bool:
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward returns to each process the sum, over all
    processes, of the gradients of its block: the semantics of
    ``torch.distributed.nn.functional.all_gather`` (deprecated: torch 2.14 warns with a
    FutureWarning on every call) on the public collectives alone. The backward all-reduces
    the (W B, D) gradient, which every backend supports (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        dist = torch.distributed
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce writes in place
        torch.distributed.all_reduce(grad)
        return grad[ctx.rows]


def _gather(x: Tensor, world_size: int) -> Tensor:
    """Concatenates ``x`` of every process along dim 0, with gradients flowing back."""
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x)


def _gather_labels(labels: Tensor, world_size: int) -> Tensor:
    if world_size == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(world_size)]
    torch.distributed.all_gather(parts, labels.contiguous())
    return torch.cat(parts, dim=0)


def _not_negative(local: Tensor, everyone: Tensor, offset: int) -> Tensor:
    """(B, N) bool: True where column j is no negative of local row i (its own pair, or a pair
    with the same label)."""
    rows = torch.arange(local.shape[0], device=local.device)
    mask = local.unsqueeze(1) == everyone.unsqueeze(0)
    mask[rows, rows + offset] = True
    return mask


def _setup(
    owner: str, query: Tensor, reference: Tensor, labels: Tensor | None, gather: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Normalised local descriptors, gathered descriptors, the positive column of each local
    row, the not-negative mask and the world size."""
    _check_pair(owner, query, reference, labels)
    rank, world = rank_and_world_size() if gather else (0, 1)
    b = query.shape[0]
    q = F.normalize(query, dim=1)
    r = F.normalize(reference, dim=1)
    q_all, r_all = _gather(q, world), _gather(r, world)
    offset = rank * b
    positive = torch.arange(b, device=query.device) + offset
    if labels is None:
        # only the diagonal is excluded: positional labels that are unique over all processes
        local = positive
        everyone = torch.arange(b * world, device=query.device)
    else:
        local = labels.to(query.device)
        everyone = _gather_labels(local, world)
        if bool((everyone == everyone[0]).all()):
            raise ValueError(
                f"{owner}: every pair in the batch has the label {int(everyone[0])}, so no "
                "pair has a negative; batches need pairs of at least two locations"
            )
    not_negative = _not_negative(local, everyone, offset)
    return q, r, q_all, r_all, positive, not_negative


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------


def _smoothed_cross_entropy(
    logits: Tensor, positive: Tensor, excluded: Tensor, label_smoothing: float
) -> Tensor:
    """Mean over rows of torch's label-smoothed cross-entropy, restricted per row to the
    classes not in ``excluded`` (the positive is never excluded). With nothing excluded this is
    exactly ``F.cross_entropy(logits, positive, label_smoothing=...)``."""
    logits = logits.masked_fill(excluded, float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, positive.unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll.mean()
    kept = ~excluded
    uniform = -(log_p.masked_fill(excluded, 0.0).sum(1)) / kept.sum(1).to(log_p.dtype)
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform).mean()


def info_nce_loss(
    query: Tensor,
    reference: Tensor,
    logit_scale: Tensor | float,
    *,
    label_smoothing: float = 0.1,
    labels: Tensor | None = None,
    gather: bool = False,
) -> Tensor:
    """Symmetric InfoNCE (CLIP, Sample4Geo) on L2-normalised descriptors.

    ``logits = logit_scale * normalize(query) @ normalize(reference).T``; the loss is the mean
    of the label-smoothed cross-entropy of the rows (query -> reference) and of the columns
    (reference -> query), the positive of row i being column i. See the module docstring for
    ``labels`` and ``gather``.

    Args:
        query: query descriptors, row i matching ``reference`` row i.
        reference: reference descriptors.
        logit_scale: the multiplier of the cosine similarities (1 / temperature), a float or a
            scalar tensor (gradients flow into it).
        label_smoothing: torch's ``label_smoothing`` of the cross-entropy, in [0, 1).
        labels: optional location ids (B,); rows with the same label are not negatives.
        gather: use the negatives of every process (see the module docstring).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: mismatched shapes, a batch of fewer than 2 pairs, non-finite or integer
            descriptors, bad labels or label smoothing.

    Example:
        >>> q, r = torch.randn(4, 8), torch.randn(4, 8)
        >>> info_nce_loss(q, r, logit_scale=1 / 0.07).shape
        torch.Size([])
    """
    owner = "info_nce_loss"
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{owner}: label_smoothing must be in [0, 1), got {label_smoothing}")
    q, r, q_all, r_all, positive, excluded = _setup(owner, query, reference, labels, gather)
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)
    excluded = excluded.clone()
    excluded[rows, positive] = False  # the positive is never excluded
    loss_q = _smoothed_cross_entropy(logit_scale * q @ r_all.T, positive, excluded, label_smoothing)
    loss_r = _smoothed_cross_entropy(logit_scale * r @ q_all.T, positive, excluded, label_smoothing)
    return (loss_q + loss_r) / 2


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE with a learnable temperature, as trained by Sample4Geo.

    The module owns the logit scale, stored as its log (``self.log_logit_scale``) and
    initialised to ``log(1 / temperature)``: a parameter when ``learnable=True`` (put the loss's
    parameters in the optimizer), a buffer otherwise. The scale used is
    ``exp(log_logit_scale)`` clamped at 100, the bound open_clip applies to CLIP's scale after
    each step: above it the scale stays at 100 and receives no gradient.

    Args:
        temperature: initial temperature (logit scale 1 / temperature).
        learnable: train the logit scale.
        label_smoothing: torch's ``label_smoothing`` of the cross-entropy, in [0, 1).
        gather: use the negatives of every process (see :mod:`gsra_salad.losses`).

    Shape:
        - Input: query (B, D), reference (B, D), optional ``labels=`` (B,).
        - Output: scalar.

    Example:
        >>> loss_fn = InfoNCELoss()
        >>> loss = loss_fn(torch.randn(4, 8), torch.randn(4, 8))
        >>> loss.backward()
        >>> round(loss_fn.logit_scale.item(), 2)
        14.29
        >>> InfoNCELoss(**loss_fn.get_config()).get_config() == loss_fn.get_config()
        True
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = True,
        label_smoothing: float = 0.1,
        *,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"InfoNCELoss: temperature must be > 0, got {temperature}")
        if 1.0 / temperature > MAX_LOGIT_SCALE:
            raise ValueError(
                f"InfoNCELoss: temperature must be >= 1/{MAX_LOGIT_SCALE:g} (the logit scale is "
                f"clamped at {MAX_LOGIT_SCALE:g}), got {temperature}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"InfoNCELoss: label_smoothing must be in [0, 1), got {label_smoothing}"
            )
        self.temperature = float(temperature)
        self.learnable = bool(learnable)
        self.label_smoothing = float(label_smoothing)
        self.gather = bool(gather)
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_logit_scale", init)

    @property
    def logit_scale(self) -> Tensor:
        """The scale multiplying the cosine similarities: ``exp(log_logit_scale)``, at most 100."""
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, query: Tensor, reference: Tensor, *, labels: Tensor | None = None) -> Tensor:
        return info_nce_loss(
            query,
            reference,
            self.logit_scale,
            label_smoothing=self.label_smoothing,
            labels=labels,
            gather=self.gather,
        )

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments: ``InfoNCELoss(**m.get_config())`` rebuilds the module (the
        learned scale lives in the state dict)."""
        return {
            "temperature": self.temperature,
            "learnable": self.learnable,
            "label_smoothing": self.label_smoothing,
            "gather": self.gather,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.get_config().items())


# --------------------------------------------------------------------------------------------
# soft-margin triplet
# --------------------------------------------------------------------------------------------


def _semi_hard_term(dist: Tensor, positive_dist: Tensor, excluded: Tensor, alpha: float) -> Tensor:
    """LRFR's ``get_semi_hard_neg`` + ``weighted_soft_margin_loss`` on local rows of D."""
    # h1: the largest negative distance below the positive one; entries that do not qualify
    # count as 0 (the published code takes the max of D * mask), so h1 = 0 when none does
    below = (dist < positive_dist.unsqueeze(1)) & ~excluded
    h1 = torch.where(below, dist, torch.zeros_like(dist)).amax(dim=1)
    # h2: the smallest negative distance
    h2 = dist.masked_fill(excluded, float("inf")).amin(dim=1)
    negative = torch.maximum(h1, h2)
    return F.softplus(alpha * (positive_dist - negative)).mean()


def _all_term(sim: Tensor, positive_sim: Tensor, excluded: Tensor, alpha: float) -> Tensor:
    """LRFR's ``SoftTripletLoss.single_forward`` on local rows: mean over rows of the mean over
    the row's negatives (every row has B - 1 without labels, so this is the published mean)."""
    terms = F.softplus(alpha * (sim - positive_sim.unsqueeze(1))).masked_fill(excluded, 0.0)
    counts = (~excluded).sum(1).to(terms.dtype)
    return (terms.sum(1) / counts).mean()


def soft_margin_triplet_loss(
    query: Tensor,
    reference: Tensor,
    *,
    alpha: float = 10.0,
    negatives: Negatives = "semi-hard",
    labels: Tensor | None = None,
    gather: bool = False,
) -> Tensor:
    """LRFR's soft-margin triplet losses on L2-normalised descriptors, both directions.

    ``negatives="semi-hard"`` is LRFR's ``SemiSoftTriHard(alpha)``: with distances
    ``D = 2 - 2 R Qᵀ`` and ``d⁺ = diag(D)``, each row i takes as negative
    ``max(h1, h2)``, h1 the largest off-diagonal ``D[i, j] < d⁺_i`` (0 if none), h2 the
    smallest off-diagonal ``D[i, j]``; the term is ``mean_i softplus(alpha (d⁺_i - neg_i))``,
    averaged over the rows of D and of Dᵀ. ``negatives="all"`` is LRFR's
    ``SoftTripletLoss(alpha)``: the mean over all off-diagonal pairs of
    ``softplus(alpha (s_ij - s_ii))`` on cosine similarities, averaged over both directions.
    ``softplus`` is the numerically stable ``log(1 + exp(x))``. With ``labels``, same-label
    entries are no negatives and each row averages over its own negatives.

    Args:
        query: query descriptors, row i matching ``reference`` row i.
        reference: reference descriptors.
        alpha: the slope of the soft margin.
        negatives: ``"semi-hard"`` or ``"all"``.
        labels: optional location ids (B,); rows with the same label are not negatives.
        gather: use the negatives of every process (see :mod:`gsra_salad.losses`).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: mismatched shapes, a batch of fewer than 2 pairs, non-finite or integer
            descriptors, bad labels, an unknown ``negatives``.

    Example:
        >>> q, r = torch.randn(4, 8), torch.randn(4, 8)
        >>> soft_margin_triplet_loss(q, r, negatives="all").shape
        torch.Size([])
    """
    owner = "soft_margin_triplet_loss"
    if negatives not in NEGATIVES:
        raise ValueError(f"{owner}: negatives must be one of {NEGATIVES}, got {negatives!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{owner}: alpha must be a finite number > 0, got {alpha}")
    q, r, q_all, r_all, _, excluded = _setup(owner, query, reference, labels, gather)
    positive_sim = (q * r).sum(1)
    sim_q = q @ r_all.T  # local queries vs every reference
    sim_r = r @ q_all.T  # local references vs every query
    if negatives == "all":
        return (_all_term(sim_q, positive_sim, excluded, alpha)
                + _all_term(sim_r, positive_sim, excluded, alpha)) / 2  # fmt: skip
    positive_dist = 2.0 - 2.0 * positive_sim
    return (_semi_hard_term(2.0 - 2.0 * sim_r, positive_dist, excluded, alpha)
            + _semi_hard_term(2.0 - 2.0 * sim_q, positive_dist, excluded, alpha)) / 2  # fmt: skip


class SoftMarginTripletLoss(nn.Module):
    """LRFR's soft-margin triplet loss (``SemiSoftTriHard`` or ``SoftTripletLoss``).

    Stores its arguments and calls :func:`soft_margin_triplet_loss`; it has no parameters.
    Unlike the published modules it runs on any device and needs no batch size.

    Args:
        alpha: the slope of the soft margin (LRFR: 10).
        negatives: ``"semi-hard"`` (``SemiSoftTriHard``, LRFR's University-1652 recipe) or
            ``"all"`` (``SoftTripletLoss``).
        gather: use the negatives of every process (see :mod:`gsra_salad.losses`).

    Shape:
        - Input: query (B, D), reference (B, D), optional ``labels=`` (B,).
        - Output: scalar.

    Example:
        >>> loss_fn = SoftMarginTripletLoss(alpha=10.0, negatives="semi-hard")
        >>> loss_fn(torch.randn(4, 8), torch.randn(4, 8)).shape
        torch.Size([])
        >>> loss_fn.get_config()
        {'alpha': 10.0, 'negatives': 'semi-hard', 'gather': False}
    """

    def __init__(
        self, alpha: float = 10.0, negatives: Negatives = "semi-hard", *, gather: bool = False
    ) -> None:
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(
                f"SoftMarginTripletLoss: negatives must be one of {NEGATIVES}, got {negatives!r}"
            )
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"SoftMarginTripletLoss: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.negatives = negatives
        self.gather = bool(gather)

    def forward(self, query: Tensor, reference: Tensor, *, labels: Tensor | None = None) -> Tensor:
        return soft_margin_triplet_loss(
            query,
            reference,
            alpha=self.alpha,
            negatives=self.negatives,
            labels=labels,
            gather=self.gather,
        )

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments: ``SoftMarginTripletLoss(**m.get_config())`` rebuilds it."""
        return {"alpha": self.alpha, "negatives": self.negatives, "gather": self.gather}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
