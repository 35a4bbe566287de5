"""Last-block [CLS]→token attention of ViT-256 and ViT-4K, for heatmaps.

The models run with timm's fused attention (``scaled_dot_product_attention``), which never forms
the attention matrix. Here the blocks before the last run as usual and the last block's
attention is computed explicitly (``softmax(q kᵀ / √d)``) from its own weights, so the weights
are exact whatever kernel the forward pass uses. One function serves both ViTs.

Token ``k`` of the returned maps is row ``k // 16``, column ``k % 16`` (row-major): a 16 px
token of a patch for ViT-256, a 256 px patch of a region for ViT-4K.

Examples
--------
>>> import torch
>>> from hipt.models import create_model
>>> model = create_model("vit4k_xs", depth=1).eval()
>>> vit4k_attention(model, torch.zeros(1, 384, 16, 16)).shape
torch.Size([1, 6, 256])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from hipt.geometry import patch_grid_to_vit4k_input, region_to_patches

__all__ = [
    "RegionAttention",
    "attention_and_embedding",
    "cls_attention",
    "last_block_attention",
    "region_attention",
    "vit256_attention",
    "vit4k_attention",
]


def _tokens_before_last_block(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The same embedding path as timm's VisionTransformer.forward_features.
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    for block in list(model.blocks)[:-1]:
        tokens = block(tokens)
    return tokens


def _explicit_attention(
    block: nn.Module, tokens: torch.Tensor, queries: int | None = None
) -> torch.Tensor:
    # softmax(q kᵀ / √d) of one timm Block, in fp32 whatever the autocast state; only the first
    # `queries` rows when given (the [CLS] row alone saves a [B, heads, N, N] matrix).
    attn = block.attn
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        h = block.norm1(tokens.float())
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        if queries is not None:
            q = q[:, :, :queries]
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        return logits.softmax(dim=-1)


def last_block_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full attention matrix of the last block, ``[B, heads, N, N]`` (``N`` = 1 + tokens).

    Row ``i`` is the softmax distribution of query token ``i`` over all tokens (index 0 is
    [CLS]), so every row sums to 1. Computed in fp32 whatever the autocast state.

    Parameters
    ----------
    model : nn.Module
        A timm ``VisionTransformer`` (``vit256_s16`` or ``vit4k_xs``).
    x : Tensor
        The model's input: ``[B, 3, 256, 256]`` normalised pixels or a ``[B, 384, 16, 16]`` grid.
    """
    return _explicit_attention(model.blocks[-1], _tokens_before_last_block(model, x))


def attention_and_embedding(
    model: nn.Module, x: torch.Tensor, *, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]→token attention ``[B, heads, tokens]`` and the model output, from one pass.

    The output equals ``model(x)``; the blocks before the last run once for both.
    """
    tokens = _tokens_before_last_block(model, x)
    attn = _select_cls(model, _explicit_attention(model.blocks[-1], tokens, 1), renormalize)
    out = model.forward_head(model.norm(model.blocks[-1](tokens)))
    return attn, out


def _select_cls(model: nn.Module, attn: torch.Tensor, renormalize: bool) -> torch.Tensor:
    attn = attn[:, :, 0, model.num_prefix_tokens :]
    if renormalize:
        attn = attn / attn.sum(dim=-1, keepdim=True)
    return attn


def cls_attention(model: nn.Module, x: torch.Tensor, *, renormalize: bool = False) -> torch.Tensor:
    """[CLS]→token attention of the last block, ``[B, heads, tokens]``, row-major tokens.

    By default these are the softmax weights as the model uses them (as in the original
    HIPT heatmaps), so each map sums to 1 minus the [CLS]→[CLS] weight. With
    ``renormalize=True`` each map is divided by its sum and sums to 1 over the tokens.
    """
    tokens = _tokens_before_last_block(model, x)
    return _select_cls(model, _explicit_attention(model.blocks[-1], tokens, 1), renormalize)


def vit256_attention(
    model: nn.Module, x: torch.Tensor, *, renormalize: bool = False
) -> torch.Tensor:
    """ViT-256 [CLS]→token attention: ``[B, 3, 256, 256]`` → ``[B, heads, 256]`` (16 px tokens).

    >>> import torch
    >>> from hipt.models import create_model
    >>> vit256_attention(create_model("vit256_s16", depth=1), torch.zeros(1, 3, 256, 256)).shape
    torch.Size([1, 6, 256])
    """
    return cls_attention(model, x, renormalize=renormalize)


def vit4k_attention(
    model: nn.Module, grid: torch.Tensor, *, renormalize: bool = False
) -> torch.Tensor:
    """ViT-4K [CLS]→patch attention: ``[B, 384, 16, 16]`` → ``[B, heads, 256]`` (256 px patches)."""
    return cls_attention(model, grid, renormalize=renormalize)


class RegionAttention(NamedTuple):
    """Attention and embeddings of whole regions (see :func:`region_attention`)."""

    token_attention: torch.Tensor  # [B, 256 patches, heads, 256 tokens], ViT-256
    patch_attention: torch.Tensor  # [B, heads, 256 patches], ViT-4K
    patch_features: torch.Tensor  # [B, 256, 384]
    region_features: torch.Tensor  # [B, 192]


def region_attention(
    encoder: nn.Module, regions: torch.Tensor, *, renormalize: bool = False
) -> RegionAttention:
    """Token attention of every patch and patch attention of every region, with the embeddings.

    Runs like :meth:`hipt.models.region_encoder.RegionEncoder.encode` (patches batched across
    regions in chunks of ``encoder.patch_batch``, bf16 autocast on CUDA, inference mode), but
    through the attention extractors, so one pass gives everything a hierarchical heatmap needs.

    Parameters
    ----------
    encoder : RegionEncoder
        The region encoder.
    regions : Tensor
        uint8 ``[B, 3, 4096, 4096]``.
    renormalize : bool
        Make every map sum to 1 over its 256 tokens/patches.

    Returns
    -------
    RegionAttention
        float32 tensors; patch ``k`` and token ``k`` both sit at row ``k // 16``, column ``k % 16``.
    """
    encoder.eval()
    with torch.inference_mode():
        regions = regions.to(encoder.device, non_blocking=True)
        b = regions.shape[0]
        patches = region_to_patches(regions)
        n = patches.shape[1]
        patches = patches.reshape(b * n, *patches.shape[2:])
        maps, feats = [], []
        for start in range(0, b * n, encoder.patch_batch):
            x = encoder.normalize(patches[start : start + encoder.patch_batch])
            with encoder._autocast():
                attn, out = attention_and_embedding(encoder.vit256, x, renormalize=renormalize)
            maps.append(attn.float())
            feats.append(out.float())
        token_attention = torch.cat(maps).view(b, n, *maps[0].shape[1:])
        patch_features = torch.cat(feats).view(b, n, -1)
        with encoder._autocast():
            patch_attention, region = attention_and_embedding(
                encoder.vit4k, patch_grid_to_vit4k_input(patch_features), renormalize=renormalize
            )
        return RegionAttention(
            token_attention, patch_attention.float(), patch_features, region.float()
        )
