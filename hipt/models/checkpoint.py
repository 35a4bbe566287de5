"""Loading encoder weights: the released HIPT files, hipt's own pretraining output, plain state dicts.

The released checkpoints (``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``) are full DINO
training checkpoints: a dict whose ``teacher`` entry holds the backbone under ``backbone.`` (plus
the DINO projection head under ``head.``, which is dropped); student keys may carry ``module.``.
hipt's pretraining writes the same layout (see :func:`to_released_layout`).

Every step from the file's tensors to the model's is a pure function, so each can be tested on
its own: :func:`extract_state_dict` → :func:`strip_prefixes` → :func:`rename_released_keys` →
:func:`adapt_pos_embed` (which calls :func:`resize_pos_embed_dino`).

Examples
--------
>>> from hipt.models import create_model
>>> from hipt.models.checkpoint import load_encoder_weights
>>> model = create_model("vit256_s16")
>>> sha256 = load_encoder_weights(model, "vit256_small_dino.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CheckpointError",
    "adapt_pos_embed",
    "arch_kwargs",
    "extract_state_dict",
    "file_sha256",
    "load_encoder_weights",
    "read_checkpoint",
    "rename_released_keys",
    "resize_pos_embed_dino",
    "strip_prefixes",
    "to_released_layout",
]

# Objects the released DINO checkpoints pickle besides tensors and builtins: the training
# arguments (an argparse.Namespace of strings and numbers). Allowing this plain data holder keeps
# torch.load(weights_only=True) usable on the released files; anything else stays refused.
_SAFE_GLOBALS = [argparse.Namespace]
_PHI_RELEASED = "phi."
_PHI_TIMM = "patch_embed.phi."


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message names the file and the problem."""


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike[str]) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Raises
    ------
    CheckpointError
        When the file is missing, is not a torch file, or pickles objects other than tensors,
        containers, numbers, strings and the ``argparse.Namespace`` of training arguments.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_unpickling_reason(str(exc))}") from exc
    except Exception as exc:  # a truncated file or a foreign format surfaces as many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {reason})"
        ) from exc


def _unpickling_reason(message: str) -> str:
    # torch's message is many lines of advice; keep only the part that names the problem.
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return (
            f"refused: it pickles {found.group(1)}, which is not a tensor or plain data; only "
            "weights are loaded (torch.load weights_only=True)"
        )
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.S)
    detail = " ".join(found.group(1).split()) if found else message.strip().splitlines()[0]
    return f"not a readable weights file (torch.load weights_only=True: {detail})"


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: object, key: str = "teacher") -> dict[str, torch.Tensor]:
    """Pick the tensors to load from a checkpoint object.

    A dict with a ``key`` entry (``"teacher"`` in the released DINO files) gives that entry;
    a dict of tensors is taken as it is.

    Raises
    ------
    CheckpointError
        When neither applies (the message lists the top-level keys). The caller adds the file name.
    """
    if isinstance(obj, Mapping) and key in obj:
        inner = obj[key]
        if _is_state_dict(inner):
            return dict(inner)
        raise CheckpointError(f"entry {key!r} is not a dict of tensors")
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:20])
        raise CheckpointError(
            f"no {key!r} entry and not a plain state dict (top-level keys: {keys})"
        )
    raise CheckpointError(f"expected a dict, got {type(obj).__name__}")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors of a DINO-layout state dict, with ``module.`` / ``backbone.`` removed.

    If any key (after ``module.``) starts with ``backbone.``, the dict is a DINO
    ``MultiCropWrapper``: only the backbone is kept and the projection head (``head.*``) is
    dropped. Otherwise the keys are returned with ``module.`` removed.

    >>> import torch
    >>> sorted(strip_prefixes({"module.backbone.norm.weight": torch.ones(1),
    ...                        "module.head.last_layer.weight_g": torch.ones(1)}))
    ['norm.weight']
    """
    plain = {
        (k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()
    }
    if any(k.startswith("backbone.") for k in plain):
        return {k[len("backbone.") :]: v for k, v in plain.items() if k.startswith("backbone.")}
    return plain


def rename_released_keys(
    state_dict: Mapping[str, torch.Tensor], model_keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Map the original ViT-4K key names onto the timm model's (``phi.*`` → ``patch_embed.phi.*``).

    ViT-256 keys already match timm's names. When ``model_keys`` is given, a key is renamed only if
    the renamed key exists in the model, so a plain timm state dict passes through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith(_PHI_RELEASED):
            new = _PHI_TIMM + k[len(_PHI_RELEASED) :]
            if model_keys is None or new in model_keys:
                k = new
        out[k] = v
    return out


def to_released_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hipt encoder state dict in the released key layout (``backbone.``-prefixed, ``phi.*``).

    Wrap the result as ``{"teacher": ...}`` to write a file the original HIPT code also reads.
    The position table keeps the model's grid; the original code resamples it as needed.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_PHI_TIMM):
            k = _PHI_RELEASED + k[len(_PHI_TIMM) :]
        out["backbone." + k] = v
    return out


def resize_pos_embed_dino(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ``[1, 1 + n*n, D]`` position table to ``grid``×``grid`` the way DINO/HIPT do.

    The original code resizes at every forward pass with bicubic interpolation given a
    *scale factor* ``(grid + 0.1) / n`` (not a target size; the 0.1 avoids a floating-point
    rounding down of the output size), ``align_corners=False``. The scale factor, not the size
    ratio, sets the sampling positions, so this formula must be kept for identical numbers.
    The [CLS] row is kept as is.

    Parameters
    ----------
    pos_embed : Tensor
        ``[1, 1 + n*n, D]`` with the [CLS] row first.
    grid : int
        Target side in tokens.

    Returns
    -------
    Tensor
        ``[1, 1 + grid*grid, D]``, same dtype.

    Examples
    --------
    >>> import torch
    >>> resize_pos_embed_dino(torch.zeros(1, 197, 8), 16).shape
    torch.Size([1, 257, 8])
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"position table must be [1, 1+n*n, D], got {list(pos_embed.shape)}")
    n_tokens = pos_embed.shape[1] - 1
    n = math.isqrt(n_tokens)
    if n * n != n_tokens:
        raise ValueError(f"position table has {n_tokens} token rows, not a square grid")
    if n == grid:
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    cls_row, table = pos_embed[:, :1], pos_embed[:, 1:]
    table = table.float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / n
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if table.shape[-2:] != (grid, grid):
        raise ValueError(f"resizing {n}x{n} to {grid}x{grid} gave {tuple(table.shape[-2:])}")
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, table], dim=1)


def adapt_pos_embed(
    state_dict: Mapping[str, torch.Tensor], target_shape: torch.Size | tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Resize ``pos_embed`` to ``target_shape`` ``[1, 1 + g*g, D]`` with :func:`resize_pos_embed_dino`.

    Leaves the dict unchanged when there is no ``pos_embed``, when it already has the target
    shape, or when its width differs (the shape check reports that).
    """
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is None or tuple(pos.shape) == tuple(target_shape):
        return out
    if pos.dim() != 3 or pos.shape[-1] != target_shape[-1]:
        return out
    grid = math.isqrt(target_shape[1] - 1)
    n = math.isqrt(pos.shape[1] - 1)
    if n * n == pos.shape[1] - 1 and grid * grid == target_shape[1] - 1:
        out["pos_embed"] = resize_pos_embed_dino(pos, grid)
    return out


def arch_kwargs(path: str | os.PathLike[str] | None, name: str) -> dict:
    """Builder keywords recorded in a weights file for encoder ``name`` (``{}`` if none).

    hipt's pretraining output records its encoder as ``arch = {"name": ..., "kwargs": {...}}``
    (e.g. ``{"depth": 2}`` for a shallow test encoder), so it can be rebuilt wherever it is
    loaded. Released HIPT files have no ``arch``: they are the full-size default. Only the
    file's index is read (memory-mapped), not its tensors.
    """
    if path is None or not Path(path).is_file():
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file, or unreadable: the weights loader will say why
        return {}
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    if not isinstance(arch, Mapping) or arch.get("name") != name:
        return {}
    return dict(arch.get("kwargs") or {})


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_encoder_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    checkpoint_key: str = "teacher",
) -> str:
    """Load encoder weights into ``model`` and return the file's SHA-256 (hex).

    Accepts the released HIPT files (``{"teacher": {"backbone.…": …}}``, ``module.`` optional),
    hipt's own pretraining output (same layout) and a plain state dict. The 14×14 position
    table of the released weights is resized once, here, to the model's grid with the
    original formula (:func:`resize_pos_embed_dino`).

    Parameters
    ----------
    model : nn.Module
        A ``vit256_s16`` or ``vit4k_xs`` model (or a tiny variant of one).
    path : str or PathLike
        The weights file.
    strict : bool
        When true (default) any missing key, unexpected key or shape mismatch is an error that
        lists them all. When false, the tensors that match are loaded and the rest are skipped.
    checkpoint_key : str
        Entry of a training checkpoint to load (``"teacher"``; ``"student"`` also works).

    Returns
    -------
    str
        SHA-256 of the file, for provenance.

    Raises
    ------
    CheckpointError
        Naming the file and the problem.

    Examples
    --------
    >>> from hipt.models import create_model
    >>> model = create_model("vit4k_xs")
    >>> sha = load_encoder_weights(model, "vit4k_xs_dino.pth")  # doctest: +SKIP
    """
    obj = read_checkpoint(path)
    try:
        state = extract_state_dict(obj, checkpoint_key)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    target = model.state_dict()
    state = strip_prefixes(state)
    state = rename_released_keys(state, set(target))
    if "pos_embed" in target:
        state = adapt_pos_embed(state, target["pos_embed"].shape)

    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    wrong = sorted(
        f"{k} (file {list(state[k].shape)}, model {list(target[k].shape)})"
        for k in target
        if k in state and state[k].shape != target[k].shape
    )
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_describe(wrong)}")
        raise CheckpointError(f"{path}: weights do not fit the model; " + "; ".join(parts))
    loadable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    if not loadable:
        raise CheckpointError(f"{path}: no tensor in the file fits the model")
    model.load_state_dict(loadable, strict=strict)
    return file_sha256(path)
