"""SALAD aggregation: this library's SALAD vs the published formulation.

    python -m benchmarks.bench_salad          # full run
    python -m benchmarks.bench_salad --quick  # smoke run

The baseline is the published forward re-implemented here on the same weights: unrolled
log-domain Sinkhorn and ``.repeat()`` aggregation through two (B, l, m, n) tensors. Forward +
backward time (one process, alternating, medians), bytes saved for backward, and peak memory
of one forward + backward (peak RSS growth over the RSS before the step, each side in a
fresh subprocess on CPU; ``torch.cuda.max_memory_allocated`` on CUDA). Target (2-core CPU,
float32, B=32, C=384, 24x24, m=128, l=64, no token): >= 5x faster and >= 20x smaller peak
memory. The "agg-only" columns time the part the two sides do differently (Sinkhorn and
aggregation from the MLP outputs); the two MLPs are the same code on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks._common import (
    ROOT,
    alternating_medians,
    parser,
    peak_rss,
    print_table,
    reset_peak_rss,
    saved_bytes,
    write_json,
)
from gsra_salad import SALAD

CASES = [(32, 384, 24, 128, 64), (8, 384, 24, 128, 64)]  # (B, C, side, m, l)
QUICK = [(2, 32, 8, 16, 8)]


def published_forward(salad: SALAD, x: torch.Tensor) -> torch.Tensor:
    """The published SALAD forward (LRFR variant), on ``salad``'s weights."""
    f = salad.cluster_features(x).flatten(2)
    p = salad.score(x).flatten(2)
    return published_aggregate(salad, f, p)


def published_aggregate(salad: SALAD, f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The published Sinkhorn + ``.repeat()`` aggregation: f (B, l, n), scores (B, m, n)."""
    b, m, n = p.shape
    s_aug = torch.cat([p, salad.dust_bin.expand(b, 1, n)], 1)
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, device=p.device)
    log_a[:, -1] += math.log(n - m)
    log_b = torch.full((b, n), norm, device=p.device)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(3):
        u = log_a - torch.logsumexp(s_aug + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(s_aug + u.unsqueeze(2), dim=1)
    p = torch.exp(s_aug + u.unsqueeze(2) + v.unsqueeze(1) - norm)[:, :-1, :]
    p = p.unsqueeze(1).repeat(1, salad.cluster_dim, 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, salad.num_clusters, 1)
    return F.normalize(F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1), p=2, dim=-1)


def build(case, device):
    batch, channels, side, m, dim = case
    torch.manual_seed(0)
    salad = SALAD(channels, m, dim, token_dim=0, dropout=0.0).to(device)
    x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
    return salad, x


def step(salad, x, side):
    out = salad(x) if side == "ours" else published_forward(salad, x)
    out.sum().backward()


def peak_worker(case, side, device) -> None:
    """Prints the peak memory growth (bytes) of one forward + backward.

    On CPU the peak RSS is a high-water mark, so the first step is the one measured.
    """
    salad, x = build(case, device)
    if device.startswith("cuda"):
        step(salad, x, side)  # warm up kernels, then measure a fresh step
        x.grad = None
        salad.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(salad, x, side)
        print(json.dumps(torch.cuda.max_memory_allocated() - before))
        return
    before = reset_peak_rss()
    step(salad, x, side)
    print(json.dumps(peak_rss() - before))


def peak(case, side, device) -> int:
    cmd = [sys.executable, "-m", "benchmarks.bench_salad", "--worker", side]
    cmd += ["--case", json.dumps(case), "--device", device]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["ours", "published"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        peak_worker(tuple(json.loads(args.case)), args.worker, args.device)
        return
    cases = QUICK if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    rows = []
    for case in cases:
        salad, x = build(case, args.device)

        def run(side):
            def go():
                step(salad, x, side)
                x.grad = None
                salad.zero_grad(set_to_none=True)

            return go

        t = alternating_medians(
            {"published": run("published"), "ours": run("ours")},
            repeats=repeats,
            warmup=args.warmup,
            device=args.device,
        )
        mem = {
            side: saved_bytes(lambda s=side: step(salad, x, s)) for side in ("published", "ours")
        }
        # the part that differs: Sinkhorn + aggregation from the two MLPs' outputs
        with torch.no_grad():
            f0 = salad.cluster_features(x).flatten(2)
            s0 = salad.score(x).flatten(2)
        f0.requires_grad_()
        s0.requires_grad_()

        def agg(fn):
            def go():
                fn(f0, s0).sum().backward()
                f0.grad = s0.grad = None

            return go

        t.update(
            alternating_medians(
                {
                    "agg_published": agg(lambda f, s: published_aggregate(salad, f, s)),
                    "agg_ours": agg(salad._aggregate),
                },
                repeats=repeats,
                warmup=args.warmup,
                device=args.device,
            )
        )
        pk = {side: peak(case, side, args.device) for side in ("published", "ours")}
        batch, channels, side_px, m, dim = case
        rows.append(
            {
                "B,C,HxW,m,l": f"{batch},{channels},{side_px}x{side_px},{m},{dim}",
                "published f+b ms": t["published"] * 1e3,
                "ours f+b ms": t["ours"] * 1e3,
                "f+b x": t["published"] / t["ours"],
                "published saved MB": mem["published"] / 2**20,
                "ours saved MB": mem["ours"] / 2**20,
                "saved x": mem["published"] / mem["ours"],
                "published peak MB": pk["published"] / 2**20,
                "ours peak MB": pk["ours"] / 2**20,
                "peak x": pk["published"] / max(pk["ours"], 1),
                "agg-only published ms": t["agg_published"] * 1e3,
                "agg-only ours ms": t["agg_ours"] * 1e3,
                "agg-only x": t["agg_published"] / t["agg_ours"],
            }
        )
        print(f"done {rows[-1]['B,C,HxW,m,l']}", file=sys.stderr)
    print_table(rows, list(rows[0]))
    path = write_json("bench_salad", args.json, args.device, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
