"""The interface every pixel reader implements: :class:`LevelReader`, stated once here.

The readers (:class:`~hipt.readers.openslide_reader.OpenSlideReader`,
:class:`~hipt.readers.tiff_jpeg.TiffJpegReader`) and :class:`hipt.slide.Slide` implement this
contract; their own docstrings only add what is particular to them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

# Grey value of pixels outside the slide: white, like glass (see ``TileSettings.edge_fill``).
WHITE = 255
EDGE_FILLS = {"white": 255, "black": 0}


class SlideReadError(RuntimeError):
    """A slide could not be opened or read; the message names the file (and the tile, if known)."""


class LevelReader(Protocol):
    """One open slide file.

    ``level_dimensions[i]`` is ``(width, height)`` of level ``i``; ``level_downsamples[i]`` its
    downsample against level 0 (fractional on odd-sized pyramids). ``properties`` is the
    OpenSlide-style property mapping. A reader is closed with :meth:`close` (safe to call twice).
    """

    name: str  # "openslide" or "fast"
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    def read_level(
        self,
        level: int,
        x0: int,
        y0: int,
        width: int,
        height: int,
        *,
        out: np.ndarray | None = None,
        fill: int = WHITE,
    ) -> np.ndarray:
        """RGB uint8 ``[height, width, 3]`` of ``level``, top-left at level-0 ``(x0, y0)``.

        The convention is ``openslide.OpenSlide.read_region``'s, composited on ``fill``:

        * the output's top-left pixel sits at level coordinate ``x0 / downsample``; when that is
          not a whole pixel (level > 0 of a pyramid with fractional downsamples, or a corner
          that is not a multiple of the downsample) the level is shifted by the sub-pixel
          fraction with bilinear interpolation;
        * pixels outside the slide, and missing tiles, have the grey value ``fill`` (255 white,
          OpenSlide's transparent pixels composited on white; 0 black);
        * a negative corner shifts the output by ``int(-x0 / downsample)`` pixels and reads
          the level from its first pixel.

        Parameters
        ----------
        out : ndarray, optional
            A writable uint8 ``[height, width, 3]`` array (e.g. a view of shared memory) that
            receives the pixels and is returned.
        fill : int
            Grey value (0-255) of pixels outside the slide.

        Raises
        ------
        SlideReadError
            The pixels cannot be read; the message names the slide (and level and tile).
        """
        ...

    def close(self) -> None:
        """Release the file (and any threads); safe to call twice."""
        ...


def check_out(out: np.ndarray | None, width: int, height: int) -> None:
    """Raise ValueError unless ``out`` is None or a writable uint8 ``[height, width, 3]`` array."""
    if out is not None and (
        out.shape != (height, width, 3) or out.dtype != np.uint8 or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writable uint8 array of shape {(height, width, 3)}, "
            f"not {out.dtype} {out.shape}"
        )
