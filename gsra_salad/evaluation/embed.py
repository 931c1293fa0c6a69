"""``embed``: descriptors and labels of a whole evaluation set, on one or many processes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .._distributed import rank_and_world_size
from .._precision import AUTOCAST_DTYPES, resolve_precision
from .._progress import progress_bar

__all__ = ["embed"]


def _modules_of(fn: Any) -> list[nn.Module]:
    """The modules whose train/eval mode ``fn`` depends on, where that can be seen: ``fn``
    itself, the module of a bound method (``model.embed``), or either inside a
    ``functools.partial``."""
    if isinstance(fn, functools.partial):
        return _modules_of(fn.func) + [a for a in fn.args if isinstance(a, nn.Module)]
    if isinstance(fn, nn.Module):
        return [fn]
    owner = getattr(fn, "__self__", None)
    return [owner] if isinstance(owner, nn.Module) else []


@contextlib.contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    modes = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _split_item(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "embed: dataset items must be (image, label) pairs, so that batches are "
            f"(images, labels); got a batch of type {type(batch).__name__}"
        )
    images, labels = batch
    return images, _label_tensor(labels)


def _label_tensor(labels: Any) -> Tensor:
    """A batch's labels as a tensor of integers, or a ValueError that says how to get them."""
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dtype == torch.bool or t.is_complex():
        first = labels[0] if isinstance(labels, (list, tuple)) and labels else labels
        raise ValueError(
            "embed: labels must be integers (location ids, compared by evaluate_retrieval), "
            f"got {type(first).__name__} labels such as {first!r}. Map them to integers in "
            "the dataset, e.g. ids = {name: i for i, name in enumerate(sorted(names))}, and "
            "keep the mapping to read the results back"
        )
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(
            f"embed: labels must be integers (location ids), got non-integer {t.dtype} values "
            f"such as {t[t != t.round()][0].item()}; converting would truncate them"
        )
    return t


def _autocast(device: torch.device, amp: bool | torch.dtype | None, precision: str | None):
    if precision is not None:
        if amp is not None:
            raise ValueError("embed: give precision= or amp=, not both")
        concrete = resolve_precision(precision, device)
        amp = None if concrete == "fp32" else AUTOCAST_DTYPES[concrete]
    if amp is None or amp is False:
        return contextlib.nullcontext()
    if amp is True:
        return torch.autocast(device.type)
    if isinstance(amp, torch.dtype):
        return torch.autocast(device.type, dtype=amp)
    raise ValueError(f"embed: amp must be None, a bool or a torch.dtype, got {amp!r}")


def embed(
    model_or_callable: Callable[[Tensor], Tensor],
    dataset_or_loader: Dataset | DataLoader,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool | torch.dtype | None = None,
    precision: str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Descriptors and labels of a whole evaluation set, in batches.

    Runs under :func:`torch.inference_mode`, optionally under :func:`torch.autocast`. A
    ``nn.Module`` (or a bound method of one, such as ``model.embed``, or a
    :func:`functools.partial` of either) is switched to ``eval()`` for the pass and restored to
    its previous mode afterwards; for any other callable (a lambda), put the model in eval mode
    yourself. A tqdm bar is shown when ``progress`` is set and the ``progress`` extra is
    installed (silent otherwise; only on rank 0).

    Under an initialised process group (``torch.distributed``), each of the W ranks embeds every
    W-th item (the order of ``DistributedSampler(shuffle=False)``, padded to equal shares) and
    the results are gathered, the padded duplicates dropped, so every rank returns the whole
    set in dataset order. A given ``DataLoader`` is then rebuilt over the rank's share with the
    loader's batch size, workers and collate function (its sampler must not shuffle).

    Args:
        model_or_callable: maps an image batch (B, 3, H, W) on ``device`` to descriptors (B, D).
        dataset_or_loader: a dataset of ``(image, label)`` items with integer labels, or a
            ``DataLoader`` yielding ``(images, labels)`` batches (used as given on one process).
        batch_size: batch size when a dataset is given.
        device: where images are sent; default: the module's device (CPU for other callables).
        amp: ``None``/``False`` (no autocast), ``True`` (autocast with the device type's default
            dtype) or a dtype such as ``torch.bfloat16``.
        precision: the training vocabulary instead of ``amp``: ``"fp32"``, ``"bf16"``,
            ``"fp16"``, ``"amp"`` or ``"auto"`` (as ``TrainConfig.precision``; see
            :mod:`gsra_salad.training.precision`).
        progress: show a progress bar (needs tqdm).
        num_workers: DataLoader workers when a dataset is given.
        dtype: floating dtype of the returned descriptors (float16 halves their memory).

    Returns:
        ``(descriptors (N, D) on device, in dtype; labels (N,) int64 on the CPU)``.

    Raises:
        ValueError: items that are not (image, label) pairs, labels that are not integers
            (strings: map them to integer ids in the dataset), a bad batch size or amp, a
            callable that returns no (B, D) tensor, a shuffling loader under a process group.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
        >>> descriptors, labels = embed(model, data, batch_size=4, progress=False)
        >>> descriptors.shape, labels.tolist() == list(range(10)), model.training
        (torch.Size([10, 16]), True, True)
    """
    if not callable(model_or_callable):
        raise TypeError(
            f"embed: model_or_callable must be callable, got {type(model_or_callable).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"embed: batch_size must be a positive int, got {batch_size}")
    if not dtype.is_floating_point:
        raise ValueError(f"embed: dtype must be a floating dtype, got {dtype}")
    modules = _modules_of(model_or_callable)
    if device is None:
        params = [p for m in modules for p in m.parameters()]
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    rank, world = rank_and_world_size()

    if isinstance(dataset_or_loader, DataLoader):
        dataset = dataset_or_loader.dataset
        loader_args = {
            "batch_size": dataset_or_loader.batch_size or batch_size,
            "num_workers": dataset_or_loader.num_workers,
            "collate_fn": dataset_or_loader.collate_fn,
            "pin_memory": dataset_or_loader.pin_memory,
        }
        if world > 1 and not isinstance(
            dataset_or_loader.sampler, torch.utils.data.SequentialSampler
        ):
            raise ValueError(
                "embed: under a process group a given DataLoader is re-split by rank, which "
                "needs a sequential (non-shuffling) sampler; pass the dataset instead"
            )
    else:
        dataset = dataset_or_loader
        loader_args = {"batch_size": batch_size, "num_workers": num_workers}

    total = len(dataset)
    if world > 1:
        per_rank = -(-total // world)
        order = [(i % total) for i in range(per_rank * world)]  # padded by wrapping around
        loader = DataLoader(Subset(dataset, order[rank::world]), shuffle=False, **loader_args)
    elif isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
    else:
        loader = DataLoader(dataset, shuffle=False, **loader_args)

    descriptors: list[Tensor] = []
    labels: list[Tensor] = []
    with _eval_mode(modules), torch.inference_mode():
        for batch in progress_bar(
            loader, total=len(loader), enabled=progress and rank == 0, desc="embed"
        ):
            images, batch_labels = _split_item(batch)
            images = images.to(device, non_blocking=True)
            with _autocast(device, amp, precision):
                out = model_or_callable(images)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(images):
                raise ValueError(
                    "embed: the model must map a batch (B, 3, H, W) to descriptors (B, D), got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__} for "
                    f"B = {len(images)}"
                )
            descriptors.append(out.to(dtype))
            labels.append(batch_labels.reshape(-1).to(torch.long).cpu())
    if not descriptors:
        raise ValueError("embed: the dataset is empty")
    desc, lab = torch.cat(descriptors), torch.cat(labels)
    if world > 1:
        desc, lab = _gather_in_order(desc, lab, world, total)
    return desc, lab


def _gather_in_order(desc: Tensor, labels: Tensor, world: int, total: int) -> tuple[Tensor, Tensor]:
    """Every rank's share, interleaved back into dataset order, padding dropped."""
    dist = torch.distributed
    # gloo gathers CPU tensors; NCCL gathers CUDA tensors: labels travel with the descriptors
    parts_d = [torch.empty_like(desc) for _ in range(world)]
    dist.all_gather(parts_d, desc.contiguous())
    lab = labels.to(desc.device)
    parts_l = [torch.empty_like(lab) for _ in range(world)]
    dist.all_gather(parts_l, lab)
    # item j of rank r is the (r + j * world)-th of the padded order
    desc = torch.stack(parts_d, dim=1).flatten(0, 1)[:total]
    lab = torch.stack(parts_l, dim=1).flatten(0, 1)[:total].cpu()
    return desc, lab
