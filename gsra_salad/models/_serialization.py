"""Reading, converting, checking and writing model weights. Private.

Nothing here unpickles code: state dicts are read with safetensors or with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "model.pt"

_LRFR_PREFIXES = {
    "model.backbone.backbone.": "backbone.features.",
    "model.attention.": "attention.",
    "model.aggregation.": "aggregation.",
}


# keys under which training scripts nest the model's state dict beside other entries
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping or a file (``.safetensors`` or a ``torch.save`` file).

    A training checkpoint that nests the state dict under ``"state_dict"``,
    ``"model_state_dict"`` or ``"model"`` (beside an epoch, an optimizer state, ...) is
    unwrapped.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = _load_weights_file(path)
    for key in _NESTING_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
            state = dict(inner)
            break
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"the checkpoint is not a state dict: entries {bad[:5]} are not tensors")
    return state


def convert_lrfr_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Published LRFR key names -> this library's (``module.`` prefixes are dropped)."""
    out = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        for old, new in _LRFR_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out


def load_strict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what differs and why.

    Like torch, accepts a state dict without BatchNorm's ``num_batches_tracked`` buffers
    (written before torch 0.4.1, or dropped by conversion scripts): torch keeps the module's own.
    """
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not _filled_by_torch(model, k))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_few(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_few(unexpected)}")
        for key, got, want in shapes[:8]:
            lines.append(f"  shape of {key}: checkpoint {got}, model {want}")
        lines += [f"  likely cause: {c}" for c in _likely_causes(missing, unexpected, shapes)]
        raise ValueError("\n".join(lines))
    # a plain dict has no _metadata: torch then fills missing num_batches_tracked buffers
    model.load_state_dict(dict(state), strict=True)


def _filled_by_torch(model: nn.Module, key: str) -> bool:
    prefix, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    owner = model.get_submodule(prefix)
    return isinstance(owner, nn.modules.batchnorm._NormBase) and owner.track_running_stats


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _likely_causes(missing, unexpected, shapes) -> list[str]:
    causes = []
    for key, got, _ in shapes:
        if key.endswith("gg_spatial.0.weight"):
            positions = got[1] // 2
            side = math.isqrt(positions)
            size = f"img_size={16 * side}" if side * side == positions else "another img_size"
            causes.append(
                f"the checkpoint's GSRA was built for a feature map of {positions} positions "
                f"({size} for a square image): pass that img_size"
            )
            break
    if any(k.startswith("reference_attention.") for k in missing):
        causes.append(
            "the model has one attention per view (query_img_size gives another feature-map size "
            "than img_size) but the checkpoint has one: build the model for one image size"
        )
    if any(k.startswith("model.") for k in unexpected):
        causes.append("keys start with 'model.': use CrossViewGeoLocalizer.from_lrfr_checkpoint")
    backbone_diff = [k for k in missing + unexpected if k.startswith("backbone.")]
    if backbone_diff or any(k.startswith("backbone.") for k, _, _ in shapes):
        causes.append("the backbone differs (another ConvNeXt variant or another backbone)")
    if any(k.startswith("aggregation.token_features") for k in unexpected):
        causes.append("the checkpoint's SALAD has a global token (token_dim > 0)")
    return causes or ["the checkpoint was saved from a different architecture"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read weights from {path} ({type(err).__name__}: {err}); the file is "
            "truncated, corrupted, or not a weights file"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a new file beside ``path``, then rename it to ``path``.

    The file gets mode 0o666 filtered by the umask, like any file that ``open`` creates
    (``tempfile.mkstemp`` would make it 0o600, private to the owner, and so do writers that
    replace the file themselves, such as recent safetensors): the mode that ``os.open`` gave
    the new file is applied again after ``write``.
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"could not create a temporary file beside {path}")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_pretrained(model: nn.Module, directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        weights = directory / SAFETENSORS_NAME
        _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        weights = directory / TORCH_NAME
        _atomic_write(weights, lambda tmp: torch.save(state, tmp))
    payload = {
        "gsra_salad_version": __version__,
        "model": config,
        "weights": {"file": weights.name, "sha256": _sha256(weights)},
    }
    text = json.dumps(payload, indent=2)
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_pretrained(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: from_pretrained reads a directory written by "
            "save_pretrained (config.json plus the weights file)"
        )
    try:
        payload = json.loads(config_path.read_text())
        config, weights = payload["model"], payload["weights"]
        name, digest = weights["file"], weights["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is not a valid gsra_salad config ({err})") from err
    path = directory / Path(name).name
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} named in {config_path} is missing")
    if _sha256(path) != digest:
        raise ValueError(
            f"{path} does not match the SHA-256 recorded in {config_path}: the file was "
            "modified or truncated after save_pretrained; re-save or re-download it"
        )
    return config, _load_weights_file(path)
