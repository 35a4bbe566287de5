"""Slide-level models: a bag of region embeddings in, class or hazard logits and attention out.

Three registered builders:

- ``hipt_lgp``: [M, 256, 384] patch features → ViT-4K per region (frozen by default) → the global
  transformer + gated attention pooling below (HIPT's main model).
- ``hipt_gp``: the same global part on precomputed [M, 192] region features.
- ``abmil``: gated attention MIL (one projection, gated attention, linear head) on [M, D].

Every model returns a :class:`SlideOutput` holding the logits and the attention over the M regions
(softmax, sums to 1), which the heatmaps use.

Examples
--------
>>> import torch
>>> from hipt.models import create_model
>>> model = create_model("hipt_gp", n_classes=3).eval()
>>> out = model(torch.randn(7, 192))
>>> tuple(out.logits.shape), tuple(out.attention.shape)
((3,), (7,))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hipt.geometry import patch_grid_to_vit4k_input
from hipt.models.registry import ModelInfo, register_model

TASKS = ("classification", "survival")


@dataclass
class SlideOutput:
    """Output of a slide model for one bag.

    Attributes
    ----------
    logits : Tensor [n_out]
        Class logits (classification) or hazard logits, one per time bin (survival).
    attention : Tensor [M]
        Softmax attention over the bag's regions.
    """

    logits: torch.Tensor
    attention: torch.Tensor


def _n_out(n_classes: int, task: str, n_bins: int) -> int:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    n = n_bins if task == "survival" else n_classes
    if n < 1:
        raise ValueError(f"output size must be >= 1 (n_classes={n_classes}, n_bins={n_bins})")
    return n


class GatedAttention(nn.Module):
    """Gated attention scores: ``w · (tanh(V x) ⊙ sigmoid(U x))`` per instance (Ilse et al. 2018)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid_branch = nn.Sequential(
            nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[M, dim] → unnormalised scores [M]."""
        return self.score(self.tanh_branch(x) * self.sigmoid_branch(x)).squeeze(-1)


class _AttentionPoolHead(nn.Module):
    """Gated attention pooling over regions, then ``rho`` and the linear classifier."""

    def __init__(self, dim: int, n_out: int, dropout: float, rho: bool = True) -> None:
        super().__init__()
        self.attention = GatedAttention(dim, dim, dropout)
        self.rho = (
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
            if rho
            else nn.Identity()
        )
        self.classifier = nn.Linear(dim, n_out)

    def forward(self, h: torch.Tensor) -> SlideOutput:
        attn = torch.softmax(self.attention(h), dim=0)
        pooled = attn @ h
        return SlideOutput(logits=self.classifier(self.rho(pooled)), attention=attn)


def _check_bag(bag: torch.Tensor, ndim: int, last: tuple[int, ...], name: str) -> None:
    if bag.ndim != ndim or tuple(bag.shape[1:]) != last or bag.shape[0] == 0:
        want = "[M, " + ", ".join(map(str, last)) + "]"
        raise ValueError(f"{name} expects a non-empty bag {want}, got {list(bag.shape)}")


class HIPTGlobal(nn.Module):
    """HIPT's global aggregator (``HIPT_GP``) over [M, 192] region features.

    ``global_phi`` (Linear+ReLU+Dropout) → 2-layer transformer encoder (d_model 192, 3 heads,
    feed-forward 192, ReLU) → gated attention pooling → ``global_rho`` → linear classifier.
    """

    def __init__(
        self,
        n_out: int,
        dim: int = 192,
        dropout: float = 0.25,
        n_layers: int = 2,
        n_heads: int = 3,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.global_phi = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=n_heads,
            dim_feedforward=dim,
            dropout=dropout,
            activation="relu",
            batch_first=True,
        )
        # enable_nested_tensor only matters for padded batches; one bag per call has none.
        self.global_transformer = nn.TransformerEncoder(
            layer, num_layers=n_layers, enable_nested_tensor=False
        )
        self.head = _AttentionPoolHead(dim, n_out, dropout)

    def forward(self, bag: torch.Tensor) -> SlideOutput:
        """[M, 192] → :class:`SlideOutput`."""
        _check_bag(bag, 2, (self.dim,), type(self).__name__)
        h = self.global_phi(bag)
        h = self.global_transformer(h.unsqueeze(0)).squeeze(0)
        return self.head(h)


class HIPTLGP(nn.Module):
    """HIPT_LGP: ViT-4K over each region's [256, 384] patch grid, then :class:`HIPTGlobal`.

    The ViT-4K (``create_model("vit4k_xs")``) is frozen by default, the paper's best setting:
    its parameters get no gradient and it stays in eval mode even when the model trains.
    """

    def __init__(
        self, vit4k: nn.Module, n_out: int, dropout: float = 0.25, freeze_vit4k: bool = True
    ) -> None:
        super().__init__()
        self.local_vit = vit4k
        self.freeze_vit4k = freeze_vit4k
        if freeze_vit4k:
            for p in self.local_vit.parameters():
                p.requires_grad_(False)
        self.global_model = HIPTGlobal(n_out, dim=192, dropout=dropout)

    def train(self, mode: bool = True) -> HIPTLGP:
        super().train(mode)
        if self.freeze_vit4k:
            self.local_vit.eval()  # frozen means no dropout/drop-path noise either
        return self

    def forward(self, bag: torch.Tensor) -> SlideOutput:
        """[M, 256, 384] patch features (row-major 16×16 grid) → :class:`SlideOutput`."""
        _check_bag(bag, 3, (256, 384), type(self).__name__)
        # Token k sits at (k // 16, k % 16): [M, 256, 384] → [M, 384, 16, 16].
        grid = patch_grid_to_vit4k_input(bag.float())
        if self.freeze_vit4k:
            with torch.no_grad():
                regions = self.local_vit(grid)
        else:
            regions = self.local_vit(grid)
        return self.global_model(regions)


class ABMIL(nn.Module):
    """Gated attention MIL: ``Linear(in_dim, hidden)+ReLU+Dropout`` → gated attention → linear head.

    With ``hidden_dim=0`` there is no projection: the head is linear in the attention-pooled
    input, so for one-region bags the model is a linear model of the features.
    """

    def __init__(
        self, n_out: int, in_dim: int = 192, hidden_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        if hidden_dim:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            dim = hidden_dim
        else:
            self.proj = nn.Identity()
            dim = in_dim
        self.head = _AttentionPoolHead(dim, n_out, dropout, rho=False)

    def forward(self, bag: torch.Tensor) -> SlideOutput:
        """[M, in_dim] → :class:`SlideOutput`."""
        _check_bag(bag, 2, (self.in_dim,), type(self).__name__)
        return self.head(self.proj(bag.float()))


@register_model(
    ModelInfo("hipt_gp", kind="slide", extra={"input": "region_features", "in_dim": 192})
)
def hipt_gp(
    n_classes: int = 2,
    task: str = "classification",
    n_bins: int = 4,
    dropout: float = 0.25,
    n_layers: int = 2,
    n_heads: int = 3,
) -> HIPTGlobal:
    """HIPT global aggregator on [M, 192] region features."""
    return HIPTGlobal(
        _n_out(n_classes, task, n_bins), dropout=dropout, n_layers=n_layers, n_heads=n_heads
    )


@register_model(ModelInfo("abmil", kind="slide", extra={"input": "region_features", "in_dim": 192}))
def abmil(
    n_classes: int = 2,
    task: str = "classification",
    n_bins: int = 4,
    dropout: float = 0.25,
    in_dim: int = 192,
    hidden_dim: int = 128,
) -> ABMIL:
    """Gated-attention MIL on [M, in_dim] features (``hidden_dim=0``: no projection)."""
    return ABMIL(
        _n_out(n_classes, task, n_bins), in_dim=in_dim, hidden_dim=hidden_dim, dropout=dropout
    )


@register_model(ModelInfo("hipt_lgp", kind="slide", extra={"input": "patch_features"}))
def hipt_lgp(
    n_classes: int = 2,
    task: str = "classification",
    n_bins: int = 4,
    dropout: float = 0.25,
    freeze_vit4k: bool = True,
    vit4k_weights: str | None = None,
    vit4k_kwargs: dict[str, Any] | None = None,
) -> HIPTLGP:
    """HIPT_LGP on [M, 256, 384] patch features.

    ``vit4k_weights`` loads ViT-4K weights (released HIPT file or hipt's own pretraining output);
    without it the ViT-4K is randomly initialised. ``vit4k_kwargs`` go to ``create_model("vit4k_xs")``.
    """
    from hipt.models.checkpoint import arch_kwargs, load_encoder_weights
    from hipt.models.registry import create_model

    # Weights that record their architecture (hipt pretraining output) rebuild it.
    vit4k = create_model(
        "vit4k_xs", **{**arch_kwargs(vit4k_weights, "vit4k_xs"), **(vit4k_kwargs or {})}
    )
    if vit4k_weights:
        load_encoder_weights(vit4k, vit4k_weights)
    return HIPTLGP(
        vit4k, _n_out(n_classes, task, n_bins), dropout=dropout, freeze_vit4k=freeze_vit4k
    )


def input_key(name: str) -> str:
    """Which features-file dataset a registered slide model reads (``region_features`` or ``patch_features``)."""
    from hipt.models.registry import model_info

    return str(model_info(name).extra.get("input", "region_features"))


def load_slide_model(checkpoint: str | os.PathLike, *, name: str, **model_args: Any) -> nn.Module:
    """Rebuild a registered slide model and load a trained state dict (``best.pt`` of a fold).

    ``model_args`` are the builder arguments recorded as ``model_args`` in the fold's
    ``metrics.json`` (``n_classes``, ``task``, ``n_bins``, ...). The model is returned in eval mode.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from hipt.models import create_model
    >>> path = os.path.join(tempfile.mkdtemp(), "best.pt")
    >>> torch.save(create_model("abmil", n_classes=3, hidden_dim=8).state_dict(), path)
    >>> load_slide_model(path, name="abmil", n_classes=3, hidden_dim=8).training
    False
    """
    from hipt.models.registry import create_model

    model = create_model(name, **model_args)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
