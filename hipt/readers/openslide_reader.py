"""The general pixel reader: OpenSlide (Aperio, Hamamatsu, Leica, MIRAX, Philips, generic TIFF...)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hipt.readers.base import WHITE, SlideReadError, check_out


def _rgba_on(rgba: np.ndarray, fill: int = WHITE, out: np.ndarray | None = None) -> np.ndarray:
    """Composite an RGBA array onto grey ``fill``; OpenSlide leaves outside pixels transparent.

    The RGB result goes to ``out`` when given (uint8, ``rgba``'s height and width, 3 channels).
    """
    alpha = rgba[..., 3]
    if out is None:
        rgb = np.array(rgba[..., :3])  # contiguous copy
    else:
        rgb = out
        np.copyto(rgb, rgba[..., :3])
    if alpha.min() == 255:
        return rgb
    # Most non-opaque pixels are fully transparent (outside the slide): set those directly and
    # blend only the few partly transparent ones.
    rgb[alpha == 0] = fill
    part = (alpha != 0) & (alpha != 255)
    if part.any():
        # OpenSlide returns straight (not premultiplied) alpha: blend each colour with the fill.
        a = alpha[part][:, None].astype(np.uint16)
        rgb[part] = ((rgb[part].astype(np.uint16) * a + fill * (255 - a) + 127) // 255).astype(
            np.uint8
        )
    return rgb


def _unsupported_reason(path: Path) -> str:
    """Why OpenSlide rejected a file, as far as its first bytes tell."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "is empty, not a slide"
    if head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
        return "a TIFF that OpenSlide cannot read (truncated, damaged or an unsupported layout)"
    return "not a slide format OpenSlide can read"


class OpenSlideReader:
    """A :class:`~hipt.readers.base.LevelReader` over ``openslide.OpenSlide``.

    Implements the protocol's contract (it is OpenSlide's own convention).

    Every failure becomes a :class:`SlideReadError` whose message names the file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hipt.synthetic import write_generic_tiff
    >>> p = write_generic_tiff(pathlib.Path(tempfile.mkdtemp()) / "s.tiff", 1024, 1024).path
    >>> r = OpenSlideReader(p)
    >>> r.read_level(0, 0, 0, 64, 32).shape
    (32, 64, 3)
    >>> r.close()
    """

    name = "openslide"

    def __init__(self, path: str | os.PathLike) -> None:
        import openslide

        self.path = Path(path)
        if not self.path.exists():
            raise SlideReadError(f"{self.path}: no such file")
        target = self.path
        if self.path.is_dir() and self.path.suffix.lower() != ".mrxs":
            # A DICOM whole-slide image is a folder of instances; OpenSlide opens it from any one.
            instances = sorted(q for q in self.path.glob("*") if q.suffix.lower() == ".dcm")
            if not instances:
                raise SlideReadError(f"{self.path}: is a folder, not a slide")
            target = instances[0]
        try:
            self._slide = openslide.OpenSlide(str(target))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideReadError(f"{self.path}: {_unsupported_reason(target)}") from None
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideReadError(f"{self.path}: OpenSlide cannot open it ({exc})") from None
        try:
            self.level_count = int(self._slide.level_count)
            self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            self.properties = dict(self._slide.properties)
        except openslide.OpenSlideError as exc:
            self.close()
            raise SlideReadError(f"{self.path}: OpenSlide cannot read its header ({exc})") from None
        if self.level_count < 1 or min(self.level_dimensions[0]) < 1:
            self.close()
            raise SlideReadError(f"{self.path}: has no image levels")

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
        """See :meth:`hipt.readers.base.LevelReader.read_level` (OpenSlide defines it)."""
        import openslide

        check_out(out, width, height)
        if self._slide is None:
            raise SlideReadError(f"{self.path}: reader is closed")
        if not 0 <= level < self.level_count:
            raise SlideReadError(f"{self.path}: no level {level} (has {self.level_count})")
        try:
            img = self._slide.read_region((int(x0), int(y0)), int(level), (int(width), int(height)))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideReadError(
                f"{self.path}: cannot read level {level} at level-0 ({x0}, {y0}), "
                f"{width}x{height} px: {exc}"
            ) from None
        return _rgba_on(np.asarray(img), int(fill), out)

    def close(self) -> None:
        """Release the OpenSlide handle (safe to call twice)."""
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
