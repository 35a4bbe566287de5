"""Lay per-region grids of values onto a raster aligned to level 0 (zarr bands, thumbnails).

A raster at downsample ``d`` has pixel ``(i, j)`` centred on level-0 point
``((j + 0.5)·d, (i + 0.5)·d)``. A region at level-0 ``(x, y)`` of side ``s`` with a ``G×G`` grid
gives that pixel the value of cell ``(⌊(py − y)·G/s⌋, ⌊(px − x)·G/s⌋)`` when the centre falls
inside the region. Nearest cell, no blur: what is drawn is what was scored.

Examples
--------
>>> import numpy as np
>>> canvas = np.zeros((4, 4), np.float32)
>>> paint(canvas, 0, 2.0, [(0, 0, 4.0, np.array([[1.0, 2.0], [3.0, 4.0]]))])
>>> canvas[:2, :2].tolist()
[[1.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["paint", "region_rows"]


def _cells(start_px: int, n_px: int, d: float, lo: float, side: float, g: int):
    centres = (np.arange(start_px, start_px + n_px) + 0.5) * d
    inside = (centres >= lo) & (centres < lo + side)
    idx = np.nonzero(inside)[0]
    cells = np.minimum(((centres[idx] - lo) * g / side).astype(np.intp), g - 1)
    return idx, cells


def paint(
    canvas: np.ndarray,
    row0: int,
    d: float,
    boxes: Iterable[tuple[float, float, float, np.ndarray | float]],
    mask: np.ndarray | None = None,
) -> None:
    """Paint ``(x, y, side_level0, grid_or_value)`` boxes into ``canvas`` ``[rows, cols]`` in place.

    ``row0`` is the canvas's first row in the full raster (a band of a larger image). ``mask``
    (same shape, bool) is set where a box painted.
    """
    rows, cols = canvas.shape[-2:]
    for x, y, side, grid in boxes:
        g = np.asarray(grid, dtype=np.float32)
        if g.ndim == 0:
            g = g.reshape(1, 1)
        r_idx, r_cell = _cells(row0, rows, d, y, side, g.shape[0])
        if r_idx.size == 0:
            continue
        c_idx, c_cell = _cells(0, cols, d, x, side, g.shape[1])
        if c_idx.size == 0:
            continue
        canvas[r_idx[:, None], c_idx[None, :]] = g[r_cell[:, None], c_cell[None, :]]
        if mask is not None:
            mask[r_idx[:, None], c_idx[None, :]] = True


def region_rows(coords: np.ndarray, side: float, d: float, row0: int, rows: int) -> np.ndarray:
    """Indices of the regions that reach raster rows ``row0 : row0 + rows``."""
    y = coords[:, 1].astype(np.float64)
    top, bottom = row0 * d, (row0 + rows) * d
    return np.nonzero((y < bottom) & (y + side > top))[0]
