"""Demo: SALAD's optimal-transport assignment of local features to clusters, on random data.

    python examples/demo.py

Assigns the 24 x 24 = 576 local features of a batch of feature maps to 128 clusters plus a
dustbin, with the fused solver and with the reference (published) formulation, and prints how
they compare. Later releases replace this demo with the full model on synthetic data.
"""

from __future__ import annotations

import time

import torch

from gsra_salad import dustbin_sinkhorn


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    batch, clusters, features = 16, 128, 24 * 24
    scores = torch.randn(batch, clusters, features, requires_grad=True)
    dustbin = torch.nn.Parameter(torch.tensor(1.0))

    plan = {
        impl: dustbin_sinkhorn(scores, dustbin, 3, impl=impl) for impl in ("reference", "fused")
    }
    assignment = plan["fused"].exp()
    print(f"assignment shape (B, m + 1, n): {tuple(assignment.shape)}")
    print(f"every feature's mass sums to one: {torch.allclose(assignment.sum(1), torch.ones(1))}")
    print(f"mean share of each feature sent to the dustbin: {assignment[:, -1].mean():.3f}")
    diff = (plan["fused"] - plan["reference"]).abs().max().item()
    print(f"fused vs reference, max |log P difference|: {diff:.2e}")

    for impl in ("reference", "fused"):

        def step(impl=impl):
            dustbin_sinkhorn(scores, dustbin, 3, impl=impl).exp().sum().backward()

        print(f"{impl:>9}: forward + backward {timed(step) * 1e3:6.1f} ms")
    print(f"dustbin gradient (exactly zero by construction): {dustbin.grad.item()}")


if __name__ == "__main__":
    main()
