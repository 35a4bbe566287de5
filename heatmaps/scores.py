"""Attention scores of one slide at every level of the hierarchy.

- slide level: the slide model's attention over the M regions (softmax pooling weights) and its
  prediction, from the cached features;
- region level: ViT-4K [CLS]→patch attention per head for every region, from the cached
  ``patch_features`` (the slide model's own ViT-4K for ``hipt_lgp``, else the encoder's),
  streamed in chunks of regions (no slide reading);
- token level: ViT-256 [CLS]→token attention per head in every patch of the top-k regions,
  read from the slide; with smoothing, every pass reads its own shifted pixels.

Raw scores are the softmax weights. :func:`percentile` turns them into per-slide percentile
ranks in (0, 1] (the fraction of the slide's scores at or below each one), as the original does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn as nn

from hipt.geometry import GRID, PATCH_PX, REGION_PX, TOKEN_PX, patch_grid_to_vit4k_input
from hipt.h5schema import FeaturesInfo
from hipt.models.attention import (
    attention_and_embedding,
    cls_attention,
    region_attention,
    vit4k_attention,
)
from hipt.models.region_encoder import RegionEncoder
from hipt.resample import box_reduce
from hipt.slide import Slide
from hipt.survival import risk_from_logits, survival_curve

__all__ = [
    "RegionMaps",
    "SlideScores",
    "percentile",
    "region_maps",
    "score_slide",
    "token_grid",
]

CHUNK_REGIONS = 32  # regions of patch features read and scored at once


def percentile(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Percentile rank in (0, 1] of each value among ``reference`` (default: the values).

    >>> percentile(np.array([3.0, 1.0, 2.0, 2.0])).tolist()
    [1.0, 0.25, 0.75, 0.75]
    """
    values = np.asarray(values, dtype=np.float64)
    ref = np.sort(np.asarray(values if reference is None else reference, np.float64).ravel())
    if ref.size == 0:
        return np.zeros(values.shape, np.float32)
    return (np.searchsorted(ref, values, side="right") / ref.size).astype(np.float32)


@dataclass
class SlideScores:
    """Everything scored for one slide (arrays on the CPU)."""

    coords: np.ndarray  # [M, 2] level-0 (x, y) of each region
    region_size_level0: float
    slide_attention: np.ndarray  # [M] raw softmax weights
    prediction: dict[str, Any]
    patch_attention: np.ndarray | None = None  # [M, heads, 256] raw, row-major patches
    region_vit: str = ""  # which ViT-4K scored the patches
    top: list[int] = field(default_factory=list)  # region indices, most attended first

    @property
    def slide_rank(self) -> np.ndarray:
        return percentile(self.slide_attention)

    def patch_rank(self, head: int | None = None) -> np.ndarray:
        """``[M, 256]`` percentile ranks of the head-mean (or one head's) patch attention."""
        assert self.patch_attention is not None
        a = self.patch_attention.mean(1) if head is None else self.patch_attention[:, head]
        return percentile(a)


def _prediction(task: str, logits: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    logits = logits.detach().float().cpu()
    if task == "survival":
        return {
            "risk": float(risk_from_logits(logits)),
            "survival_per_bin": [float(v) for v in survival_curve(logits)],
            "logits": [float(v) for v in logits],
        }
    probs = torch.softmax(logits, dim=-1)
    names = class_names or [str(k) for k in range(len(probs))]
    k = int(probs.argmax())
    return {
        "probabilities": {n: float(p) for n, p in zip(names, probs, strict=False)},
        "predicted_class": names[k] if k < len(names) else str(k),
        "logits": [float(v) for v in logits],
    }


def _region_vit(model: nn.Module, encoder: RegionEncoder | None) -> tuple[nn.Module | None, str]:
    local = getattr(model, "local_vit", None)
    if local is not None:
        return local, "slide model's ViT-4K (hipt_lgp local_vit)"
    if encoder is not None:
        return encoder.vit4k, "the features' ViT-4K"
    return None, ""


@torch.inference_mode()
def score_slide(
    info: FeaturesInfo,
    model: nn.Module,
    *,
    task: str,
    class_names: list[str],
    input_key: str,
    encoder: RegionEncoder | None,
    want_patches: bool,
    top_k: int,
    device: str = "cpu",
) -> SlideScores:
    """Slide- and region-level scores from a features file, reading it in chunks of regions.

    For ``hipt_lgp`` one pass of its ViT-4K over each chunk gives both the region embeddings the
    global model pools and the [CLS]→patch attention. Otherwise the slide model reads
    ``region_features`` and the encoder's ViT-4K scores the patches.
    """
    model.eval()
    region_vit, vit_name = _region_vit(model, encoder)
    if want_patches and region_vit is None:
        raise ValueError("region-level attention needs the features' ViT-4K (see --vit4k)")
    with h5py.File(info.path, "r") as f:
        coords = f["coords"][()]
        m = len(coords)
        if m == 0:
            raise ValueError(f"{info.path}: has no regions")
        has_patches = "patch_features" in f
        if want_patches and not has_patches:
            raise ValueError(f"{info.path}: no patch_features for region-level attention")
        maps, embeddings = [], []
        lgp = input_key == "patch_features"
        if want_patches or lgp:
            for start in range(0, m, CHUNK_REGIONS):
                chunk = torch.from_numpy(f["patch_features"][start : start + CHUNK_REGIONS])
                grid = patch_grid_to_vit4k_input(chunk.to(device).float())
                if lgp:
                    attn, emb = attention_and_embedding(region_vit, grid)
                    embeddings.append(emb.float())
                else:  # the region embeddings are cached: skip the last block's forward
                    attn = cls_attention(region_vit, grid)
                maps.append(attn.float().cpu().numpy())
        if lgp:
            out = model.global_model(torch.cat(embeddings))
        else:
            out = model(torch.from_numpy(f["region_features"][()]).to(device).float())
    attention = out.attention.float().cpu().numpy()
    if top_k > m:
        raise ValueError(f"--top-k {top_k} is larger than the slide's {m} regions")
    attrs = info.attrs
    region_l0 = float(attrs.get("region_size", REGION_PX)) * float(attrs["target_mpp"])
    region_l0 /= float(attrs["mpp_level0"])
    return SlideScores(
        coords=np.asarray(coords, np.int64),
        region_size_level0=region_l0,
        slide_attention=attention,
        prediction=_prediction(task, out.logits, class_names),
        patch_attention=np.concatenate(maps) if maps else None,
        region_vit=vit_name if maps else "",
        top=[int(i) for i in np.argsort(-attention, kind="stable")[:top_k]],
    )


def token_grid(token_attention: torch.Tensor) -> torch.Tensor:
    """``[256 patches, heads, 256 tokens]`` → ``[heads, 256, 256]`` map of a region (16 px cells).

    Patch ``k`` covers rows ``16·(k // 16)…``, columns ``16·(k % 16)…``; token ``t`` inside it
    sits at row ``t // 16``, column ``t % 16``.
    """
    n, heads, _ = token_attention.shape
    g = token_attention.reshape(GRID, GRID, heads, GRID, GRID)  # prow, pcol, head, trow, tcol
    return g.permute(2, 0, 3, 1, 4).reshape(heads, GRID * GRID, GRID * GRID)


@dataclass
class RegionMaps:
    """Maps of one top region at ``out_px`` resolution (raw, averaged over the passes)."""

    index: int
    pixels: np.ndarray  # [out_px, out_px, 3] uint8 (unshifted read)
    token: np.ndarray | None  # [heads, out_px, out_px]
    patch: np.ndarray | None  # [heads, out_px, out_px] (only with smoothing; else from cache)
    shifts_px: list[int] = field(default_factory=list)  # shift of each pass, target px


def _shifts(passes: int, cell_px: int) -> list[int]:
    # Pass i: i/passes of a patch plus i/passes of a token, rounded to whole output cells.
    step = (PATCH_PX + TOKEN_PX) / passes
    return [int(round(i * step / cell_px)) * cell_px for i in range(passes)]


def _add_shifted(acc: np.ndarray, maps: np.ndarray, offset: int) -> None:
    # A map read `offset` px right and down of the region lands at +offset; the uncovered
    # top/left margin keeps fewer passes (the caller averages by count).
    n = acc.shape[-1] - offset
    acc[:, offset:, offset:] += maps[:, :n, :n]


def _upsample(grid: np.ndarray, out_px: int) -> np.ndarray:
    k = out_px // grid.shape[-1]
    return np.repeat(np.repeat(grid, k, axis=-2), k, axis=-1)


@torch.inference_mode()
def region_maps(
    slide: Slide,
    encoder: RegionEncoder,
    region_vit: nn.Module | None,
    index: int,
    xy: tuple[int, int],
    *,
    target_mpp: float,
    out_px: int,
    passes: int = 1,
    want_tokens: bool = True,
) -> RegionMaps:
    """Token (and, when smoothing, patch) attention of one region read from the slide."""
    cell = REGION_PX // out_px  # target px per output px
    level0_per_px = target_mpp / slide.mpp_level0
    shifts = _shifts(passes, cell)
    token_acc = patch_acc = None
    count = np.zeros((out_px, out_px), np.float32)
    pixels = None
    for shift in shifts:
        x = int(round(xy[0] + shift * level0_per_px))
        y = int(round(xy[1] + shift * level0_per_px))
        region = slide.read_region(x, y, REGION_PX, target_mpp)
        if pixels is None:
            pixels = box_reduce(region, cell)
        batch = torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1)))[None]
        ra = region_attention(encoder, batch)
        offset = shift // cell
        count[offset:, offset:] += 1
        if want_tokens:
            tok = _upsample(token_grid(ra.token_attention[0].cpu()).numpy(), out_px)
            token_acc = np.zeros_like(tok) if token_acc is None else token_acc
            _add_shifted(token_acc, tok, offset)
        if passes > 1 and region_vit is not None:
            grid = patch_grid_to_vit4k_input(ra.patch_features.float())
            pat = vit4k_attention(region_vit, grid)[0].reshape(-1, GRID, GRID)
            pat = _upsample(pat.float().cpu().numpy(), out_px)
            patch_acc = np.zeros_like(pat) if patch_acc is None else patch_acc
            _add_shifted(patch_acc, pat, offset)
    safe = np.maximum(count, 1.0)[None]
    return RegionMaps(
        index=index,
        pixels=pixels,
        token=None if token_acc is None else token_acc / safe,
        patch=None if patch_acc is None else patch_acc / safe,
        shifts_px=shifts,
    )
