"""ViT-256 and ViT-4K, the two encoders of HIPT, built on timm's ``VisionTransformer``.

ViT-256 is a ViT-S/16 over 256×256 px patches; ViT-4K reads the 16×16 grid of ViT-256 [CLS]
embeddings of a 4096×4096 px region as its tokens. Both return the final-norm [CLS] embedding.

The models hold a position table for their native grid (16×16 tokens + [CLS], i.e. 257 rows).
The released HIPT weights keep a 14×14 table; :mod:`hipt.models.checkpoint` resizes it once at
load time with the formula the original code applies at every forward pass.

Examples
--------
>>> import torch
>>> from hipt.models import create_model
>>> vit4k = create_model("vit4k_xs", depth=1)
>>> vit4k(torch.zeros(2, 384, 16, 16)).shape
torch.Size([2, 192])
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from hipt.geometry import GRID, PATCH_PX, REGION_PX, TOKEN_PX
from hipt.models.registry import ModelInfo, register_model

# The released HIPT_4K inference code normalises with mean = std = 0.5 (hipt-original §1); the
# DINO pretraining script used ImageNet statistics, but the released inference is what users match.
HIPT_MEAN = (0.5, 0.5, 0.5)
HIPT_STD = (0.5, 0.5, 0.5)
VIT256_RELEASED_FILE = "vit256_small_dino.pth"
VIT4K_RELEASED_FILE = "vit4k_xs_dino.pth"


class GridTokenEmbed(nn.Module):
    """Token embedding of ViT-4K: a per-token ``Linear → GELU → Dropout`` over a feature grid.

    It takes the place of timm's convolutional ``PatchEmbed`` (same constructor keywords), so
    ``VisionTransformer`` builds ViT-4K unchanged. The layer is named ``phi`` as in the released
    weights (``phi.0.weight``), so only the ``patch_embed.`` prefix differs.

    Parameters
    ----------
    img_size : int
        Grid side in tokens (16 for a 4096 px region of 256 px patches).
    patch_size : int
        Must be 1: every grid cell is one token.
    in_chans : int
        Feature dimension of a grid cell (384, the ViT-256 embedding).
    embed_dim : int
        Token dimension of the transformer (192).
    drop_rate : float
        Dropout after the GELU (0 at inference).
    output_fmt : str or None
        ``"NHWC"`` when timm's ``dynamic_img_size`` is on (position table resampled per input).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = GRID,
        patch_size: int | tuple[int, int] = 1,
        in_chans: int = 384,
        embed_dim: int = 192,
        bias: bool = True,
        drop_rate: float = 0.0,
        output_fmt: str | None = None,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        side = img_size if isinstance(img_size, int) else img_size[0]
        step = patch_size if isinstance(patch_size, int) else patch_size[0]
        if step != 1:
            raise ValueError(
                f"ViT-4K reads one token per grid cell; patch_size must be 1, got {step}"
            )
        if dynamic_img_pad:
            raise ValueError("ViT-4K has no padding mode")
        self.img_size = (side, side)
        self.patch_size = (1, 1)
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.strict_img_size = strict_img_size
        self.channels_last = output_fmt == "NHWC"
        dd = {"device": device, "dtype": dtype}
        self.phi = nn.Sequential(
            nn.Linear(in_chans, embed_dim, bias=bias, **dd), nn.GELU(), nn.Dropout(drop_rate)
        )

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return 1 if as_scalar else (1, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, h, w = grid.shape
        if self.strict_img_size and (h, w) != self.grid_size:
            raise ValueError(f"ViT-4K expects a {self.grid_size} grid, got {h}x{w}")
        tokens = self.phi(grid.flatten(2).transpose(1, 2))  # row-major: token k = row*w + col
        return tokens.reshape(b, h, w, -1) if self.channels_last else tokens


def _vit_kwargs(**defaults: Any) -> dict[str, Any]:
    # Shared with the original: qkv bias, LayerNorm eps 1e-6, exact GELU, [CLS] pooling, no head.
    base = dict(
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=partial(LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        num_classes=0,
        global_pool="token",
        class_token=True,
    )
    base.update(defaults)
    return base


@register_model(
    ModelInfo(
        name="vit256_s16",
        kind="encoder",
        input_size_px=PATCH_PX,
        target_mpp=0.5,
        mean=HIPT_MEAN,
        std=HIPT_STD,
        extra={
            "released_file": VIT256_RELEASED_FILE,
            "embed_dim": 384,
            "token_px": TOKEN_PX,
            "num_heads": 6,
            "depth": 12,
        },
    )
)
def vit256_s16(**kwargs: Any) -> VisionTransformer:
    """ViT-256 (ViT-S/16): ``[B, 3, 256, 256]`` normalised pixels → ``[B, 384]`` final-norm [CLS].

    Keyword arguments override the architecture (e.g. ``depth=2`` for tests, ``img_size=224``
    or ``dynamic_img_size=True`` for pretraining crops) and go to timm's ``VisionTransformer``.

    Examples
    --------
    >>> import torch
    >>> model = vit256_s16(depth=1)
    >>> model(torch.zeros(1, 3, 256, 256)).shape
    torch.Size([1, 384])
    """
    args = _vit_kwargs(img_size=PATCH_PX, patch_size=TOKEN_PX, embed_dim=384, depth=12, num_heads=6)
    args.update(kwargs)
    return VisionTransformer(**args)


@register_model(
    ModelInfo(
        name="vit4k_xs",
        kind="encoder",
        input_size_px=REGION_PX,
        target_mpp=0.5,
        mean=HIPT_MEAN,
        std=HIPT_STD,
        extra={
            "released_file": VIT4K_RELEASED_FILE,
            "embed_dim": 192,
            "input_dim": 384,
            "grid": GRID,
            "num_heads": 6,
            "depth": 6,
        },
    )
)
def vit4k_xs(**kwargs: Any) -> VisionTransformer:
    """ViT-4K: ``[B, 384, 16, 16]`` grid of ViT-256 embeddings → ``[B, 192]`` final-norm [CLS].

    The grid is row-major (cell ``[:, r, c]`` is patch ``r*16 + c``), as made by
    :func:`hipt.geometry.patch_grid_to_vit4k_input`. ``img_size`` is the grid side in tokens;
    ``in_chans`` the input feature size; ``drop_rate`` also sets the dropout inside ``phi``.

    Examples
    --------
    >>> import torch
    >>> model = vit4k_xs(depth=1)
    >>> model(torch.zeros(1, 384, 16, 16)).shape
    torch.Size([1, 192])
    """
    drop = kwargs.get("drop_rate", 0.0)
    args = _vit_kwargs(
        img_size=GRID,
        patch_size=1,
        in_chans=384,
        embed_dim=192,
        depth=6,
        num_heads=6,
        embed_layer=partial(GridTokenEmbed, drop_rate=drop),
    )
    args.update(kwargs)
    return VisionTransformer(**args)
