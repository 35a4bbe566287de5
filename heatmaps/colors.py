"""Colour mapping of attention in [0, 1]: the one place PNGs, the zarr metadata and the viewer
take their colours from.

Examples
--------
>>> import numpy as np
>>> colorize(np.array([[0.0, 1.0]]), "gray")[0].tolist()
[[0, 0, 0], [255, 255, 255]]
>>> blend(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1)), "gray", 0.5).tolist()
[[[128, 128, 128]]]
"""

from __future__ import annotations

import numpy as np

__all__ = ["CHANNEL_COLORS", "blend", "colorize", "hex_color", "lut", "rgb_ints"]

#: Display colour of each zarr channel (``omero`` metadata) and of each GeoJSON class.
CHANNEL_COLORS = {"region": "FF4040", "patch": "40C040", "token": "4080FF"}


def lut(colormap: str, n: int = 256) -> np.ndarray:
    """``[n, 3]`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[colormap].resampled(n)
    return np.round(cmap(np.arange(n))[:, :3] * 255).astype(np.uint8)


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """Attention ``[...]`` in [0, 1] → RGB uint8 ``[..., 3]`` (NaN and values outside clipped)."""
    table = lut(colormap)
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    idx = np.clip(np.round(v * (len(table) - 1)), 0, len(table) - 1).astype(np.intp)
    return table[idx]


def blend(
    rgb: np.ndarray,
    values: np.ndarray,
    colormap: str,
    opacity: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``rgb`` with the colour of ``values`` laid over at ``opacity`` (only where ``mask``)."""
    over = colorize(values, colormap).astype(np.float32)
    base = np.asarray(rgb, dtype=np.float32)
    alpha = np.float32(opacity)
    if mask is not None:
        alpha = alpha * np.asarray(mask, dtype=np.float32)[..., None]
    return np.round(base * (1 - alpha) + over * alpha).astype(np.uint8)


def hex_color(colormap: str, value: float) -> str:
    """``RRGGBB`` of ``value`` in [0, 1] on ``colormap``."""
    r, g, b = colorize(np.array([value]), colormap)[0]
    return f"{int(r):02X}{int(g):02X}{int(b):02X}"


def rgb_ints(hex_rrggbb: str) -> list[int]:
    """``"FF4040"`` → ``[255, 64, 64]`` (QuPath's classification colour form)."""
    return [int(hex_rrggbb[i : i + 2], 16) for i in (0, 2, 4)]
