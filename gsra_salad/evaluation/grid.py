"""``save_retrieval_grid``: a picture of queries and their top-k references (needs Pillow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._optional import require

__all__ = ["FALSE_COLOUR", "TRUE_COLOUR", "save_retrieval_grid"]

TRUE_COLOUR = (0, 200, 0)
FALSE_COLOUR = (220, 0, 0)
QUERY_COLOUR = (128, 128, 128)
BACKGROUND = (255, 255, 255)
NO_REFERENCE = -1


def _check_indices(ranked: Tensor, reference_images: Any) -> None:
    """Integer indices in [0, R) or -1; R only when the references have a length."""
    if ranked.dtype == torch.bool or ranked.is_floating_point() or ranked.is_complex():
        raise ValueError(
            f"save_retrieval_grid: ranked_indices must hold integer indices, got {ranked.dtype}"
        )
    size = len(reference_images) if hasattr(reference_images, "__len__") else None
    bad = ranked < NO_REFERENCE
    if size is not None:
        bad |= ranked >= size
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        bound = f"[0, {size})" if size is not None else ">= 0"
        raise ValueError(
            f"save_retrieval_grid: ranked_indices[{row}, {col}] = {int(ranked[row, col])} is "
            f"not a reference index: indices must be {bound}, or -1 for 'no reference' (an "
            "empty cell); negative indices are not counted from the end"
        )


def _pillow() -> Any:
    return require("PIL.Image", "data")


def _to_uint8_hwc(image: Any, mean, std) -> np.ndarray:
    """(3, H, W) / (1, H, W) / (H, W) tensor, HWC array or PIL image -> (H, W, 3) uint8."""
    if hasattr(image, "convert") and not isinstance(image, (Tensor, np.ndarray)):
        return np.asarray(image.convert("RGB"))
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    t = t.detach().cpu()
    if t.dim() == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)  # HWC array
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(
            f"save_retrieval_grid: images must be (3, H, W), (1, H, W) or (H, W), "
            f"got {tuple(t.shape)}"
        )
    if t.dtype == torch.uint8:
        t = t.float() / 255
    else:
        t = t.float()
        if mean is not None and std is not None:
            t = t * torch.as_tensor(std).view(-1, 1, 1) + torch.as_tensor(mean).view(-1, 1, 1)
    t = t.expand(3, -1, -1).clamp(0, 1)
    return (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_retrieval_grid(
    path: str | Path,
    query_images: Sequence[Any] | Tensor,
    reference_images: Sequence[Any] | Tensor,
    ranked_indices: Tensor | Sequence[Sequence[int]],
    true_mask: Tensor | Sequence[Sequence[bool]],
    k: int = 5,
    *,
    tile_size: int = 128,
    border: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Writes a PNG with one row per query: the query, then its top-k references.

    Each tile is resized to ``tile_size`` x ``tile_size`` and framed by a ``border``-pixel
    outline: grey for the query, green (:data:`TRUE_COLOUR`) for a true match, red
    (:data:`FALSE_COLOUR`) otherwise; tiles are separated by ``border`` white pixels. The
    picture is ``(k + 1) * (tile_size + 3 * border) + border`` pixels wide and
    ``Q * (tile_size + 3 * border) + border`` high.

    Args:
        path: where to write the PNG.
        query_images: Q images: a (Q, 3, H, W) tensor, or a sequence of (3, H, W) tensors,
            (H, W, 3) arrays or PIL images (sizes may differ).
        reference_images: indexable references of the same kinds (a tensor, a list, or any
            object whose ``[i]`` returns an image, e.g. a lazily loading wrapper).
        ranked_indices: (Q, >= k) integer reference indices, most similar first (e.g. from
            :func:`~gsra_salad.evaluation.search`); -1 means "no reference" (as FAISS pads
            when fewer than k are found) and leaves its cell empty. Other negative indices
            are an error, never wrapped around to the end of the gallery.
        true_mask: (Q, >= k) booleans, True where the ranked reference is a true match.
        k: references shown per query.
        tile_size: side of each tile in pixels.
        border: outline width and gap in pixels.
        mean: per-channel mean to undo on float images (e.g. ImageNet's); with ``std``.
        std: per-channel standard deviation to undo on float images.

    Returns:
        The path written.

    Raises:
        ValueError: mismatched lengths, fewer than k ranked references, bad image shapes,
            an index below -1 or beyond the references, non-integer indices.
        ImportError: Pillow is not installed (the ``data`` extra).

    Example:
        >>> import tempfile, os
        >>> q, r = torch.rand(2, 3, 16, 16), torch.rand(6, 3, 16, 16)
        >>> ranked = torch.tensor([[0, 1, 2], [3, 4, 5]])
        >>> truth = torch.tensor([[True, False, False], [False, False, True]])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     out = save_retrieval_grid(os.path.join(d, "grid.png"), q, r, ranked, truth, k=3)
        ...     out.name
        'grid.png'
    """
    image_module = _pillow()
    ranked = torch.as_tensor(ranked_indices)
    truth = torch.as_tensor(true_mask)
    q_count = len(query_images)
    if q_count == 0:
        raise ValueError("save_retrieval_grid: query_images is empty")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"save_retrieval_grid: k must be a positive int, got {k}")
    for name, t in (("ranked_indices", ranked), ("true_mask", truth)):
        if t.dim() != 2 or t.shape[0] != q_count or t.shape[1] < k:
            raise ValueError(
                f"save_retrieval_grid: {name} must have shape (Q, >= k) = ({q_count}, >= {k}), "
                f"got {tuple(t.shape)}"
            )
    _check_indices(ranked[:, :k], reference_images)
    if tile_size < 1 or border < 0:
        raise ValueError("save_retrieval_grid: tile_size must be >= 1 and border >= 0")

    cell = tile_size + 3 * border  # outline on both sides plus one gap
    width, height = (k + 1) * cell + border, q_count * cell + border
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)

    def paste(image: Any, row: int, col: int, colour: tuple[int, int, int]) -> None:
        pixels = _to_uint8_hwc(image, mean, std)
        tile = image_module.fromarray(pixels).resize((tile_size, tile_size))
        top, left = row * cell + border, col * cell + border
        outer = tile_size + 2 * border
        canvas[top : top + outer, left : left + outer] = colour
        inner_t, inner_l = top + border, left + border
        canvas[inner_t : inner_t + tile_size, inner_l : inner_l + tile_size] = np.asarray(tile)

    for i in range(q_count):
        paste(query_images[i], i, 0, QUERY_COLOUR)
        for j in range(k):
            if int(ranked[i, j]) == NO_REFERENCE:
                continue  # an empty cell
            colour = TRUE_COLOUR if bool(truth[i, j]) else FALSE_COLOUR
            paste(reference_images[int(ranked[i, j])], i, j + 1, colour)
    path = Path(path)
    image_module.fromarray(canvas).save(path, format="PNG")
    return path
