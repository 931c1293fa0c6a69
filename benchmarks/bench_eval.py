"""Streaming retrieval evaluation vs the dense baseline (and FAISS when installed).

    python -m benchmarks.bench_eval                 # the issue's size: 50,000 x 50,000 x 8,192
    python -m benchmarks.bench_eval --quick         # smoke run (small sizes, one repeat)
    python -m benchmarks.bench_eval --queries 5000 --references 5000 --dim 8192

Sides, each on the same descriptors (L2-normalised, row i of the queries matching row i of the
references, labels 0..N-1, protocol "cvusa"):

- ``streaming``: ``evaluate_retrieval`` (query chunks of about 2**25 similarities);
- ``dense``: the baseline of public code: ``q.float() @ r.float().T``, then each query's rank
  as the number of scores above its true reference's;
- ``faiss``: ``evaluate_retrieval(backend="faiss")`` (exact ``IndexFlatIP``, top-k only).

Each measurement runs in a fresh subprocess (sides alternate, ``--repeats`` rounds), which
builds the descriptors, returns the freed heap to the OS (``malloc_trim``), resets its peak RSS
and evaluates once: reported are the median seconds and the largest peak RSS growth above the
interpreter's baseline (descriptor storage included), also as a multiple of the descriptor
storage. Targets (issue 8): peak <= 2x the
storage, time no worse than dense. The full size needs ~16 GB for the dense float32 side.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import parser, peak_rss, print_table, reset_peak_rss, write_json
from gsra_salad.evaluation import evaluate_retrieval

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def make_descriptors(n: int, d: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """L2-normalised random descriptors, built in slices (no full float32 temporary)."""
    out = torch.empty(n, d, dtype=dtype, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    step = max(1, 2**22 // d)
    for start in range(0, n, step):
        block = torch.randn(min(step, n - start), d, generator=g)
        out[start : start + step] = torch.nn.functional.normalize(block, dim=1).to(dtype)
    return out


def make_pairs(q_count, r_count, d, dtype, device):
    """Queries and references where reference i = query i + noise (R@1 well below 100%)."""
    noise = d**0.5 / 4  # cosine of a true pair ~ 4 / sqrt(d), about the largest chance cosine
    q = make_descriptors(q_count, d, dtype, 0, device)
    r = make_descriptors(r_count, d, dtype, 1, device)
    step = max(1, 2**22 // d)
    for start in range(0, min(q_count, r_count), step):
        stop = min(start + step, q_count, r_count)
        mixed = q[start:stop].float() + noise * r[start:stop].float()
        r[start:stop] = torch.nn.functional.normalize(mixed, dim=1).to(dtype)
    return q, r


def dense_baseline(q, r, q_labels, r_labels, ks=(1, 5, 10)):
    """The full similarity matrix, then ranks: what public evaluation code does (Sample4Geo's
    ``calculate_scores`` counts per query; here per block of rows, vectorised, with as little
    memory beside the matrix), with ties counted against the query like ``evaluate_retrieval``."""
    sim = q.float() @ r.float().T
    index = torch.empty_like(r_labels)
    index[r_labels] = torch.arange(len(r_labels))
    true = sim.gather(1, index[q_labels].unsqueeze(1))
    rows = max(1, 2**22 // sim.shape[1])
    ranks = torch.cat([  # other references at least as similar (the default tie rule)
        (sim[i : i + rows] >= true[i : i + rows]).sum(1) - 1 for i in range(0, len(sim), rows)
    ])  # fmt: skip
    ks = (*ks, max(1, len(r) // 100))
    return {f"R@{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}


def release_freed_memory() -> None:
    """Returns freed heap memory to the OS (glibc), so that RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_side(side: str, q, r, labels_q, labels_r):
    if side == "dense":
        return dense_baseline(q, r, labels_q, labels_r)
    backend = "faiss" if side == "faiss" else "torch"
    return evaluate_retrieval(q, r, labels_q, labels_r, backend=backend)


def worker(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # first calls load libraries and allocate workspaces: do them before the baseline
    tiny_q, tiny_r = make_pairs(64, 64, 16, DTYPES[args.dtype], args.device)
    run_side(args.worker, tiny_q, tiny_r, torch.arange(64), torch.arange(64))
    del tiny_q, tiny_r
    release_freed_memory()
    base = reset_peak_rss()
    dtype = DTYPES[args.dtype]
    q, r = make_pairs(args.queries, args.references, args.dim, dtype, args.device)
    labels_q, labels_r = torch.arange(args.queries), torch.arange(args.references)
    # the generation's temporaries are freed, but the C heap keeps them (RSS) unless trimmed
    release_freed_memory()
    reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run_side(args.worker, q, r, labels_q, labels_r)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else peak_rss() - base
    )
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "result": result}))


def measure(args, side: str, dtype: str) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.bench_eval", "--worker", side, "--dtype", dtype,
        "--queries", str(args.queries), "--references", str(args.references),
        "--dim", str(args.dim), "--device", args.device, "--threads", str(args.threads),
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{side}/{dtype} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p: argparse.ArgumentParser = parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--references", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=8_192)
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--sides", default=None, help="comma-separated; default: all available")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.set_defaults(repeats=3)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.queries, args.references, args.dim, args.repeats = 2_000, 2_000, 256, 1
    sides = args.sides.split(",") if args.sides else ["streaming", "dense"]
    if not args.sides and faiss_available():
        sides.append("faiss")
    dtypes = args.dtypes.split(",")

    samples: dict[tuple[str, str], list[dict]] = {(s, d): [] for s in sides for d in dtypes}
    for _ in range(args.repeats):  # alternate the sides, each in a fresh process
        for dtype in dtypes:
            for side in sides:
                samples[side, dtype].append(measure(args, side, dtype))

    rows = []
    for dtype in dtypes:
        storage = (args.queries + args.references) * args.dim * DTYPES[dtype].itemsize
        dense_s = (
            statistics.median(m["seconds"] for m in samples["dense", dtype])
            if "dense" in sides
            else None
        )
        for side in sides:
            ms = samples[side, dtype]
            seconds = statistics.median(m["seconds"] for m in ms)
            peak = max(m["peak_bytes"] for m in ms)
            row = {
                "side": side,
                "storage": dtype,
                "Q x R x D": f"{args.queries} x {args.references} x {args.dim}",
                "seconds": seconds,
                "time / dense": seconds / dense_s if dense_s else float("nan"),
                "peak MB": peak / 2**20,
                "peak / storage": peak / storage,
                "storage MB": storage / 2**20,
                "R@1": ms[0]["result"]["R@1"],
            }
            rows.append(row)
    columns = ["side", "storage", "Q x R x D", "seconds", "time / dense", "peak MB",
               "storage MB", "peak / storage", "R@1"]  # fmt: skip
    print_table(rows, columns)
    path = write_json(
        "bench_eval", args.json, args.device, rows,
        sizes={"queries": args.queries, "references": args.references, "dim": args.dim},
        repeats=args.repeats, threads=args.threads,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
