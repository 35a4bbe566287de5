"""Pretraining checkpoints: the full resume state, and the teacher in the released HIPT layout.

``checkpoint.pth`` holds everything an exact resume needs (student, teacher, optimiser, grad
scaler, DINO centre, step, every process's RNG states) and, like the released files, a
``teacher`` entry of ``backbone.*`` + ``head.*`` tensors, so ``hipt embed`` reads it directly.
``teacher.pth`` is that export alone (small). Both carry ``arch``: the encoder's registry name
and the builder keywords that differ from the full-size model, so a shallower test encoder
rebuilds itself wherever it is loaded. Files are written atomically; reading checks the whole
file before anything is loaded into a model.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hipt.atomic import atomic_path
from hipt.models.checkpoint import CheckpointError, read_checkpoint, to_released_layout

__all__ = [
    "FORMAT",
    "capture_rng",
    "check_compatible",
    "read_resume_checkpoint",
    "restore_rng",
    "teacher_export",
    "write_checkpoint",
]

FORMAT = "hipt.dino/1"
_REQUIRED = (
    "format",
    "arch",
    "head",
    "student",
    "teacher_native",
    "optimizer",
    "center",
    "step",
    "rng",
)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    # The legacy global generator is what third-party code (e.g. in transforms) may draw from.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the states of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def teacher_export(
    backbone_state: dict[str, torch.Tensor],
    head_state: dict[str, torch.Tensor],
    arch: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The ``teacher`` entry of the released layout: ``backbone.*`` (``phi.*`` for ViT-4K) + ``head.*``."""
    out = to_released_layout(backbone_state)
    out.update({f"head.{k}": v for k, v in head_state.items()})
    return out


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary name beside ``path``, then rename: never a half file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_resume_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pretraining checkpoint whole and check it has every part of a resume state.

    Raises
    ------
    CheckpointError
        A missing, truncated, corrupted or foreign file, or one without a resume state (e.g. a
        ``teacher.pth`` export or a released HIPT file), naming the file.
    """
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a hipt pretraining checkpoint (format {found!r}, expected {FORMAT!r}); "
            "resume needs the checkpoint.pth of a hipt pretrain run"
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return obj


def check_compatible(
    ckpt: dict[str, Any], path: str | os.PathLike, arch: dict[str, Any], head: dict[str, Any]
) -> None:
    """Refuse a checkpoint of another architecture or head, naming both."""
    if ckpt["arch"] != arch:
        raise CheckpointError(
            f"{path}: checkpoint is of architecture {ckpt['arch']}, the config builds {arch}"
        )
    if ckpt["head"] != head:
        raise CheckpointError(
            f"{path}: checkpoint's DINO head is {ckpt['head']}, the config builds {head}"
        )
