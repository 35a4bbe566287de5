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

import torch
import torch.nn as nn

__all__ = ["cls_attention", "last_block_attention", "vit256_attention", "vit4k_attention"]


def _tokens_before_last_block(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The same embedding path as timm's VisionTransformer.forward_features.
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    for block in list(model.blocks)[:-1]:
        tokens = block(tokens)
    return tokens


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
    tokens = _tokens_before_last_block(model, x)
    block = model.blocks[-1]
    attn = block.attn
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        h = block.norm1(tokens.float())
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        return logits.softmax(dim=-1)


def cls_attention(model: nn.Module, x: torch.Tensor, *, renormalize: bool = False) -> torch.Tensor:
    """[CLS]→token attention of the last block, ``[B, heads, tokens]``, row-major tokens.

    By default these are the softmax weights as the model uses them (as in the original
    HIPT heatmaps), so each map sums to 1 minus the [CLS]→[CLS] weight. With
    ``renormalize=True`` each map is divided by its sum and sums to 1 over the tokens.
    """
    attn = last_block_attention(model, x)[:, :, 0, model.num_prefix_tokens :]
    if renormalize:
        attn = attn / attn.sum(dim=-1, keepdim=True)
    return attn


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
