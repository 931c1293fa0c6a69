"""The library's training step against a literal transcription of each published recipe.

For ``lrfr-university1652`` (LRFR's ``train_university.py``) and ``sample4geo-cvusa`` /
``sample4geo-cvact`` (Sample4Geo's ``train_cvusa.py``), the same small float64 model starts
from the same weights and trains on the same fixed batches twice:

- the library: :func:`~gsra_salad.training.build_train_state` from the recipe's
  :class:`~gsra_salad.training.TrainConfig`, :func:`~gsra_salad.recipes.build_loss`, and
  :func:`~gsra_salad.training.train_one_epoch`;
- the transcription: the published loop written out as the papers' code has it (AdamW with
  torch's defaults over the model's parameters (and Sample4Geo's ``logit_scale``),
  ``transformers``' ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``
  lambdas, LRFR's ``SemiSoftTriHard`` / Sample4Geo's ``InfoNCE`` with
  ``CrossEntropyLoss(label_smoothing=0.1)``, ``clip_grad_value_(100)``), with no code of the
  library.

It prints, per recipe, the largest weight difference after the run and the largest
learning-rate difference over its steps (both ~1e-15 when the step is exact), and the
learning rate of the last step as a fraction of the peak. Sampling, augmentation and float16
loss scaling are not part of the comparison (fixed batches; float64 on the CPU has no scaler):
their published values are tested in ``tests/test_published_recipes.py``.

Run: ``python -m benchmarks.reproduce_published [--steps-per-epoch 3 --epochs 2 --batch 6]``
from the repository root (CPU, under a minute). The test suite runs it at a tiny size.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from gsra_salad import recipes
from gsra_salad.training import (
    TrainStep,
    build_train_state,
    get_context,
    train_one_epoch,
)

RECIPES = ("lrfr-university1652", "sample4geo-cvusa", "sample4geo-cvact")


# -- the published code, transcribed -----------------------------------------------------------


def transformers_linear(num_warmup_steps: int, num_training_steps: int):
    """``transformers.get_linear_schedule_with_warmup``'s lambda."""

    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(
            0.0,
            float(num_training_steps - current_step)
            / float(max(1, num_training_steps - num_warmup_steps)),
        )

    return lr_lambda


def transformers_cosine(num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5):
    """``transformers.get_cosine_schedule_with_warmup``'s lambda."""

    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        progress = float(current_step - num_warmup_steps) / float(
            max(1, num_training_steps - num_warmup_steps)
        )
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return lr_lambda


def semi_soft_tri_hard(grd_global, sat_global, alpha=10):
    """LRFR's ``SemiSoftTriHard.forward`` (utils/losses.py), on the CPU."""

    def get_semi_hard_neg(logits, pos_dist):
        N = logits.shape[0]
        targets = torch.arange(0, N, dtype=torch.long)
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask_ = torch.lt(logits, pos_dist.unsqueeze(1))
        mask[targets, targets] = False
        mask_[targets, targets] = False
        mininum = torch.mul(logits, mask_)
        hard_neg_dist1, _ = torch.max(mininum, 1)
        hard_neg_dist2, _ = torch.min(logits[mask].reshape(N, -1), 1)
        return torch.max(hard_neg_dist1, hard_neg_dist2)

    def weighted_soft_margin_loss(diff, beta=10.0):
        return torch.mean(torch.log(1 + torch.exp(diff * beta)))

    dist_array = 2.0 - 2.0 * torch.matmul(sat_global, grd_global.t())
    pos_dist = torch.diag(dist_array)
    hard_neg_dist_g2s = get_semi_hard_neg(dist_array, pos_dist)
    hard_neg_dist_s2g = get_semi_hard_neg(dist_array.t(), pos_dist)
    return (
        weighted_soft_margin_loss(pos_dist - hard_neg_dist_g2s.t(), alpha)
        + weighted_soft_margin_loss(pos_dist - hard_neg_dist_s2g.t(), alpha)
    ) / 2.0


def sample4geo_info_nce(image_features1, image_features2, logit_scale, loss_function):
    """Sample4Geo's ``InfoNCE.forward`` (sample4geo/loss.py)."""
    image_features1 = F.normalize(image_features1, dim=-1)
    image_features2 = F.normalize(image_features2, dim=-1)
    logits_per_image1 = logit_scale * image_features1 @ image_features2.T
    logits_per_image2 = logits_per_image1.T
    labels = torch.arange(len(logits_per_image1), dtype=torch.long)
    return (loss_function(logits_per_image1, labels) + loss_function(logits_per_image2, labels)) / 2


def sample4geo_shuffle(
    train_ids, sim_dict, batch_size, neighbour_select=64, neighbour_range=128, seed=0
):
    """Sample4Geo's ``CVUSADatasetTrain.shuffle`` (also CVACT's): one epoch's sample order,
    ``batch_size`` at a time; ``sim_dict[id]`` lists an id's neighbours, nearest first (GPS
    at first, ground->satellite similarity after each evaluation). Python's ``random`` seeded
    with ``seed``; the progress bar left out."""
    import random

    random.seed(seed)
    idx_pool = copy.deepcopy(list(train_ids))
    neighbour_split = neighbour_select // 2
    if sim_dict is not None:
        similarity_pool = copy.deepcopy(sim_dict)
    random.shuffle(idx_pool)
    idx_epoch = set()
    idx_batch = set()
    batches = []
    current_batch = []
    break_counter = 0
    while True:
        if len(idx_pool) > 0:
            idx = idx_pool.pop(0)
            if idx not in idx_batch and idx not in idx_epoch and len(current_batch) < batch_size:
                idx_batch.add(idx)
                current_batch.append(idx)
                idx_epoch.add(idx)
                break_counter = 0
                if sim_dict is not None and len(current_batch) < batch_size:
                    near_similarity = similarity_pool[idx][:neighbour_range]
                    near_neighbours = copy.deepcopy(near_similarity[:neighbour_split])
                    far_neighbours = copy.deepcopy(near_similarity[neighbour_split:])
                    random.shuffle(far_neighbours)
                    far_neighbours = far_neighbours[:neighbour_split]
                    near_similarity_select = near_neighbours + far_neighbours
                    for idx_near in near_similarity_select:
                        if len(current_batch) >= batch_size:
                            break
                        if idx_near not in idx_batch and idx_near not in idx_epoch and idx_near:
                            idx_batch.add(idx_near)
                            current_batch.append(idx_near)
                            idx_epoch.add(idx_near)
                            similarity_pool[idx].remove(idx_near)
                            break_counter = 0
            else:
                if idx not in idx_batch and idx not in idx_epoch:
                    idx_pool.append(idx)
                break_counter += 1
            if break_counter >= 1024:
                break
        else:
            break
        if len(current_batch) >= batch_size:
            batches.extend(current_batch)
            idx_batch = set()
            current_batch = []
    return batches


def published_loop(name: str, model, batches, steps_per_epoch: int, epochs: int):
    """The published training loop on fixed batches; returns (model, logit_scale, lrs)."""
    train_steps = steps_per_epoch * epochs
    params = list(model.parameters())
    logit_scale = None
    if name.startswith("sample4geo"):
        # the model's float32 parameter, as Sample4Geo creates it, then in float64 as the model
        logit_scale = torch.nn.Parameter((torch.ones([]) * math.log(1 / 0.07)).double())
        params.append(logit_scale)  # model.logit_scale is one of the model's parameters
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        warmup_steps = steps_per_epoch * 1  # warmup_epochs = 1
        lr_lambda = transformers_cosine(warmup_steps, train_steps)
        loss_function = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        lr_lambda = transformers_linear(0, int(1.05 * train_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    lrs = []
    model.train()
    for query, reference, _ in batches:
        optimizer.zero_grad()
        features1, features2 = model(query, reference)
        if logit_scale is None:
            loss = semi_soft_tri_hard(features1, features2)
        else:
            loss = sample4geo_info_nce(features1, features2, logit_scale.exp(), loss_function)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 100)
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return model, logit_scale, lrs


# -- the library -------------------------------------------------------------------------------


class _FixedBatches:
    """A sampler stand-in: ``len()`` batches per epoch (what sizes the schedule)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def state_dict(self):
        return {"epoch": 0, "neighbours": None}


class _Loader:
    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def library_loop(recipe, model, batches, steps_per_epoch: int, epochs: int):
    """The library's step: the recipe's config, loss, state and ``train_one_epoch``."""
    config = dataclasses.replace(recipe.train, epochs=epochs, progress=False, precision="fp32")
    loss = recipes.build_loss(recipe).double()
    state = build_train_state(model, loss, _FixedBatches(steps_per_epoch), config)
    step = TrainStep(model, loss)
    context = get_context()
    lrs = []
    for epoch in range(epochs):
        chunk = batches[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        for batch in chunk:  # one step at a time, to read every learning rate
            train_one_epoch(step, state, _Loader([batch]), context)
            lrs.append(state.optimizer.param_groups[0]["lr"])
        state.next_epoch = epoch + 1
    scale = getattr(loss, "log_logit_scale", None)
    return model, scale, lrs


# -- the comparison ----------------------------------------------------------------------------


def tiny_model(seed: int, size):
    """A tiny ConvNeXt-free model of the same kind (a small CNN, GSRA, SALAD), in float64."""
    from gsra_salad import SALAD, CrossViewGeoLocalizer, GlobalSpatialRelationAttention
    from gsra_salad.models import TinyCNN

    torch.manual_seed(seed)
    channels = 16
    feature_map = (size[0] // TinyCNN.stride, size[1] // TinyCNN.stride)
    return CrossViewGeoLocalizer(
        TinyCNN(channels, width=4),
        GlobalSpatialRelationAttention(channels, feature_map, groups=4),
        SALAD(channels, num_clusters=4, cluster_dim=8, token_dim=0, dropout=0.0),
    ).double()


def compare(
    name: str, *, steps_per_epoch: int = 3, epochs: int = 2, batch: int = 6, seed: int = 0
) -> dict:
    """One recipe: the largest weight and learning-rate differences, and the last lr / peak."""
    recipe = recipes.get(name)
    query_size = reference_size = (32, 64)
    model = tiny_model(seed, query_size)
    reference_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [
        (
            torch.randn(batch, 3, *query_size, generator=g, dtype=torch.float64),
            torch.randn(batch, 3, *reference_size, generator=g, dtype=torch.float64),
            torch.arange(batch),
        )
        for _ in range(steps_per_epoch * epochs)
    ]
    ours, our_scale, our_lrs = library_loop(recipe, model, batches, steps_per_epoch, epochs)
    theirs, their_scale, their_lrs = published_loop(
        name, reference_model, batches, steps_per_epoch, epochs
    )
    weight = max(
        (a - b).abs().max().item()
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values())
        if a.is_floating_point()
    )
    if our_scale is not None:
        weight = max(weight, (our_scale - their_scale).abs().item())
    lr = max(abs(a - b) for a, b in zip(our_lrs, their_lrs))
    # the learning rate of the last step (set by the previous scheduler step) over the peak
    peak = recipe.train.lr
    last = their_lrs[-2] if len(their_lrs) > 1 else peak
    return {
        "recipe": name,
        "steps": len(batches),
        "max_weight_diff": weight,
        "max_lr_diff": lr,
        "last_step_lr_over_peak": last / peak,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-per-epoch", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    results = [
        compare(name, steps_per_epoch=args.steps_per_epoch, epochs=args.epochs, batch=args.batch)
        for name in args.recipes
    ]
    print(f"{'recipe':<22} {'steps':>5} {'max |dw|':>10} {'max |dlr|':>10} {'last lr/peak':>12}")
    for r in results:
        print(
            f"{r['recipe']:<22} {r['steps']:>5} {r['max_weight_diff']:>10.1e} "
            f"{r['max_lr_diff']:>10.1e} {r['last_step_lr_over_peak']:>12.4f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
