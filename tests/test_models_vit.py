"""ViT-256 and ViT-4K: registry metadata, shapes, and exact equivalence with the original math.

The reference below re-computes the original HIPT forward pass from a state dict in the released
key layout: patch convolution (or the per-token ``phi`` of ViT-4K), the 14×14 position table
resized at run time with the original formula, attention written out with matmul and softmax,
MLP with exact GELU, LayerNorm eps 1e-6, final-norm [CLS]. The hipt models load the same file
through :func:`load_encoder_weights` and must agree to 1e-5 in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hipt.models import create_model, list_models, model_info
from hipt.models.checkpoint import load_encoder_weights

# ---------------------------------------------------------------- released-layout state dicts


def released_backbone(kind: str, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names and shapes (14×14 position table)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    dim = 384 if kind == "vit256" else 192
    sd: dict[str, torch.Tensor] = {
        "cls_token": rnd(1, 1, dim, std=0.5),
        # Large enough that a different resize formula changes the output well past 1e-5.
        "pos_embed": rnd(1, 197, dim, std=0.5),
    }
    if kind == "vit256":
        sd["patch_embed.proj.weight"] = rnd(dim, 3, 16, 16, std=0.03)
        sd["patch_embed.proj.bias"] = rnd(dim, std=0.1)
    else:
        sd["phi.0.weight"] = rnd(dim, 384, std=0.08)
        sd["phi.0.bias"] = rnd(dim, std=0.1)
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = rnd(dim, std=0.1, mean=1.0)
        sd[p + "norm1.bias"] = rnd(dim, std=0.1)
        sd[p + "attn.qkv.weight"] = rnd(3 * dim, dim, std=0.05)
        sd[p + "attn.qkv.bias"] = rnd(3 * dim, std=0.1)
        sd[p + "attn.proj.weight"] = rnd(dim, dim, std=0.05)
        sd[p + "attn.proj.bias"] = rnd(dim, std=0.1)
        sd[p + "norm2.weight"] = rnd(dim, std=0.1, mean=1.0)
        sd[p + "norm2.bias"] = rnd(dim, std=0.1)
        sd[p + "mlp.fc1.weight"] = rnd(4 * dim, dim, std=0.05)
        sd[p + "mlp.fc1.bias"] = rnd(4 * dim, std=0.1)
        sd[p + "mlp.fc2.weight"] = rnd(dim, 4 * dim, std=0.03)
        sd[p + "mlp.fc2.bias"] = rnd(dim, std=0.1)
    sd["norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["norm.bias"] = rnd(dim, std=0.1)
    return sd


def released_file(path, kind: str, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a DINO training checkpoint in the released layout; return its backbone tensors."""
    backbone = released_backbone(kind, depth, seed)
    teacher = {"backbone." + k: v for k, v in backbone.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 4)  # DINO projection head: must be dropped
    teacher["head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": teacher, "epoch": 1}, path)
    return backbone


# ---------------------------------------------------------------- the original math, written out


def ref_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_runtime_pos_embed(pos, w0: int, h0: int):
    """The original ``interpolate_pos_encoding``: resize at run time by a scale factor."""
    n_tokens = pos.shape[1] - 1
    if n_tokens == w0 * h0 and w0 == h0:
        return pos
    side = int(math.sqrt(n_tokens))
    dim = pos.shape[-1]
    table = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    table = F.interpolate(
        table, scale_factor=((w0 + 0.1) / side, (h0 + 0.1) / side), mode="bicubic"
    )
    assert table.shape[-2:] == (w0, h0)
    table = table.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos[:, :1], table], dim=1)


def ref_block(x, sd, p, heads):
    b, n, c = x.shape
    h = ref_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, c)
    x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    h = ref_layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    h = ref_gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"], attn


def ref_encoder(sd, tokens, w0, h0, depth, heads=6, return_attention=False):
    b = tokens.shape[0]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], dim=1)
    x = x + ref_runtime_pos_embed(sd["pos_embed"], w0, h0)
    attn = None
    for i in range(depth):
        x, attn = ref_block(x, sd, f"blocks.{i}.", heads)
    if return_attention:
        return attn
    return ref_layer_norm(x, sd["norm.weight"], sd["norm.bias"])[:, 0]


def ref_vit256(sd, x, depth, return_attention=False):
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    w0, h0 = t.shape[-2:]
    return ref_encoder(sd, t.flatten(2).transpose(1, 2), w0, h0, depth, 6, return_attention)


def ref_vit4k(sd, grid, depth, return_attention=False):
    b, c, w0, h0 = grid.shape
    t = grid.flatten(2, 3).transpose(1, 2)
    t = ref_gelu(t @ sd["phi.0.weight"].T + sd["phi.0.bias"])
    return ref_encoder(sd, t, w0, h0, depth, 6, return_attention)


# ---------------------------------------------------------------- tests


def test_registry_names_and_metadata():
    assert {"vit256_s16", "vit4k_xs"} <= set(list_models(kind="encoder"))
    i256, i4k = model_info("vit256_s16"), model_info("vit4k_xs")
    assert (i256.input_size_px, i4k.input_size_px) == (256, 4096)
    assert i256.target_mpp == i4k.target_mpp == 0.5
    for info in (i256, i4k):
        assert info.mean == info.std == (0.5, 0.5, 0.5)
    assert i256.extra["released_file"] == "vit256_small_dino.pth"
    assert i4k.extra["released_file"] == "vit4k_xs_dino.pth"
    assert (i256.extra["embed_dim"], i4k.extra["embed_dim"]) == (384, 192)


def test_full_size_architecture_matches_the_original():
    vit256 = create_model("vit256_s16")
    vit4k = create_model("vit4k_xs")
    n256 = sum(p.numel() for p in vit256.parameters())
    # The original count (21,665,664) holds a 197-row table; hipt keeps 257 rows of 384.
    assert n256 == 21_665_664 + (257 - 197) * 384
    assert len(vit256.blocks) == 12 and len(vit4k.blocks) == 6
    assert vit256.blocks[0].attn.num_heads == vit4k.blocks[0].attn.num_heads == 6
    assert vit256.norm.eps == vit4k.norm.eps == 1e-6
    assert vit256.pos_embed.shape == (1, 257, 384) and vit4k.pos_embed.shape == (1, 257, 192)
    # timm's fused attention (scaled_dot_product_attention) is on: the fast kernel on GPU.
    assert all(b.attn.fused_attn for b in [*vit256.blocks, *vit4k.blocks])
    # Released layout, full depth: the same 78 ViT-4K tensors, the same ViT-256 names.
    assert len(vit4k.state_dict()) == len(released_backbone("vit4k", 6)) == 78
    assert len(vit256.state_dict()) == len(released_backbone("vit256", 12))


def test_forward_shapes_and_final_norm_cls():
    torch.manual_seed(0)
    vit256 = create_model("vit256_s16", depth=1).eval()
    vit4k = create_model("vit4k_xs", depth=1).eval()
    with torch.no_grad():
        e256 = vit256(torch.randn(2, 3, 256, 256))
        e4k = vit4k(torch.randn(3, 384, 16, 16))
        tokens = vit4k.forward_features(torch.randn(1, 384, 16, 16))
    assert e256.shape == (2, 384) and e4k.shape == (3, 192)
    # The output is the final-norm [CLS]: zero mean, unit variance before the affine part.
    assert tokens.shape == (1, 257, 192)
    w, b = vit256.norm.weight, vit256.norm.bias
    assert torch.allclose(((e256 - b) / w).mean(-1), torch.zeros(2), atol=1e-4)
    with pytest.raises(ValueError, match="grid"):
        vit4k(torch.randn(1, 384, 14, 14))


def test_vit4k_tokens_are_row_major():
    vit4k = create_model("vit4k_xs", depth=1).eval()
    grid = torch.zeros(1, 384, 16, 16)
    grid[0, :, 3, 10] = 5.0
    with torch.no_grad():
        tokens = vit4k.patch_embed(grid)[0]  # [256, 192]
        base = vit4k.patch_embed(torch.zeros(1, 384, 16, 16))[0]
    changed = (tokens - base).abs().sum(-1).nonzero().flatten().tolist()
    assert changed == [3 * 16 + 10]


@pytest.mark.parametrize("kind", ["vit256", "vit4k"])
def test_released_weights_give_the_original_numbers(tmp_path, kind):
    depth = 2
    path = tmp_path / f"{kind}.pth"
    backbone = released_file(path, kind, depth, seed=1)
    model = create_model("vit256_s16" if kind == "vit256" else "vit4k_xs", depth=depth).eval()
    load_encoder_weights(model, path)

    torch.manual_seed(2)
    if kind == "vit256":
        x = torch.randn(3, 3, 256, 256)
        expected = ref_vit256(backbone, x, depth)
    else:
        x = torch.randn(3, 384, 16, 16)
        expected = ref_vit4k(backbone, x, depth)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()

    # The check has teeth: timm's own resampling (size-based, antialiased) misses the tolerance.
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        model.pos_embed.copy_(resample_abs_pos_embed(backbone["pos_embed"], [16, 16]))
        other = model(x)
    assert (other - expected).abs().max() > 1e-3


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    model = create_model("vit4k_xs", depth=2).eval()
    x = torch.randn(2, 384, 16, 16)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.fused_attn = True
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5, rtol=0)


def test_pretraining_crops_with_dynamic_size():
    # DINO crops (224 px global, 96 px local; 14- and 6-token grids) need other input sizes.
    vit256 = create_model("vit256_s16", depth=1, dynamic_img_size=True).eval()
    vit4k = create_model("vit4k_xs", depth=1, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert vit256(torch.randn(1, 3, 96, 96)).shape == (1, 384)
        assert vit4k(torch.randn(2, 384, 6, 6)).shape == (2, 192)
        # At the native size the table is used as it is: same numbers as the static model.
        static = create_model("vit4k_xs", depth=1).eval()
        static.load_state_dict(vit4k.state_dict())
        g = torch.randn(1, 384, 16, 16)
        assert torch.allclose(vit4k(g), static(g), atol=1e-6)
