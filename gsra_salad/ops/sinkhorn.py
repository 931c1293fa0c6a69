"""Batched log-domain Sinkhorn: the general solver and SALAD's dustbin assignment.

Two implementations sit behind every function, chosen by ``impl``:

``"reference"``
    The plain formulation unrolled under autograd (as in the published SALAD code, minus its
    batch-size-1 ``squeeze`` bug). The oracle of the tests and the fallback for everything
    autograd can do: double backward, forward-mode AD, tracing and export.
``"fused"``
    ``torch.autograd.Function`` s in pure torch (any device). The forward solves the scaling
    form of the iterations (one softmax and ``2K - 1`` matrix-vector products) and saves only
    the row-softmax of the kernel; the backward is the exact gradient of the K-step map
    (docs/derivations.md section 1). Where the scalings would leave floating-point range it
    solves the same call in the log domain instead (still saving only the kernel and the
    potentials). Its backward is not differentiable: double backward and forward-mode AD raise
    a ``RuntimeError`` that says to use ``"reference"``.
``"auto"`` (default)
    ``"fused"``, except under forward-mode AD (dual tensors, ``torch.func.jvp``),
    ``torch.jit`` tracing/scripting, ONNX export and ``torch.export``, where it takes
    ``"reference"``.

Composability: ``torch.func.grad``, ``vmap`` and ``jacrev`` work with every ``impl`` (the fused
Functions fold a vmapped dimension into the batch dimension). ``torch.compile(...,
fullgraph=True)`` traces forward and backward without graph breaks; under compile the fused
path solves in the log domain directly, because the scaling form's guard is a data-dependent
branch that a full graph cannot hold (same values; the scaling form's speed is an eager-mode
gain).

Inputs in float16/bfloat16 (or under ``torch.autocast``) are solved in float32 and returned in
the input dtype.

Bad input never turns into a silent NaN: NaN or ``+inf`` anywhere in the kernel or marginals,
a non-finite dustbin, and a row or column with positive mass whose kernel entries are all
``-inf``, raise ``ValueError``. The check costs nothing on the fused path (its range guard
already reduces the scalings) and one reduction over the (B, M + N) potentials on the
reference path, plus one host synchronisation per call. It is skipped while tracing,
exporting, compiling and under ``torch.func.vmap`` (where a data-dependent check cannot run).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
from torch import Tensor

from ._dispatch import (
    Impl,
    autocast_state,
    check_impl,
    checks_enabled,
    has_forward_grad,
    is_tracing,
    is_vmapped,
)
from ._sinkhorn_fused import fused_sinkhorn, zero_gradient

__all__ = ["Impl", "dustbin_sinkhorn", "log_sinkhorn"]

_KERNEL = ("M", "N", "", "")  # dimension names in the messages of _check_problem
_SCORES = ("m", "n", "clusters", "features")


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_num_iters(fn: str, num_iters: int) -> int:
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral):
        raise TypeError(f"{fn}: num_iters must be an int, got {type(num_iters).__name__}")
    num_iters = int(num_iters)
    if num_iters < 1:
        raise ValueError(f"{fn}: num_iters must be >= 1, got {num_iters}")
    return num_iters


def _check_float_tensor(fn: str, name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must have a floating-point dtype, got {x.dtype}; "
            f"convert it with {name}.float()"
        )
    return x


def _check_problem(
    fn: str, name: str, x: object, num_iters: int, layout: tuple[str, str, str, str]
) -> tuple[Tensor, int]:
    """Validation shared by both entry points: ``x`` is a float (B, rows, cols) tensor with
    rows, cols >= 1 and ``num_iters`` an int >= 1. ``layout = (rows, cols, row_word, col_word)``
    names the dimensions in the messages. Returns ``(x, num_iters)``."""
    x = _check_float_tensor(fn, name, x)
    num_iters = _check_num_iters(fn, num_iters)
    rows, cols, row_word, col_word = layout
    if x.dim() != 3:
        meaning = f" = (batch, {row_word}, {col_word})" if row_word else ""
        hint = f"; add a batch dimension with {name}.unsqueeze(0)" if x.dim() == 2 else ""
        raise ValueError(
            f"{fn}: {name} must have shape (B, {rows}, {cols}){meaning}, got {tuple(x.shape)}{hint}"
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        row_word, col_word = (f" {row_word}", f" {col_word}") if row_word else ("", "")
        raise ValueError(
            f"{fn}: {name} needs {rows} >= 1{row_word} and {cols} >= 1{col_word}, "
            f"got shape {tuple(x.shape)}"
        )
    return x, num_iters


def _solve_dtype(*dtypes: torch.dtype) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _marginal(fn: str, name: str, x: Tensor, batch: int, size: int, dim: str, ref: Tensor):
    """Checks a marginal of shape (size,), (1, size) or (batch, size); returns (batch, size)."""
    _check_float_tensor(fn, name, x)
    if x.device != ref.device:
        raise ValueError(
            f"{fn}: {name} is on {x.device} but log_kernel is on {ref.device}; "
            f"move it with {name}.to(log_kernel.device)"
        )
    ok = (x.dim() == 1 and x.shape[0] == size) or (
        x.dim() == 2 and x.shape[1] == size and x.shape[0] in (1, batch)
    )
    if not ok:
        raise ValueError(
            f"{fn}: {name} must have shape ({dim},) or (B, {dim}) = ({size},) or "
            f"({batch}, {size}) to match log_kernel of shape {tuple(ref.shape)}, "
            f"got {tuple(x.shape)}"
        )
    return x.expand(batch, size)


def _resolve_impl(fn: str, impl: str, *tensors: Tensor) -> str:
    check_impl(fn, impl)
    if impl == "reference":
        return impl
    dual = has_forward_grad(*tensors)
    if impl == "fused" and dual:
        raise RuntimeError(
            f"{fn}: impl='fused' does not support forward-mode AD (dual tensors); "
            "use impl='reference' or impl='auto'"
        )
    if dual or is_tracing():
        return "reference"
    return "fused"


def _no_autocast(device: torch.device):
    """Autocast would run the float32 solve's matmuls in half precision: switch it off."""
    _, enabled, _ = autocast_state(device)
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def _make_diagnose(fn: str, kernel_name: str, dustbin: Tensor | None = None):
    """Returns ``diagnose(z, log_a, log_b, potentials)``, raising ValueError on bad input.

    With ``potentials=None`` it checks the inputs for NaN / +inf; with ``(u, v)`` it checks the
    final potentials (NaN or +inf there means a row or column could not carry its mass).
    A ``dustbin`` must be finite (both implementations reject it alike).
    """

    def diagnose(z: Tensor, log_a: Tensor, log_b: Tensor, potentials) -> None:
        if potentials is not None:
            u, v = potentials
            total = u.sum() + v.sum()  # -inf (zero mass) is legal; NaN / +inf are not
            if not bool(torch.isnan(total) | (total == math.inf)):
                return
        if dustbin is not None and not bool(torch.isfinite(dustbin)):
            raise ValueError(
                f"{fn}: dustbin must be finite, got {float(dustbin.detach())}. The result does not "
                "depend on its value, so any finite number works; for SALAD, reset the "
                "parameter with salad.dust_bin.data.fill_(1.0)"
            )
        for name, x in ((kernel_name, z), ("log_a", log_a), ("log_b", log_b)):
            nan, pos = torch.isnan(x), torch.isposinf(x)
            if bool(nan.any() | pos.any()):
                kind = "NaN" if bool(nan.any()) else "+inf"
                where = tuple(int(i) for i in (nan | pos).nonzero()[0])
                raise ValueError(
                    f"{fn}: {name} contains {kind} (first at index {where}); Sinkhorn needs "
                    "finite values (-inf is allowed as a forbidden entry). Check the layer "
                    "that produced it, e.g. for overflow under float16 autocast"
                )
        if potentials is not None:
            raise ValueError(
                f"{fn}: the transport problem is infeasible: a row or column with positive "
                f"mass has every {kernel_name} entry equal to -inf, so it cannot carry its mass"
            )

    return diagnose


# ---------------------------------------------------------------------------------------------
# Reference implementation
# ---------------------------------------------------------------------------------------------


def _log_sinkhorn_reference(
    z: Tensor, log_a: Tensor, log_b: Tensor, num_iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(z + v.unsqueeze(-2), dim=-1)
        v = log_b - torch.logsumexp(z + u.unsqueeze(-1), dim=-2)
    return z + u.unsqueeze(-1) + v.unsqueeze(-2), u, v


def _solve(
    impl: str,
    src: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    num_iters: int,
    *,
    dustbin: Tensor | None,
    shift: float,
    diagnose,
) -> Tensor:
    """Runs the chosen implementation on checked, solve-dtype input; the checks (``diagnose``)
    run unless tracing, compiling or under ``torch.func.vmap``."""
    batch = src.shape[0]
    if batch == 0 or not checks_enabled() or is_vmapped(src, log_a, log_b, dustbin):
        diagnose = None
    if impl == "fused" and batch > 0:
        return fused_sinkhorn(
            src, log_a, log_b, num_iters, dustbin=dustbin, shift=shift, diagnose=diagnose
        )
    z = src
    if dustbin is not None:  # exact zero gradient for the inert value: docs/derivations.md §2
        z = torch.cat([src, zero_gradient(dustbin).expand(batch, 1, src.shape[2])], dim=1)
    out, u, v = _log_sinkhorn_reference(z, log_a, log_b, num_iters)
    if diagnose is not None:
        diagnose(z, log_a, log_b, (u, v))
    return out + shift if shift else out


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def log_sinkhorn(
    log_kernel: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    num_iters: int = 3,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """Batched log-domain Sinkhorn: ``num_iters`` row-then-column normalisations.

    From ``u = v = 0``, each iteration does ``u = log_a - logsumexp_j(Z + v)`` then
    ``v = log_b - logsumexp_i(Z + u)``; the result is ``Z + u + v``, the log of a plan whose
    columns sum to ``b`` (exactly, after the last column step) and rows approximately to ``a``.

    Args:
        log_kernel: ``Z``, shape (B, M, N). ``-inf`` entries forbid transport.
        log_a: log row marginals, shape (M,) or (B, M).
        log_b: log column marginals, shape (N,) or (B, N).
        num_iters: number of iterations K (>= 1).
        impl: ``"auto"``, ``"fused"`` or ``"reference"`` (see the module docs).

    Returns:
        The log transport plan, shape (B, M, N), in ``log_kernel``'s dtype.

    Raises:
        TypeError: non-tensor or non-floating input, non-integer ``num_iters``.
        ValueError: wrong shapes, devices, ``num_iters < 1``, unknown ``impl``, NaN or +inf
            in the input, or an infeasible problem.

    Example:
        >>> z = torch.randn(2, 4, 6)
        >>> log_a = torch.full((4,), -math.log(4.0))
        >>> log_b = torch.full((6,), -math.log(6.0))
        >>> log_p = log_sinkhorn(z, log_a, log_b, num_iters=5)
        >>> log_p.shape
        torch.Size([2, 4, 6])
        >>> torch.allclose(log_p.exp().sum(1), log_b.exp().expand(2, 6))
        True
    """
    fn = "log_sinkhorn"
    log_kernel, num_iters = _check_problem(fn, "log_kernel", log_kernel, num_iters, _KERNEL)
    batch, m, n = log_kernel.shape
    log_a = _marginal(fn, "log_a", log_a, batch, m, "M", log_kernel)
    log_b = _marginal(fn, "log_b", log_b, batch, n, "N", log_kernel)
    impl = _resolve_impl(fn, impl, log_kernel, log_a, log_b)
    dtype = _solve_dtype(log_kernel.dtype, log_a.dtype, log_b.dtype)
    diagnose = _make_diagnose(fn, "log_kernel")
    with _no_autocast(log_kernel.device):
        z, la, lb = log_kernel.to(dtype), log_a.to(dtype), log_b.to(dtype)
        out = _solve(impl, z, la, lb, num_iters, dustbin=None, shift=0.0, diagnose=diagnose)
    return out.to(log_kernel.dtype)


def dustbin_marginals(
    num_clusters: int,
    num_features: int,
    *,
    balanced: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, float]:
    """SALAD's log marginals for ``m`` clusters plus one dustbin row and ``n`` features.

    With ``norm = -log(m + n)``: every cluster row gets ``norm``, the dustbin row
    ``norm + log(n - m)`` and every column ``norm`` (published SALAD). With ``balanced=True``
    the cluster rows get ``norm + log(min(1, n / m))`` and the dustbin
    ``norm + log(max(n - m, 0))``: identical for ``n >= m`` and still a valid (balanced)
    problem for ``n < m``.

    Returns:
        ``(log_a (m + 1,), log_b (n,), norm)``.

    Example:
        >>> log_a, log_b, norm = dustbin_marginals(2, 6)
        >>> log_a.exp() * 8, log_b.exp() * 8
        (tensor([1., 1., 4.]), tensor([1., 1., 1., 1., 1., 1.]))
    """
    m, n = num_clusters, num_features
    norm = -math.log(m + n)
    log_a = torch.full((m + 1,), norm, dtype=dtype, device=device)
    if balanced:
        log_a[:m] += math.log(min(1.0, n / m))
    log_a[m] = norm + math.log(n - m) if n > m else -math.inf
    log_b = torch.full((n,), norm, dtype=dtype, device=device)
    return log_a, log_b, norm


def dustbin_sinkhorn(
    scores: Tensor,
    dustbin: Tensor | float,
    num_iters: int = 3,
    *,
    impl: Impl = "auto",
    balanced: bool = False,
) -> Tensor:
    """SALAD's optimal-transport assignment of ``n`` features to ``m`` clusters plus a dustbin.

    Appends a constant dustbin row to ``scores``, runs :func:`log_sinkhorn` with the marginals
    of :func:`dustbin_marginals` and returns ``log P - norm`` (the published
    ``get_matching_probs``): every column of ``exp(result)`` sums to one over the ``m + 1`` rows.

    The result does not depend on the dustbin value (the first row update cancels the constant
    row), so ``dustbin`` receives an exact zero gradient; it stays in the autograd graph, so
    DistributedDataParallel does not report it as unused (docs/derivations.md section 2).

    ``n == m`` is legal: the dustbin gets no mass and its row is ``-inf``. ``n < m`` makes the
    published marginals negative and raises, unless ``balanced=True``.

    Args:
        scores: (B, m, n) cluster-feature scores.
        dustbin: the dustbin score: a one-element tensor (e.g. a learnable parameter), a
            Python or NumPy real number, or a one-element NumPy array. Must be finite.
        num_iters: Sinkhorn iterations K (>= 1); SALAD uses 3.
        impl: ``"auto"``, ``"fused"`` or ``"reference"`` (see the module docs).
        balanced: use the balanced marginals of :func:`dustbin_marginals`, defined for n < m.

    Returns:
        Log assignment, shape (B, m + 1, n), in ``scores``' dtype; row ``m`` is the dustbin.

    Raises:
        TypeError: non-tensor or non-floating scores, non-integer ``num_iters``.
        ValueError: wrong shapes, ``n < m`` without ``balanced``, NaN or +inf scores, a
            non-finite dustbin.

    Example:
        >>> scores = torch.randn(2, 3, 8)
        >>> log_p = dustbin_sinkhorn(scores, 1.0)
        >>> log_p.shape
        torch.Size([2, 4, 8])
        >>> torch.allclose(log_p.exp().sum(1), torch.ones(2, 8))
        True
    """
    fn = "dustbin_sinkhorn"
    scores, num_iters = _check_problem(fn, "scores", scores, num_iters, _SCORES)
    batch, m, n = scores.shape
    if n < m and not balanced:
        raise ValueError(
            f"{fn}: got n={n} local features for m={m} clusters, but the dustbin marginal "
            f"needs n >= m (its mass is log(n - m)). Use a larger input image (more local "
            f"features), fewer clusters, or balanced=True for marginals defined when n < m"
        )
    dustbin = _dustbin_tensor(fn, dustbin, scores)
    impl = _resolve_impl(fn, impl, scores, dustbin)
    dtype = _solve_dtype(scores.dtype)
    log_a, log_b, norm = dustbin_marginals(
        m, n, balanced=balanced, dtype=dtype, device=scores.device
    )
    log_a, log_b = log_a.expand(batch, m + 1), log_b.expand(batch, n)
    with _no_autocast(scores.device):
        s, z = scores.to(dtype), dustbin.to(dtype)
        diagnose = _make_diagnose(fn, "scores", z)
        out = _solve(impl, s, log_a, log_b, num_iters, dustbin=z, shift=-norm, diagnose=diagnose)
    return out.to(scores.dtype)


def _dustbin_tensor(fn: str, dustbin: object, scores: Tensor) -> Tensor:
    """The dustbin as a 0-dim floating tensor on ``scores``' device.

    Takes a tensor with one element, a real number (Python or NumPy scalar) or a one-element
    NumPy array.
    """
    if isinstance(dustbin, Tensor):
        if dustbin.numel() != 1:
            raise ValueError(
                f"{fn}: dustbin must be a scalar (0-dim tensor or float), got shape "
                f"{tuple(dustbin.shape)}"
            )
        if not dustbin.is_floating_point():
            dustbin = dustbin.to(scores.dtype)
        return dustbin.reshape(()).to(scores.device)
    if getattr(dustbin, "__array__", None) is not None and getattr(dustbin, "size", 0) == 1:
        dustbin = dustbin.reshape(()).item()  # NumPy array or scalar with one element
    if isinstance(dustbin, numbers.Real) and not isinstance(dustbin, bool):
        return torch.tensor(float(dustbin), dtype=scores.dtype, device=scores.device)
    raise TypeError(
        f"{fn}: dustbin must be a float or a 0-dim tensor, got {type(dustbin).__name__}"
    )
