"""Region → patches → tokens in row-major order, on colour-numbered regions and a real slide."""

from __future__ import annotations

import numpy as np
import torch

from hipt.geometry import (
    GRID,
    PATCH_PX,
    REGION_PX,
    TOKEN_PX,
    patch_grid_to_vit4k_input,
    patch_to_tokens,
    patches_to_region,
    region_to_patches,
    scores_to_grid,
)
from hipt.slide import Slide


def numbered_region(n: int = GRID, px: int = PATCH_PX) -> torch.Tensor:
    """[3, n*px, n*px] uint8 region whose patch k (row k // n, column k % n) has colour code k."""
    k = torch.arange(n * n).reshape(n, n)
    # Colour = (k % 256, k // 256, 7): unique per patch, readable back from any pixel.
    code = torch.stack([k % 256, k // 256, torch.full_like(k, 7)])
    return code.repeat_interleave(px, 1).repeat_interleave(px, 2).to(torch.uint8)


def test_patches_come_out_in_row_major_order():
    region = numbered_region()
    assert region.shape == (3, REGION_PX, REGION_PX)
    patches = region_to_patches(region)
    assert patches.shape == (256, 3, 256, 256)
    for k in range(256):
        p = patches[k].long()
        assert (p[0] == k % 256).all() and (p[1] == k // 256).all() and (p[2] == 7).all()
    # And the k-th patch is literally the pixels at row k // 16, column k % 16.
    k = 37
    r, c = divmod(k, GRID)
    assert torch.equal(patches[k], region[:, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256])


def test_patches_back_to_the_region():
    region = numbered_region()
    assert torch.equal(patches_to_region(region_to_patches(region)), region)
    batch = torch.stack([region, region.flip(-1)])
    assert torch.equal(patches_to_region(region_to_patches(batch)), batch)


def test_tokens_in_the_same_order():
    patch = numbered_region(GRID, TOKEN_PX)  # a 256 px patch of 16 px tokens
    tokens = patch_to_tokens(patch)
    assert tokens.shape == (256, 3, 16, 16)
    assert [int(t[0, 0, 0]) for t in tokens[:20]] == list(range(20))


def test_scores_and_vit4k_grid_keep_the_order():
    scores = torch.arange(256.0)
    grid = scores_to_grid(scores)
    assert grid[2, 5] == 2 * 16 + 5
    feats = torch.arange(256.0)[None, :, None].expand(1, 256, 4)  # patch k has feature k
    g = patch_grid_to_vit4k_input(feats)
    assert g.shape == (1, 4, 16, 16) and g[0, 0, 3, 9] == 3 * 16 + 9


def test_region_from_a_slide_cut_into_patches(tiff_050):
    """Patch k of a region read from a slide is the 256 px read at its grid position."""
    with Slide(tiff_050.path) as s:
        x0, y0 = 256, 512
        region = torch.from_numpy(s.read_region(x0, y0, 1024, 0.5)).permute(2, 0, 1)
        patches = region_to_patches(region)  # 4x4 grid of 256 px
        for k in (0, 5, 15):
            r, c = divmod(k, 4)
            direct = s.read_region(x0 + c * 256, y0 + r * 256, 256, 0.5)
            assert np.array_equal(patches[k].permute(1, 2, 0).numpy(), direct)
