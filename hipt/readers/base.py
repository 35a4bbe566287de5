"""The interface every pixel reader implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SlideReadError(RuntimeError):
    """A slide could not be opened or read; the message names the file (and the tile, if known)."""


class LevelReader(Protocol):
    """One open slide file.

    ``level_dimensions[i]`` is ``(width, height)`` of level ``i``; ``level_downsamples[i]`` its
    downsample against level 0. ``properties`` is the OpenSlide-style property mapping.
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
    ) -> np.ndarray:
        """RGB uint8 ``[height, width, 3]`` of ``level``, top-left at level-0 ``(x0, y0)``.

        Same convention as ``openslide.OpenSlide.read_region``: pixels outside the slide are white
        (255) after compositing the alpha channel onto white. With ``out`` (a writable uint8
        ``[height, width, 3]`` array, e.g. a view of shared memory) the pixels go there and
        ``out`` is returned.
        """
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

    def close(self) -> None: ...
