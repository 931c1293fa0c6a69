"""The LRFR model with fused paths vs the same model with every impl="reference".

    python -m benchmarks.bench_model          # full run (ConvNeXt-T, B=8, 384x384; minutes)
    python -m benchmarks.bench_model --quick  # smoke run (small images, few repeats)

"reference" is the published formulation (literal GSRA, unrolled Sinkhorn); the published SALAD
also builds two (B, l, m, n) tensors with .repeat(), which this library never does, so the
reference column is a lower bound of the published model's cost. Reported: training step
(forward + backward) of the head (attention + aggregation, on fixed backbone features) and of
the whole model, inference throughput, bytes saved for backward, and the peak memory of one
training step (peak RSS growth, each side in a fresh subprocess on CPU;
``torch.cuda.max_memory_allocated`` on CUDA). Needs the ``torchvision`` extra.
The "+ckpt" columns also turn on ``set_grad_checkpointing()`` (the trunk recomputes its
activations in the backward pass). Targets (CPU): head forward+backward >= 10x faster; whole
training step >= 1.5x faster with >= 2x smaller peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

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
from gsra_salad import CrossViewGeoLocalizer

VARIANTS = ("auto", "reference", "auto+ckpt")  # "auto+ckpt": also set_grad_checkpointing()


def build(variant: str, img_size: int, device: str) -> CrossViewGeoLocalizer:
    torch.manual_seed(0)
    impl, _, ckpt = variant.partition("+")
    model = CrossViewGeoLocalizer.lrfr(img_size=img_size, impl=impl).to(device)
    if ckpt:
        model.set_grad_checkpointing()
    return model


def train_step(model, images):
    model.train()
    model(images).sum().backward()
    model.zero_grad(set_to_none=True)


def peak_worker(variant: str, batch: int, img_size: int, device: str) -> None:
    model = build(variant, img_size, device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    if device.startswith("cuda"):
        train_step(model, images)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, images)
        print(json.dumps(torch.cuda.max_memory_allocated() - before))
        return
    before = reset_peak_rss()
    train_step(model, images)
    print(json.dumps(peak_rss() - before))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3, warmup=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    batch, size = (2, 192) if args.quick else (args.batch, args.img_size)
    if args.worker:
        peak_worker(args.worker, batch, size, args.device)
        return
    device = args.device
    repeats = 2 if args.quick else args.repeats
    models = {variant: build(variant, size, device) for variant in VARIANTS}
    for variant in VARIANTS[1:]:
        models[variant].load_state_dict(models["auto"].state_dict())
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        features = models["auto"].backbone(images)
    feats = features.clone().requires_grad_()

    def head(model):
        def run():
            model.train()
            model.aggregation(model.attention(feats)).sum().backward()
            feats.grad = None
            model.zero_grad(set_to_none=True)

        return run

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(images)

        return run

    t = {}
    for name, make in (("head", head), ("train", lambda m: lambda: train_step(m, images))):
        chosen = models if name == "train" else {k: models[k] for k in VARIANTS[:2]}
        t.update(
            {
                f"{name}_{impl}": v
                for impl, v in alternating_medians(
                    {impl: make(m) for impl, m in chosen.items()},
                    repeats=repeats,
                    warmup=args.warmup,
                    device=device,
                ).items()
            }
        )
        print(f"done {name}", file=sys.stderr)
    t.update(
        {
            f"infer_{impl}": v
            for impl, v in alternating_medians(
                {impl: infer(m) for impl, m in list(models.items())[:2]},
                repeats=repeats,
                warmup=args.warmup,
                device=device,
            ).items()
        }
    )
    saved = {}
    for impl, model in models.items():
        model.train()
        saved[impl] = saved_bytes(lambda m=model: m(images))
    peak = {}
    for impl in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.bench_model", "--worker", impl, "--device", device]
        cmd += ["--batch", str(batch), "--img-size", str(size)] + (
            ["--quick"] if args.quick else []
        )
        peak[impl] = int(
            subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        )
    row = {
        "B, image": f"{batch}, {size}x{size}",
        "head f+b ref ms": t["head_reference"] * 1e3,
        "head f+b fused ms": t["head_auto"] * 1e3,
        "head x": t["head_reference"] / t["head_auto"],
        "train ref ms": t["train_reference"] * 1e3,
        "train fused ms": t["train_auto"] * 1e3,
        "train x": t["train_reference"] / t["train_auto"],
        "infer ref img/s": batch / t["infer_reference"],
        "infer fused img/s": batch / t["infer_auto"],
        "infer x": t["infer_reference"] / t["infer_auto"],
        "saved ref MB": saved["reference"] / 2**20,
        "saved fused MB": saved["auto"] / 2**20,
        "peak ref MB": peak["reference"] / 2**20,
        "peak fused MB": peak["auto"] / 2**20,
        "peak x": peak["reference"] / max(peak["auto"], 1),
        "train fused+ckpt ms": t["train_auto+ckpt"] * 1e3,
        "train x (ckpt)": t["train_reference"] / t["train_auto+ckpt"],
        "saved fused+ckpt MB": saved["auto+ckpt"] / 2**20,
        "peak fused+ckpt MB": peak["auto+ckpt"] / 2**20,
        "peak x (ckpt)": peak["reference"] / max(peak["auto+ckpt"], 1),
    }
    print_table([row], list(row))
    path = write_json("bench_model", args.json, device, [row])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
