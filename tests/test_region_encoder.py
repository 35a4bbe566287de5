"""The region encoder: batching across regions, chunking, normalisation, provenance, full size."""

from __future__ import annotations

import hashlib

import pytest
import torch

from hipt.models import create_model
from hipt.models.checkpoint import to_released_layout
from hipt.models.region_encoder import RegionEncoder, build_region_encoder

TINY256 = dict(embed_dim=48, num_heads=2, depth=1)
TINY4K = dict(in_chans=48, embed_dim=24, num_heads=2, depth=1)


def tiny_encoder(patch_batch: int = 256, **kwargs) -> RegionEncoder:
    torch.manual_seed(0)
    enc = RegionEncoder(
        create_model("vit256_s16", **TINY256),
        create_model("vit4k_xs", **TINY4K),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        patch_batch=patch_batch,
        **kwargs,
    )
    return enc.eval()


def random_regions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4096, 4096), dtype=torch.uint8, generator=g)


def reference_patches(vit256, region: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    """ViT-256 on patches cut by slicing at (row, col), normalised by hand (mean = std = 0.5)."""
    x = (region.float() / 255 - 0.5) / 0.5
    batch = torch.stack([x[:, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] for r, c in cells])
    with torch.inference_mode():
        return vit256(batch)


def reference_region(vit4k, patch_feats: torch.Tensor) -> torch.Tensor:
    """ViT-4K on the [D, 16, 16] grid laid out cell by cell from row-major patch features."""
    grid = torch.empty(1, patch_feats.shape[-1], 16, 16)
    for r in range(16):
        for c in range(16):
            grid[0, :, r, c] = patch_feats[r * 16 + c]
    with torch.inference_mode():
        return vit4k(grid)[0]


def test_batches_patches_across_regions_in_chunks():
    regions = random_regions(2)
    calls: list[int] = []

    def count(_module, args, _output):
        calls.append(args[0].shape[0])

    enc = tiny_encoder(patch_batch=512)
    handle = enc.vit256.register_forward_hook(count)
    patch_feats, region_feats = enc.encode(regions)
    assert calls == [512]  # both regions' patches in one call, not one region per call

    calls.clear()
    enc.patch_batch = 200
    chunked_patches, chunked_regions = enc.encode(regions)
    assert calls == [200, 200, 112]
    handle.remove()

    assert patch_feats.shape == (2, 256, 48) and region_feats.shape == (2, 24)
    assert patch_feats.dtype == region_feats.dtype == torch.float32
    assert torch.allclose(chunked_patches, patch_feats, atol=1e-5)
    assert torch.allclose(chunked_regions, region_feats, atol=1e-5)
    # Each region encoded alone gives the same numbers: regions do not mix.
    for i in range(2):
        alone_p, alone_r = enc.encode(regions[i : i + 1])
        assert torch.allclose(alone_p[0], patch_feats[i], atol=1e-5)
        assert torch.allclose(alone_r[0], region_feats[i], atol=1e-5)
    assert not torch.allclose(patch_feats[0], patch_feats[1])


def test_normalisation_comes_from_the_given_statistics():
    enc = RegionEncoder(
        torch.nn.Identity(), torch.nn.Identity(), mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3)
    )
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = (
        pixels.float() / 255 - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    ) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(enc.normalize(pixels), expected, atol=1e-5)


def test_encode_is_inference_and_rejects_bad_input():
    enc = tiny_encoder()
    patches, region = enc.encode(random_regions(1))
    assert torch.is_inference(patches) and torch.is_inference(region)
    with pytest.raises(ValueError, match="uint8"):
        enc(torch.zeros(1, 3, 4096, 4096))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(3, 4096, 4096, dtype=torch.uint8))
    with pytest.raises(ValueError, match="patch_batch"):
        tiny_encoder(patch_batch=0)


def test_bf16_autocast_path_runs_and_stays_close():
    # The CUDA default (bf16 autocast) exercised on the CPU: outputs stay float32.
    regions = random_regions(1, seed=3)
    exact = tiny_encoder().encode(regions)
    mixed = tiny_encoder(amp=True).encode(regions)
    assert mixed[0].dtype == mixed[1].dtype == torch.float32
    for a, b in zip(mixed, exact, strict=True):
        assert (a - b).abs().mean() < 0.05 * b.abs().mean()


def test_build_needs_weights_or_an_explicit_random_choice(tmp_path):
    with pytest.raises(ValueError) as info:
        build_region_encoder(None, None)
    msg = str(info.value)
    assert "vit256_weights" in msg and "vit256_small_dino.pth" in msg
    assert "vit4k_weights" in msg and "vit4k_xs_dino.pth" in msg and "random_weights" in msg

    # A ViT-256 file with a random ViT-4K (the paper's random-init ablation).
    torch.manual_seed(7)
    source = create_model("vit256_s16", **TINY256)
    path = tmp_path / "vit256.pth"
    torch.save({"teacher": to_released_layout(source.state_dict())}, path)
    kwargs = dict(vit256_kwargs=TINY256, vit4k_kwargs=TINY4K)
    enc, prov = build_region_encoder(path, None, random_weights=True, **kwargs)
    assert prov["vit256_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["vit4k_sha256"] == "random"
    assert prov["mean"] == prov["std"] == [0.5, 0.5, 0.5]
    for key, value in source.state_dict().items():
        assert torch.equal(enc.vit256.state_dict()[key], value)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    # Random weights are seeded, hence reproducible.
    again, _ = build_region_encoder(path, None, random_weights=True, **kwargs)
    assert torch.equal(again.vit4k.pos_embed, enc.vit4k.pos_embed)

    with pytest.raises(ValueError, match="vit4k_weights"):
        build_region_encoder(path, None, **kwargs)


@pytest.mark.slow
def test_full_size_region_equals_separate_vit256_then_vit4k():
    """One real 4096 px region through the real-size encoders (random weights), on the CPU."""
    enc, prov = build_region_encoder(None, None, random_weights=True, patch_batch=100)
    assert prov["vit256_sha256"] == prov["vit4k_sha256"] == "random"
    region = random_regions(1, seed=11)
    patch_feats, region_feats = enc.encode(region)
    assert patch_feats.shape == (1, 256, 384) and region_feats.shape == (1, 192)

    # ViT-256 again, separately, on 16 patches that cover every row and every column (a second
    # pass over all 256 would double the cost of this test; all-patch batching is checked on the
    # tiny configuration above), then ViT-4K separately on the whole grid.
    cells = [(r, (5 * r + 3) % 16) for r in range(16)]
    ref_patches = reference_patches(enc.vit256, region[0], cells)
    rows = [r * 16 + c for r, c in cells]
    assert torch.allclose(patch_feats[0, rows], ref_patches, atol=1e-5, rtol=0)
    ref_region = reference_region(enc.vit4k, patch_feats[0])
    assert torch.allclose(region_feats[0], ref_region, atol=1e-5, rtol=0)


def test_regions_other_than_a_16x16_patch_grid_are_refused_clearly():
    enc = tiny_encoder()
    for side in (512, 8192):
        with pytest.raises(ValueError, match=r"4096x4096 px \(16x16 patches of 256 px\)"):
            enc(torch.zeros(1, 3, side, side, dtype=torch.uint8))


def test_normalize_and_encode_patches_refuse_float_pixels_and_leave_them_alone():
    enc = tiny_encoder()
    pixels = torch.rand(2, 3, 256, 256)  # [0, 1] floats: would be divided by 255 once more
    before = pixels.clone()
    with pytest.raises(ValueError, match="uint8"):
        enc.normalize(pixels)
    with pytest.raises(ValueError, match="uint8"):
        enc.encode_patches(pixels)
    assert torch.equal(pixels, before)


def test_building_a_random_encoder_leaves_the_callers_generators_alone(monkeypatch):
    # Only the CPU generator is seeded (and restored): a CUDA caller's generator is not reset.
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded.clear()
    kwargs = dict(vit256_kwargs=TINY256, vit4k_kwargs=TINY4K)
    first, _ = build_region_encoder(None, None, random_weights=True, seed=5, **kwargs)
    assert seeded == []
    assert torch.equal(torch.rand(3), expected)
    second, _ = build_region_encoder(None, None, random_weights=True, seed=5, **kwargs)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value)
