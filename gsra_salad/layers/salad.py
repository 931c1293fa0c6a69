"""SALAD: Sinkhorn Algorithm for Locally Aggregated Descriptors (Izquierdo & Civera, CVPR 2024)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..ops._dispatch import Impl, check_impl, checks_enabled, is_vmapped
from ..ops.sinkhorn import dustbin_sinkhorn

__all__ = ["SALAD"]


class SALAD(nn.Module):
    """Optimal-transport aggregation of local features into one global descriptor.

    Two small MLPs (1x1 convs) map every local feature to a score per cluster (``score``) and
    to a reduced feature (``cluster_features``). :func:`~gsra_salad.dustbin_sinkhorn` turns the
    scores into an assignment of the ``n = H W`` features to the ``m`` clusters plus a dustbin;
    the dustbin row is dropped and each cluster's descriptor is the assignment-weighted sum of
    the reduced features, computed as one batched contraction
    ``einsum('bln,bmn->blm', f, P)`` (no (B, l, m, n) tensor). Each cluster descriptor is
    L2-normalised; with a global token (``token_dim > 0``, DINOv2-SALAD) the normalised token
    MLP output comes first. The concatenation is L2-normalised.

    Parameter names and shapes are those of the published SALAD module (``token_features``,
    ``cluster_features``, ``score``, ``dust_bin``), so DINOv2-SALAD and LRFR-SALAD state dicts
    load with ``strict=True``. The output does not depend on ``dust_bin`` (the Sinkhorn
    iterations cancel a constant row): it receives an exact zero gradient and stays in the
    graph, so DistributedDataParallel does not report it as unused (docs/derivations.md
    section 2). Likewise the bias of the last score conv (``score.3.bias``) adds a constant to
    each cluster's row of scores, which the Sinkhorn row normalisation cancels: its gradient is
    zero up to rounding.

    Composability: ``torch.compile(salad, fullgraph=True)`` compiles forward and backward
    without graph breaks, in train and eval (under compile the fused Sinkhorn solves in the log
    domain, since its scaling-form guard is a data-dependent branch, and the input checks
    below are skipped). ``torch.func.grad``, ``vmap`` and ``jacrev`` work with every ``impl``;
    double backward and forward-mode AD (``jvp``, ``hessian``) need ``impl="reference"``
    (``impl="auto"`` takes it by itself under forward-mode AD).

    Non-finite features or tokens raise ``ValueError`` (one reduction over the MLP outputs
    and one host synchronisation per call; skipped while tracing, compiling or under vmap).

    Args:
        num_channels: C, channels of the local features.
        num_clusters: m, number of clusters.
        cluster_dim: l, size of each cluster's descriptor.
        token_dim: size of the global-token descriptor; 0 for no token (the LRFR variant).
        dropout: dropout probability inside the two MLPs.
        sinkhorn_iters: Sinkhorn iterations.
        impl: implementation of the Sinkhorn solver (see :func:`~gsra_salad.dustbin_sinkhorn`).
            May be changed after construction (``salad.impl = "reference"``); it is validated.

    The constructor arguments are kept as attributes of the same names.

    Shape:
        - Input: features (B, C, H, W) with H W >= num_clusters, and, when ``token_dim > 0``,
          the pair ``(features, token)`` with token (B, C).
        - Output: (B, num_clusters * cluster_dim + token_dim), unit L2 norm.

    Example:
        >>> salad = SALAD(num_channels=32, num_clusters=8, cluster_dim=4, token_dim=0)
        >>> salad(torch.randn(2, 32, 4, 4)).shape
        torch.Size([2, 32])
        >>> salad = SALAD(num_channels=32, num_clusters=8, cluster_dim=4, token_dim=16)
        >>> salad((torch.randn(2, 32, 4, 4), torch.randn(2, 32))).shape
        torch.Size([2, 48])
    """

    def __init__(
        self,
        num_channels: int = 1536,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        dropout: float = 0.3,
        sinkhorn_iters: int = 3,
        *,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        num_channels, num_clusters, cluster_dim, token_dim, sinkhorn_iters = (
            _as_int(name, value, minimum)
            for name, value, minimum in (
                ("num_channels", num_channels, 1),
                ("num_clusters", num_clusters, 1),
                ("cluster_dim", cluster_dim, 1),
                ("token_dim", token_dim, 0),
                ("sinkhorn_iters", sinkhorn_iters, 1),
            )
        )
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"SALAD: dropout must be a float, got {type(dropout).__name__}")
        self.num_channels = num_channels
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_dim = token_dim
        self.dropout = float(dropout)
        self.sinkhorn_iters = sinkhorn_iters
        self.impl = impl  # validated by the property

        drop = nn.Dropout(dropout)
        if token_dim > 0:
            self.token_features = nn.Sequential(
                nn.Linear(num_channels, 512), nn.ReLU(), nn.Linear(512, token_dim)
            )
        self.cluster_features = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, cluster_dim, 1)
        )
        self.score = nn.Sequential(
            nn.Conv2d(num_channels, 512, 1), drop, nn.ReLU(), nn.Conv2d(512, num_clusters, 1)
        )
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def impl(self) -> Impl:
        """Implementation of the Sinkhorn solver: ``"auto"``, ``"fused"`` or ``"reference"``."""
        return self._impl

    @impl.setter
    def impl(self, value: Impl) -> None:
        check_impl("SALAD", value)
        self._impl = value

    @property
    def output_dim(self) -> int:
        """Size of the descriptor: ``num_clusters * cluster_dim + token_dim``."""
        return self.num_clusters * self.cluster_dim + self.token_dim

    def extra_repr(self) -> str:
        return (
            f"num_channels={self.num_channels}, num_clusters={self.num_clusters}, "
            f"cluster_dim={self.cluster_dim}, token_dim={self.token_dim}, "
            f"dropout={self.dropout}, sinkhorn_iters={self.sinkhorn_iters}, impl={self.impl!r}"
        )

    def _split_input(self, x) -> tuple[Tensor, Tensor | None]:
        if self.token_dim > 0:
            if not (isinstance(x, (tuple, list)) and len(x) == 2):
                raise TypeError(
                    f"SALAD: token_dim={self.token_dim} > 0 needs the pair (features (B, C, H, W), "
                    f"token (B, C)), got {type(x).__name__}; pass (features, token), or build "
                    "SALAD(..., token_dim=0) to aggregate the features alone"
                )
            features, token = x
        else:
            if isinstance(x, (tuple, list)):
                raise TypeError(
                    "SALAD: token_dim=0 takes the features (B, C, H, W) alone, got a "
                    f"{type(x).__name__}; build SALAD(..., token_dim > 0) to use a global token"
                )
            features, token = x, None
        if not isinstance(features, Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(f"SALAD: features must have shape (B, C, H, W), got {shape}")
        if features.shape[1] != self.num_channels:
            raise ValueError(
                f"SALAD: built for num_channels={self.num_channels}, got features with "
                f"{features.shape[1]} channels"
            )
        if token is not None:
            if not isinstance(token, Tensor) or token.dim() != 2:
                shape = tuple(token.shape) if isinstance(token, Tensor) else type(token)
                raise ValueError(f"SALAD: token must have shape (B, C), got {shape}")
            if token.shape != (features.shape[0], self.num_channels):
                raise ValueError(
                    f"SALAD: token must have shape (B, C) = "
                    f"{(features.shape[0], self.num_channels)}, got {tuple(token.shape)}"
                )
        n = features.shape[2] * features.shape[3]
        if n < self.num_clusters:
            side = math.ceil(math.sqrt(self.num_clusters))
            raise ValueError(
                f"SALAD: the feature map has n = {features.shape[2]}x{features.shape[3]} = {n} "
                f"local features but the module has m = {self.num_clusters} clusters, and the "
                f"optimal-transport dustbin needs n >= m. Use a larger input image (a feature map "
                f"of at least {side}x{side}, e.g. an image of at least {16 * side}x{16 * side} "
                f"pixels for a stride-16 backbone) or fewer clusters"
            )
        return features, token

    def _check_finite(self, features: Tensor, token: Tensor | None, *outputs: Tensor) -> None:
        """Raises ValueError if an input is not finite. Cheap when all is well: one sum over
        the (small) MLP outputs, which any NaN / inf in the input reaches."""
        total = sum(x.sum(dtype=torch.float32) for x in outputs)
        if bool(torch.isfinite(total)):
            return
        for name, x in (("features", features), ("token", token)):
            if x is None:
                continue
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"SALAD: {name} contains {kind} (first at index {where}); the descriptor "
                    "needs finite input. Check the layer that produced it, e.g. for overflow "
                    "under float16 autocast"
                )
        if not all(bool(torch.isfinite(x).all()) for x in outputs):
            raise ValueError(
                "SALAD: the score / cluster_features / token_features MLPs produced non-finite "
                "values from finite input: overflow (e.g. under float16 autocast) or non-finite "
                "weights"
            )

    def _aggregate(self, f: Tensor, scores: Tensor) -> Tensor:
        """Reduced features f (B, l, n) and scores (B, m, n) -> normalised clusters (B, l m)."""
        log_p = dustbin_sinkhorn(scores, self.dust_bin, self.sinkhorn_iters, impl=self.impl)
        p = log_p[:, :-1].exp()  # drop the dustbin row: (B, m, n)
        clusters = torch.bmm(f, p.transpose(1, 2))  # (B, l, m) = einsum('bln,bmn->blm')
        clusters = F.normalize(clusters, p=2, dim=1)
        return rearrange(clusters, "b l m -> b (l m)")  # the published layout

    def forward(self, x: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        features, token = self._split_input(x)
        f = rearrange(self.cluster_features(features), "b l h w -> b l (h w)")
        scores = rearrange(self.score(features), "b m h w -> b m (h w)")
        t = None if token is None else self.token_features(token)
        if checks_enabled() and not is_vmapped(features, token):
            self._check_finite(features, token, *(x for x in (f, scores, t) if x is not None))
        desc = self._aggregate(f, scores)
        if t is not None:
            desc = torch.cat([F.normalize(t, p=2, dim=-1), desc], dim=-1)
        return F.normalize(desc, p=2, dim=-1)

    def get_config(self) -> dict[str, object]:
        """Constructor arguments as JSON values: ``type(m)(**m.get_config())`` rebuilds it."""
        return {
            "num_channels": self.num_channels,
            "num_clusters": self.num_clusters,
            "cluster_dim": self.cluster_dim,
            "token_dim": self.token_dim,
            "dropout": self.dropout,
            "sinkhorn_iters": self.sinkhorn_iters,
            "impl": self.impl,
        }


def _as_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum`` (NumPy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SALAD: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        what = " (0 = no global token)" if name == "token_dim" else ""
        raise ValueError(f"SALAD: {name} must be >= {minimum}{what}, got {value}")
    return int(value)
