"""Row-major order of patches and the ViT-4K grid layout."""

from __future__ import annotations

import torch

from hipt.geometry import GRID, patch_grid_to_vit4k_input, patch_to_tokens, scores_to_grid


def test_vit4k_grid_puts_patch_k_at_row_k_div_16():
    feats = torch.arange(256.0).reshape(1, 256, 1).expand(1, 256, 3)
    grid = patch_grid_to_vit4k_input(feats)
    assert grid.shape == (1, 3, GRID, GRID)
    assert grid[0, 0, 2, 5] == 2 * 16 + 5
    assert torch.equal(scores_to_grid(torch.arange(256.0))[7, 3], torch.tensor(7 * 16 + 3.0))


def test_tokens_of_a_patch_are_row_major():
    patch = torch.zeros(3, 256, 256)
    patch[:, 16:32, 48:64] = 1.0  # token row 1, column 3
    tokens = patch_to_tokens(patch)
    lit = tokens.flatten(1).sum(1).nonzero().flatten().tolist()
    assert tokens.shape == (256, 3, 16, 16) and lit == [1 * 16 + 3]
