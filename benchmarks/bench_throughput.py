"""Training throughput of lrfr(): this library's fused paths vs the published formulation.

    python -m benchmarks.bench_throughput            # the paper's sizes (GPU; minutes)
    python -m benchmarks.bench_throughput --quick    # smoke run (small images, few repeats)

One full training step on a batch of B pairs: both views forward, a symmetric InfoNCE loss
(written inline: temperature 0.07), backward, AdamW step. Images/s counts the images of both
views (2 B per step). Each setting is measured in float32, under bfloat16 autocast
(``torch.autocast``) and with ``channels_last`` weights and inputs (float32), for
``impl="auto"`` (this library) and ``impl="reference"`` (the published formulation: literal
GSRA, unrolled log-domain Sinkhorn; the published SALAD also materialises two (B, l, m, n)
tensors, which this library never does, so the reference column is an upper bound of the
published model's speed). All variants run in one process, alternating, and the medians are
reported. Settings: University-1652 (384 x 384 both views) and CVUSA / CVACT (query panorama
(140, 768), reference tile 384 x 384: one GSRA per view). A variant that fails (e.g. an
unsupported autocast path) is reported with its error instead of a time.
Needs the ``torchvision`` extra.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks._common import alternating_medians, parser, print_table, write_json
from gsra_salad import CrossViewGeoLocalizer

IMPLS = ("reference", "auto")
MODES = ("float32", "bfloat16", "channels_last")
# name: (reference view's size, query view's size)
SETTINGS = {
    "university1652": ((384, 384), (384, 384)),
    "cvusa": ((384, 384), (140, 768)),
}
QUICK_SETTINGS = {"two sizes": ((64, 64), (32, 128))}  # feature maps 4 x 4 and 2 x 8


def info_nce(query: torch.Tensor, reference: torch.Tensor, temperature: float = 0.07):
    """Symmetric InfoNCE on L2-normalised descriptors; pair i is the positive of row i."""
    logits = query.float() @ reference.float().T / temperature
    labels = torch.arange(len(query), device=query.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build_models(setting, quick: bool, device: str) -> dict[str, CrossViewGeoLocalizer]:
    """One model per (impl, memory format), all with the same initial weights."""
    (reference_size, query_size) = setting
    small = {"num_clusters": 16, "cluster_dim": 8} if quick else {}
    models: dict[str, CrossViewGeoLocalizer] = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        model = CrossViewGeoLocalizer.lrfr(
            img_size=reference_size, query_img_size=query_size, impl=impl, **small
        )
        if models:
            model.load_state_dict(models["reference"].state_dict())
        models[impl] = model.to(device).train()
        models[f"{impl}+cl"] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return models


def make_step(model, mode: str, batch: int, setting, device: str) -> Callable[[], None]:
    """A closure running one training step of ``model`` in ``mode`` on fixed random images."""
    (reference_size, query_size) = setting
    fmt = torch.channels_last if mode == "channels_last" else torch.contiguous_format
    query = torch.randn(batch, 3, *query_size, device=device).to(memory_format=fmt)
    reference = torch.randn(batch, 3, *reference_size, device=device).to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = torch.device(device).type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=mode == "bfloat16"):
            q, r = model(query, reference)
            loss = info_nce(q, r)
        loss.backward()
        optimizer.step()

    return step


def measure(name: str, setting, args) -> list[dict[str, object]]:
    """Rows (one per mode) of images/s for both impls and their ratio, for one setting."""
    models = build_models(setting, args.quick, args.device)
    steps, errors = {}, {}
    for mode in MODES:
        for impl in IMPLS:
            model = models[f"{impl}+cl" if mode == "channels_last" else impl]
            step = make_step(model, mode, args.batch, setting, args.device)
            try:
                step()  # also the first warm-up
            except RuntimeError as err:  # e.g. an autocast path a version does not support
                errors[(mode, impl)] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                continue
            steps[(mode, impl)] = step
    times = alternating_medians(
        {f"{mode}/{impl}": fn for (mode, impl), fn in steps.items()},
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
    )
    rows = []
    (reference_size, query_size) = setting
    for mode in MODES:
        row: dict[str, object] = {
            "setting": name,
            "query, reference": f"{query_size[0]}x{query_size[1]}, "
            f"{reference_size[0]}x{reference_size[1]}",
            "B": args.batch,
            "mode": mode,
        }
        for impl in IMPLS:
            label = "published" if impl == "reference" else "fused"
            seconds = times.get(f"{mode}/{impl}")
            row[f"{label} img/s"] = 2 * args.batch / seconds if seconds else "error"
        if all(f"{mode}/{impl}" in times for impl in IMPLS):
            row["x"] = times[f"{mode}/reference"] / times[f"{mode}/auto"]
        row.update({f"error {impl}": e for (m, impl), e in errors.items() if m == mode})
        rows.append(row)
    print(f"done {name}", file=sys.stderr)
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=5, warmup=1)
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    args = p.parse_args()
    settings = SETTINGS
    if args.quick:
        settings, args.batch, args.repeats, args.warmup = QUICK_SETTINGS, 2, 1, 0
    rows = [row for name, setting in settings.items() for row in measure(name, setting, args)]
    columns = ["setting", "query, reference", "B", "mode", "published img/s", "fused img/s", "x"]
    print_table(rows, columns)
    for row in rows:
        for key in (k for k in row if k.startswith("error")):
            print(f"{row['setting']} {row['mode']} {key}: {row[key]}")
    path = write_json("bench_throughput", args.json, args.device, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
