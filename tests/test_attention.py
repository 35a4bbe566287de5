"""Last-block [CLS] attention of ViT-256 and ViT-4K: exact weights, normalisation, geometry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hipt.geometry import (
    GRID,
    PATCH_PX,
    patch_grid_to_vit4k_input,
    region_to_patches,
    scores_to_grid,
)
from hipt.models import create_model
from hipt.models.attention import (
    cls_attention,
    last_block_attention,
    region_attention,
    vit4k_attention,
    vit256_attention,
)
from hipt.models.region_encoder import RegionEncoder


def reference_last_attention_vit4k(sd: dict[str, torch.Tensor], grid: torch.Tensor, depth: int):
    """The original ``get_last_selfattention`` of ViT-4K, written out (native 16×16 table)."""

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    def attention(h, p):
        b, n, c = h.shape
        qkv = (h @ sd[p + "qkv.weight"].T + sd[p + "qkv.bias"]).reshape(b, n, 3, 6, c // 6)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-2, -1)) * (c // 6) ** -0.5, dim=-1)
        return a, (a @ v).transpose(1, 2).reshape(b, n, c)

    b = grid.shape[0]
    x = gelu(
        grid.flatten(2).transpose(1, 2) @ sd["patch_embed.phi.0.weight"].T
        + sd["patch_embed.phi.0.bias"]
    )
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}."
        a, y = attention(ln(x, p + "norm1"), p + "attn.")
        if i == depth - 1:
            return a
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = gelu(ln(x, p + "norm2") @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("fused", [True, False])
def test_extractor_gives_the_exact_weights(fused):
    torch.manual_seed(0)
    model = create_model("vit4k_xs", depth=3).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
        for blk in model.blocks:
            blk.attn.fused_attn = fused  # the forward kernel must not matter
        grid = torch.randn(2, 384, 16, 16)
        got = last_block_attention(model, grid)
    expected = reference_last_attention_vit4k(model.state_dict(), grid, depth=3)
    assert got.shape == (2, 6, 257, 257)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_maps_sum_to_one():
    torch.manual_seed(1)
    vit256 = create_model("vit256_s16", depth=2).eval()
    vit4k = create_model("vit4k_xs", depth=2).eval()
    with torch.inference_mode():
        full = last_block_attention(vit256, torch.randn(2, 3, 256, 256))
        raw = vit256_attention(vit256, torch.randn(2, 3, 256, 256))
        grid = torch.randn(3, 384, 16, 16)
        raw4k = vit4k_attention(vit4k, grid)
        cls_self = last_block_attention(vit4k, grid)[:, :, 0, 0]
        norm4k = vit4k_attention(vit4k, grid, renormalize=True)
    assert torch.allclose(full.sum(-1), torch.ones(2, 6, 257), atol=1e-5)
    assert raw.shape == (2, 6, 256) and raw4k.shape == (3, 6, 256)
    # Raw maps are the model's weights: they sum to 1 with the [CLS]→[CLS] weight.
    assert torch.allclose(raw4k.sum(-1) + cls_self, torch.ones(3, 6), atol=1e-5)
    assert torch.allclose(norm4k.sum(-1), torch.ones(3, 6), atol=1e-5)
    assert (raw4k >= 0).all()


def drive_attention_by_brightness(model: torch.nn.Module, gain: float = 1.5) -> None:
    """Weights under which [CLS] attends to the token whose input is brightest.

    Token embeddings become ``s·v·p`` for the token's input value ``v`` (a patch's mean pixel,
    or grid feature 0) and a zero-mean pattern ``p`` (+1 on the first half of the channels, -1 on
    the rest); LayerNorm turns them into ``sign(v)·p``. [CLS] is ``p`` and q = k = gain·h, so a
    bright token (v > 0) scores +gain²·√d per head and a dark one (v < 0) -gain²·√d. The first
    blocks are made identities, so the map depends on the input alone, through the last block.
    """
    dim = model.embed_dim
    p = torch.cat([torch.ones(dim // 2), -torch.ones(dim - dim // 2)])
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        if hasattr(model.patch_embed, "proj"):  # ViT-256: mean pixel value of the token times p
            model.patch_embed.proj.weight.copy_(
                p.view(dim, 1, 1, 1).expand(dim, 3, 16, 16) / 768 * 50
            )
        else:  # ViT-4K: grid feature 0 times p
            model.patch_embed.phi[0].weight[:, 0] = 50 * p
        model.cls_token.copy_(p.view(1, 1, dim))
        for blk in model.blocks:
            blk.norm1.weight.fill_(1.0)
            blk.norm2.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        qkv = model.blocks[-1].attn.qkv.weight
        qkv[:dim] = gain * torch.eye(dim)
        qkv[dim : 2 * dim] = gain * torch.eye(dim)


@pytest.mark.parametrize("row,col", [(0, 0), (3, 10), (15, 7)])
def test_bright_patch_of_a_region_lights_that_patch(row, col):
    """Region pixels → row-major patches → grid → ViT-4K attention → (row, col) on the grid."""
    region = torch.zeros(1, 3, 4096, 4096, dtype=torch.uint8)  # black: normalised -1
    region[..., row * PATCH_PX : (row + 1) * PATCH_PX, col * PATCH_PX : (col + 1) * PATCH_PX] = 255
    patches = region_to_patches(region).float() / 255 * 2 - 1  # mean = std = 0.5
    features = torch.zeros(1, GRID * GRID, 384)
    features[..., 0] = patches.mean(dim=(2, 3, 4))  # a stand-in patch embedding: brightness
    model = create_model("vit4k_xs", depth=2).eval()
    drive_attention_by_brightness(model)
    with torch.inference_mode():
        maps = vit4k_attention(model, patch_grid_to_vit4k_input(features), renormalize=True)
    grid = scores_to_grid(maps)[0]  # [heads, 16, 16]
    for head in grid:
        assert head[row, col] > 0.99
        assert torch.nonzero(head == head.max()).tolist() == [[row, col]]
    # Without the bright patch nothing stands out: the map is uniform.
    features[..., 0] = -1.0
    with torch.inference_mode():
        flat = vit4k_attention(model, patch_grid_to_vit4k_input(features), renormalize=True)
    assert torch.allclose(flat, torch.full_like(flat, 1 / 256), atol=1e-6)


@pytest.mark.parametrize("row,col", [(0, 15), (9, 2)])
def test_bright_token_of_a_patch_lights_that_token(row, col):
    patch = -torch.ones(1, 3, 256, 256)
    patch[..., row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = 1.0
    model = create_model("vit256_s16", depth=2).eval()
    drive_attention_by_brightness(model)
    with torch.inference_mode():
        raw = vit256_attention(model, patch)
        maps = scores_to_grid(raw)[0]
    assert (raw.argmax(-1) == row * 16 + col).all()
    assert (maps[:, row, col] > 0.45).all()  # [CLS] splits its weight with itself
    other = maps.clone()
    other[:, row, col] = 0
    assert other.max() < 1e-6


def test_extractor_under_autocast_stays_fp32():
    model = create_model("vit4k_xs", depth=2).eval()
    grid = torch.randn(1, 384, 16, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = cls_attention(model, grid)
    assert maps.dtype == torch.float32
    with torch.inference_mode():
        exact = cls_attention(model, grid)
    # Only the blocks before the last ran in bf16.
    assert F.l1_loss(maps, exact) < 1e-3


def test_region_attention_matches_the_encoder_and_the_extractors():
    torch.manual_seed(0)
    encoder = RegionEncoder(
        create_model("vit256_s16", embed_dim=48, num_heads=2, depth=2),
        create_model("vit4k_xs", in_chans=48, embed_dim=24, num_heads=3, depth=2),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        patch_batch=300,  # chunks straddle the two regions
    )
    regions = torch.randint(0, 256, (2, 3, 4096, 4096), dtype=torch.uint8)
    out = region_attention(encoder, regions)
    patch_feats, region_feats = encoder.encode(regions)
    assert out.token_attention.shape == (2, 256, 2, 256)
    assert out.patch_attention.shape == (2, 3, 256)
    assert torch.allclose(out.patch_features, patch_feats, atol=1e-5)
    assert torch.allclose(out.region_features, region_feats, atol=1e-5)
    # Region 1, patch (4, 9), cut by slicing: its token map equals the ViT-256 extractor's.
    patch = regions[1:2, :, 4 * 256 : 5 * 256, 9 * 256 : 10 * 256].float() / 255 * 2 - 1
    with torch.inference_mode():
        expected = vit256_attention(encoder.vit256, patch)[0]
        expected4k = vit4k_attention(encoder.vit4k, patch_grid_to_vit4k_input(patch_feats))
    assert torch.allclose(out.token_attention[1, 4 * 16 + 9], expected, atol=1e-6)
    assert torch.allclose(out.patch_attention, expected4k, atol=1e-6)
