"""Named model builders and the weight metadata that travels with them (in the spirit of timm).

A builder only sets arguments and returns a module. What the weights expect from their input
(size, µm/px, mean/std) lives in :class:`ModelInfo`, apart from the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"vit256_s16"``.
    kind : str
        ``"encoder"`` (pixels or patch grids in, embeddings out) or ``"slide"`` (bags in).
    input_size_px : int or None
        Side in pixels of the image the encoder sees (256 for ViT-256, 4096 for ViT-4K).
    target_mpp : float or None
        µm/px the weights were trained at.
    mean, std : tuple of float or None
        Input normalisation of the released weights.
    extra : dict
        Anything else (released checkpoint file name, embedding dim, ...).
    """

    name: str
    kind: str
    input_size_px: int | None = None
    target_mpp: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(
    info: ModelInfo,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under ``info.name``; a second builder of that name is an error."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _BUILDERS:
            raise ValueError(f"model {info.name!r} is already registered")
        _BUILDERS[info.name] = fn
        _INFO[info.name] = info
        return fn

    return wrap


def _ensure_loaded() -> None:
    # Importing the model modules runs their @register_model decorators.
    import hipt.models  # noqa: F401


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; keyword arguments go to its builder."""
    _ensure_loaded()
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](**kwargs)


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder function registered under ``name`` (e.g. to check its keyword arguments)."""
    _ensure_loaded()
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name]


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model."""
    _ensure_loaded()
    if name not in _INFO:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_INFO))}")
    return _INFO[name]


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, optionally only those of one ``kind``."""
    _ensure_loaded()
    return sorted(n for n, i in _INFO.items() if kind is None or i.kind == kind)
