"""The one region → patch → token geometry every stage uses.

A region is ``REGION_PX`` square at the target µm/px. It holds ``GRID``×``GRID`` patches of
``PATCH_PX``; patch ``k`` sits at row ``k // GRID``, column ``k % GRID`` (row-major). A patch holds
``GRID``×``GRID`` tokens of ``TOKEN_PX`` in the same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is needed only by callers' tensors; the tiler imports this without it
    import torch

REGION_PX = 4096
PATCH_PX = 256
TOKEN_PX = 16
GRID = REGION_PX // PATCH_PX  # patches per region side, and tokens per patch side
PATCHES_PER_REGION = GRID * GRID
assert PATCH_PX // TOKEN_PX == GRID


def region_to_patches(region: torch.Tensor, patch_px: int = PATCH_PX) -> torch.Tensor:
    """Cut regions into row-major patches.

    Parameters
    ----------
    region : Tensor
        ``[C, H, W]`` or ``[B, C, H, W]``; ``H`` and ``W`` multiples of ``patch_px``.
    patch_px : int
        Side of a patch in pixels.

    Returns
    -------
    Tensor
        ``[N, C, patch_px, patch_px]`` (or ``[B, N, C, patch_px, patch_px]``), patch ``k`` at row
        ``k // (W // patch_px)``, column ``k % (W // patch_px)``.

    Examples
    --------
    >>> import torch
    >>> x = torch.zeros(3, 512, 512)
    >>> region_to_patches(x).shape
    torch.Size([4, 3, 256, 256])
    """
    batched = region.dim() == 4
    x = region if batched else region.unsqueeze(0)
    b, c, h, w = x.shape
    if h % patch_px or w % patch_px:
        raise ValueError(f"region size {h}x{w} is not a multiple of the patch size {patch_px}")
    rows, cols = h // patch_px, w // patch_px
    x = x.reshape(b, c, rows, patch_px, cols, patch_px).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(b, rows * cols, c, patch_px, patch_px)
    return x if batched else x[0]


def patches_to_region(patches: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """Inverse of :func:`region_to_patches` for a square grid.

    ``patches`` is ``[N, C, P, P]`` or ``[B, N, C, P, P]`` with ``N = grid**2``.
    """
    batched = patches.dim() == 5
    x = patches if batched else patches.unsqueeze(0)
    b, n, c, p, _ = x.shape
    grid = grid or int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = (
        x.reshape(b, grid, grid, c, p, p)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(b, c, grid * p, grid * p)
    )
    return x if batched else x[0]


def patch_to_tokens(patch: torch.Tensor, token_px: int = TOKEN_PX) -> torch.Tensor:
    """Cut patches into row-major tokens (same rule as :func:`region_to_patches`)."""
    return region_to_patches(patch, token_px)


def scores_to_grid(scores: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Lay row-major scores ``[..., grid*grid]`` out as ``[..., grid, grid]`` (row, column)."""
    return scores.reshape(*scores.shape[:-1], grid, grid)


def patch_grid_to_vit4k_input(patch_features: torch.Tensor) -> torch.Tensor:
    """``[B, 256, D]`` row-major patch embeddings → the ``[B, D, 16, 16]`` grid ViT-4K reads."""
    b, n, d = patch_features.shape
    return patch_features.transpose(1, 2).reshape(b, d, GRID, n // GRID)
