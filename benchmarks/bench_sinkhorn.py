"""Reference vs fused Sinkhorn: time, bytes saved for backward, float32 error.

    python -m benchmarks.bench_sinkhorn          # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.bench_sinkhorn --quick  # smoke run

For each (B, m, n) and K, both implementations of ``dustbin_sinkhorn`` and ``log_sinkhorn`` run
in one process, alternating; the table gives medians and ratios (reference / fused), the bytes
autograd saves for backward, and the fused forward time in units of one
``torch.logsumexp`` pass over (B, m + 1, n) times 2K (the reference's floor). The error columns
are relative L2 errors of float32 against a float64 solve, of P = exp(log P) and of dL/dS.
"""

from __future__ import annotations

import math
import sys

import torch

from benchmarks._common import alternating_medians, parser, print_table, saved_bytes, write_json
from gsra_salad import dustbin_sinkhorn, log_sinkhorn

SHAPES = [(32, 64, 256), (32, 128, 576), (128, 64, 196)]
QUICK_SHAPES = [(4, 16, 64)]
ITERS = [3, 10]
TARGETS = {  # (op, K): (fwd+bwd speed-up, saved-bytes ratio)
    ("dustbin", 3): (5.0, 6.0),
    ("dustbin", 10): (9.0, 15.0),
    ("log", 3): (1.0, 5.0),
    ("log", 10): (1.0, 5.0),
}


def make_op(op: str, m: int, n: int, k: int, impl: str):
    if op == "dustbin":
        return lambda s: dustbin_sinkhorn(s, 1.0, k, impl=impl)
    log_a = torch.full((m + 1,), -math.log(m + 1))
    log_b = torch.full((n,), -math.log(n))
    return lambda s: log_sinkhorn(s, log_a.to(s), log_b.to(s), k, impl=impl)


def relative_errors(
    op: str, m: int, n: int, k: int, impl: str, scale: float
) -> tuple[float, float]:
    """Relative L2 error of P and dL/dS in float32, against the float64 reference."""
    gen = torch.Generator().manual_seed(1)
    rows = m if op == "dustbin" else m + 1
    s64 = torch.randn(8, rows, n, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(8, m + 1, n, generator=gen, dtype=torch.float64)

    def solve(s, fn):
        s = s.clone().requires_grad_()
        p = fn(s).exp()
        (grad,) = torch.autograd.grad((p * w.to(p)).sum(), s)
        return p.double(), grad.double()

    p_ref, g_ref = solve(s64, make_op(op, m, n, k, "reference"))
    p, g = solve(s64.float(), make_op(op, m, n, k, impl))
    return ((p - p_ref).norm() / p_ref.norm()).item(), ((g - g_ref).norm() / g_ref.norm()).item()


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    device = args.device
    rows = []
    for batch, m, n in shapes:
        for k in ITERS:
            for op in ("dustbin", "log"):
                rows_in = m if op == "dustbin" else m + 1
                s = torch.randn(batch, rows_in, n, device=device)
                s_grad = s.clone().requires_grad_()
                grad_out = torch.randn(batch, m + 1, n, device=device)
                fns = {impl: make_op(op, m, n, k, impl) for impl in ("reference", "fused")}
                lse_in = torch.randn(batch, m + 1, n, device=device)

                def fwd(fn):
                    def run():
                        with torch.no_grad():
                            fn(s)

                    return run

                def fwd_bwd(fn):
                    def run():
                        fn(s_grad).backward(grad_out)
                        s_grad.grad = None

                    return run

                t = alternating_medians(
                    {
                        "ref_fwd": fwd(fns["reference"]),
                        "fused_fwd": fwd(fns["fused"]),
                        "ref_fb": fwd_bwd(fns["reference"]),
                        "fused_fb": fwd_bwd(fns["fused"]),
                        "lse": lambda: torch.logsumexp(lse_in, dim=-1),
                    },
                    repeats=repeats,
                    warmup=args.warmup,
                    device=device,
                )
                mem = {impl: saved_bytes(lambda f=f: f(s_grad)) for impl, f in fns.items()}
                row = {
                    "op": op,
                    "B,m,n": f"{batch},{m},{n}",
                    "K": k,
                    "ref fwd ms": t["ref_fwd"] * 1e3,
                    "fused fwd ms": t["fused_fwd"] * 1e3,
                    "fwd x": t["ref_fwd"] / t["fused_fwd"],
                    "ref f+b ms": t["ref_fb"] * 1e3,
                    "fused f+b ms": t["fused_fb"] * 1e3,
                    "f+b x": t["ref_fb"] / t["fused_fb"],
                    "fused fwd / (2K lse)": t["fused_fwd"] / (2 * k * t["lse"]),
                    "ref saved MB": mem["reference"] / 2**20,
                    "fused saved MB": mem["fused"] / 2**20,
                    "saved x": mem["reference"] / mem["fused"],
                }
                if device == "cpu":
                    for scale in (1.0, 100.0):
                        for impl in ("reference", "fused"):
                            ep, eg = relative_errors(op, min(m, 64), min(n, 256), k, impl, scale)
                            tag = "" if scale == 1 else "x100 "
                            row[f"{impl} err P {tag}"] = ep
                            row[f"{impl} err dS {tag}"] = eg
                speed_target, mem_target = TARGETS[(op, k)]
                row["meets targets"] = row["f+b x"] >= speed_target and row["saved x"] >= mem_target
                rows.append(row)
                print(f"done {op} {batch},{m},{n} K={k}", file=sys.stderr)
    timing = ["op", "B,m,n", "K", "ref fwd ms", "fused fwd ms", "fwd x", "ref f+b ms",
              "fused f+b ms", "f+b x", "fused fwd / (2K lse)", "ref saved MB", "fused saved MB",
              "saved x", "meets targets"]  # fmt: skip
    print_table(rows, timing)
    if device == "cpu":
        print()
        errors = ["op", "K"] + [c for c in rows[0] if " err " in c]
        print_table([r for r in rows if r["B,m,n"] == rows[0]["B,m,n"]], errors)
    path = write_json("bench_sinkhorn", args.json, device, rows, targets=str(TARGETS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
