"""GSRA block: fused (low-rank, recomputing backward) vs reference (literal) implementation.

    python -m benchmarks.bench_gsra          # full run (several minutes on 2 CPU cores)
    python -m benchmarks.bench_gsra --quick  # smoke run

Training forward+backward and eval forward, both implementations in one process, alternating,
medians and ratios; bytes autograd saves for backward. Targets (2-core CPU, float32, B=32,
C=384, 24x24, groups=32): training >= 25x faster, saved bytes >= 10x smaller, eval >= 40x faster.
"""

from __future__ import annotations

import copy
import sys

import torch

from benchmarks._common import alternating_medians, parser, print_table, saved_bytes, write_json
from gsra_salad import GlobalSpatialRelationAttention

CASES = [(32, 384, 24, 32), (8, 384, 24, 32), (32, 384, 16, 32)]  # (B, C, side, groups)
QUICK = [(2, 64, 8, 8)]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=5, warmup=1)
    args = p.parse_args()
    cases = QUICK if args.quick else CASES
    repeats = 2 if args.quick else args.repeats
    device = args.device
    rows = []
    for batch, channels, side, groups in cases:
        torch.manual_seed(0)
        ref = GlobalSpatialRelationAttention(channels, (side, side), groups, impl="reference")
        ref = ref.to(device)
        fused = copy.deepcopy(ref)
        fused.impl = "fused"
        x = torch.randn(batch, channels, side, side, device=device)
        xg = x.clone().requires_grad_()
        grad = torch.randn_like(x)

        def train(module):
            def run():
                module.train()
                module(xg).backward(grad)
                xg.grad = None
                module.zero_grad(set_to_none=True)

            return run

        def infer(module):
            def run():
                module.eval()
                with torch.no_grad():
                    module(x)

            return run

        t = alternating_medians(
            {"ref_train": train(ref), "fused_train": train(fused)},
            repeats=repeats,
            warmup=args.warmup,
            device=device,
        )
        t.update(
            alternating_medians(
                {"ref_eval": infer(ref), "fused_eval": infer(fused)},
                repeats=repeats,
                warmup=args.warmup,
                device=device,
            )
        )
        ref.train()
        fused.train()
        mem = {name: saved_bytes(lambda m=m: m(xg)) for name, m in (("ref", ref), ("fused", fused))}
        rows.append(
            {
                "B,C,HxW,g": f"{batch},{channels},{side}x{side},{groups}",
                "ref train ms": t["ref_train"] * 1e3,
                "fused train ms": t["fused_train"] * 1e3,
                "train x": t["ref_train"] / t["fused_train"],
                "ref eval ms": t["ref_eval"] * 1e3,
                "fused eval ms": t["fused_eval"] * 1e3,
                "eval x": t["ref_eval"] / t["fused_eval"],
                "ref saved MB": mem["ref"] / 2**20,
                "fused saved MB": mem["fused"] / 2**20,
                "saved x": mem["ref"] / mem["fused"],
            }
        )
        print(f"done {rows[-1]['B,C,HxW,g']}", file=sys.stderr)
    print_table(rows, list(rows[0]))
    path = write_json("bench_gsra", args.json, device, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
