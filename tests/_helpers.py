"""Helpers shared by the tests: devices, tolerances, saved-bytes counting, the SALAD oracle.

Import them as ``from tests._helpers import ...`` (``tests`` is a package, so this works from
the checkout, from an unpacked sdist, with ``pytest`` or ``python -m pytest``).
"""

import contextlib
import math
import socket

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Per-dtype tolerances for fast path vs reference (kornia-style table).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the ``with`` block."""

    def __init__(self):
        self.bytes = 0

    def _pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# Parameters whose gradient is zero by the math, for any input (the end of the name: why).
# Rounding leaves ~eps-sized values on the last two (float32: below 1e-8 of the largest
# gradient, against 1e-4 for the smallest real one in these tests' models).
ZERO_GRADIENT = {
    "dust_bin": "SALAD: the Sinkhorn iterations cancel the constant dustbin row (exactly 0)",
    "score.3.bias": "SALAD: a constant per cluster row of the scores, cancelled by the row "
    "normalisation of the Sinkhorn iterations",
    "gg_spatial.1.bias": "GSRA in training mode: a constant shift that the 1x1 conv carries into "
    "BatchNorm2d(1), whose batch mean removes it",
}


def assert_gradients(named_parameters, zero, *, rounding=1e-6, real=1e-5):
    """Every parameter has a gradient; those whose name ends with one of ``zero`` (keys of
    :data:`ZERO_GRADIENT`) are zero up to rounding (at most ``rounding`` of the largest
    gradient), every other one is well above rounding (more than ``real`` of it)."""
    grads = dict(named_parameters)
    missing = [name for name, p in grads.items() if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    size = {name: p.grad.detach().abs().max().item() for name, p in grads.items()}
    scale = max(size.values())
    assert scale > 0
    for name, value in size.items():
        if name.endswith(tuple(zero)):
            why = next(ZERO_GRADIENT[key] for key in zero if name.endswith(key))
            assert value <= rounding * scale, (name, value / scale, why)
        else:
            assert value > real * scale, (name, value / scale)


def published_matching_probs(scores, dustbin, num_iters=3):
    """The published SALAD ``get_matching_probs``, written out as the test oracle."""
    b, m, n = scores.shape
    s_aug = torch.cat([scores, torch.as_tensor(dustbin).to(scores).expand(b, 1, n)], 1)
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, dtype=scores.dtype)
    log_a[:, -1] += math.log(n - m)
    log_b = torch.full((b, n), norm, dtype=scores.dtype)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(s_aug + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(s_aug + u.unsqueeze(2), dim=1)
    return s_aug + u.unsqueeze(2) + v.unsqueeze(1) - norm


def randomise_norms(module, *, std=1.0, affine=True, var=(0.5, 2.0)):
    """Non-trivial norm-layer state, so that eval mode and the affine terms are exercised.

    BatchNorm2d running means ~ N(0, std^2) and variances ~ U(var); with ``affine``, the
    weights of BatchNorm2d / GroupNorm ~ U(0.5, 1.5) and biases ~ N(0, std^2). Returns ``module``.
    """
    with torch.no_grad():
        for m in module.modules():
            if affine and isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, std)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, std)
                m.running_var.uniform_(*var)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int):
    """A gloo process group on 127.0.0.1:``port`` for one spawned test worker.

    On success every rank waits for the others before leaving: a rank that tears its group down
    while a peer still talks to it makes gloo abort the peer ("terminate called without an
    active exception", SIGABRT), which made multi-process tests flaky.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
