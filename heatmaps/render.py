"""PNG overlays for people: the slide with region attention, and the top regions up close.

``slide.png``: the thumbnail (from a low pyramid level) with the regions' percentile attention
blended in, the outline of the tiled tissue, a colour bar and the prediction in the title.
``top_regions/rank<r>.png``: one region plain, with patch attention and with token attention
side by side (head mean); ``rank<r>_heads.png``: the same overlays for every head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from heatmaps.colors import blend, lut
from heatmaps.paint import paint
from hipt.resample import box_reduce

__all__ = ["region_panels", "slide_png", "title_of"]

LABEL_PX = 22  # height of a panel's caption strip
TITLE_PX = 40  # height of slide.png's title strip
BAR_W_PX = 110  # width of slide.png's colour bar column
BAR_PX = 14  # height of the colour bar strip


def title_of(prediction: dict[str, Any]) -> str:
    """One line saying what the model predicted."""
    if "risk" in prediction:
        return f"risk {prediction['risk']:.3f}"
    probs = prediction.get("probabilities", {})
    best = prediction.get("predicted_class", "")
    return f"predicted {best} (p={probs.get(best, float('nan')):.2f})"


def tissue_outline_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue of a thumbnail for the drawn outline: Otsu on HSV saturation, closed and filled.

    A display aid only (the regions scored come from ``hipt tile``'s own segmentation, a stage
    this one does not import); glass is never tissue (saturation floor 0.05).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sat = np.asarray(Image.fromarray(thumbnail).convert("HSV"))[..., 1].astype(np.float32) / 255
    if sat.max() - sat.min() < 1e-3:
        return np.zeros(sat.shape, bool)
    mask = sat > max(0.05, float(threshold_otsu(sat)))
    mask = ndimage.binary_closing(mask, iterations=3)
    return ndimage.binary_fill_holes(mask)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def slide_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    side_level0: float,
    ranks: np.ndarray,
    *,
    colormap: str,
    opacity: float,
    title: str,
) -> None:
    """Write ``slide.png``: the thumbnail with region attention blended where regions are, the
    tissue outline, a title strip (``TITLE_PX``) above and a colour bar (``BAR_W_PX``) right.

    The thumbnail's pixel ``(i, j)`` is the PNG's pixel ``(TITLE_PX + i, j)``.
    """
    from scipy import ndimage

    h, w = thumbnail.shape[:2]
    values = np.zeros((h, w), np.float32)
    covered = np.zeros((h, w), bool)
    boxes = [
        (float(x), float(y), side_level0, float(r)) for (x, y), r in zip(coords, ranks, strict=True)
    ]
    paint(values, 0, downsample, boxes, covered)
    image = blend(thumbnail, values, colormap, opacity, covered)
    tissue = tissue_outline_mask(thumbnail)
    edge = tissue & ~ndimage.binary_erosion(tissue)
    image[ndimage.binary_dilation(edge)] = 0
    canvas = Image.new("RGB", (w + BAR_W_PX, h + TITLE_PX), "white")
    canvas.paste(Image.fromarray(image), (0, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, TITLE_PX // 2), title, fill=(0, 0, 0), font=_font(18), anchor="lm")
    # Colour bar: 1 at the top, 0 at the bottom, over 80% of the image height.
    bar_h = max(32, int(0.8 * h))
    top = TITLE_PX + (h - bar_h) // 2
    table = lut(colormap)
    idx = np.linspace(len(table) - 1, 0, bar_h).round().astype(int)
    bar = np.repeat(table[idx][:, None], 20, axis=1)
    canvas.paste(Image.fromarray(bar), (w + 16, top))
    small = _font(13)
    for v in (0.0, 0.5, 1.0):
        y = top + int(round((1 - v) * (bar_h - 1)))
        draw.line([(w + 36, y), (w + 40, y)], fill=(0, 0, 0))
        draw.text((w + 43, y), f"{v:g}", fill=(0, 0, 0), font=small, anchor="lm")
    draw.text((w + 16, top - 6), "attention", fill=(0, 0, 0), font=small, anchor="lb")
    draw.text((w + 16, top + bar_h + 6), "(percentile)", fill=(0, 0, 0), font=small, anchor="lt")
    canvas.save(path, compress_level=6)


def _captioned(panel: np.ndarray, caption: str) -> np.ndarray:
    h, w = panel.shape[:2]
    out = np.full((h + LABEL_PX, w, 3), 255, np.uint8)
    out[LABEL_PX:] = panel
    img = Image.fromarray(out)
    ImageDraw.Draw(img).text((4, 3), caption, fill=(0, 0, 0), font=_font(15))
    return np.asarray(img)


def _colour_bar(width: int, colormap: str) -> np.ndarray:
    table = lut(colormap)
    idx = np.linspace(0, len(table) - 1, width).round().astype(int)
    bar = np.repeat(table[idx][None], BAR_PX, axis=0)
    img = Image.fromarray(np.vstack([np.full((LABEL_PX, width, 3), 255, np.uint8), bar]))
    draw = ImageDraw.Draw(img)
    draw.text((4, 3), "0 (low)", fill=(0, 0, 0), font=_font(15))
    draw.text((width - 4, 3), "1 (high) percentile", fill=(0, 0, 0), font=_font(15), anchor="ra")
    return np.asarray(img)


def _row(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(p)
    return np.hstack(parts)


def region_panels(
    folder: Path,
    rank: int,
    pixels: np.ndarray,
    patch: np.ndarray | None,
    token: np.ndarray | None,
    *,
    colormap: str,
    opacity: float,
    heads: bool,
    caption: str,
) -> list[Path]:
    """Write ``rank<r>.png`` (and ``rank<r>_heads.png``); maps are ``[heads + 1, px, px]`` in [0, 1]
    with the head mean first."""
    written = []
    panels = [_captioned(pixels, caption)]
    for name, maps in (("patch (ViT-4K)", patch), ("token (ViT-256)", token)):
        if maps is not None:
            panels.append(_captioned(blend(pixels, maps[0], colormap, opacity), f"{name}, mean"))
    row = _row(panels)
    image = np.vstack([row, _colour_bar(row.shape[1], colormap)])
    path = folder / f"rank{rank}.png"
    Image.fromarray(image).save(path, compress_level=6)
    written.append(path)
    if heads:
        small_px = box_reduce(pixels, 2 if pixels.shape[0] >= 512 else 1)
        rows = []
        for name, maps in (("patch", patch), ("token", token)):
            if maps is None:
                continue
            cells = []
            for h in range(1, maps.shape[0]):
                m = np.asarray(
                    Image.fromarray(maps[h]).resize(small_px.shape[1::-1], Image.Resampling.NEAREST)
                )
                cells.append(
                    _captioned(blend(small_px, m, colormap, opacity), f"{name} head {h - 1}")
                )
            rows.append(_row(cells))
        if rows:
            grid = np.vstack(rows)
            path = folder / f"rank{rank}_heads.png"
            Image.fromarray(grid).save(path, compress_level=6)
            written.append(path)
    return written
