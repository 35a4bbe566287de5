"""Pixel readers behind :class:`hipt.slide.Slide`.

A reader exposes the pyramid of one slide file and reads rectangles of one level. OpenSlide is the
general reader; a fast path for JPEG-tiled TIFFs may take over where it applies.
"""

from __future__ import annotations

import os

from hipt.readers.base import LevelReader, SlideReadError

READERS = ("auto", "openslide", "fast")


def open_reader(path: str | os.PathLike, reader: str = "auto") -> LevelReader:
    """Open ``path`` with the named reader.

    Parameters
    ----------
    path : path-like
        The slide file.
    reader : {"auto", "openslide", "fast"}
        ``"openslide"`` reads every format OpenSlide knows; ``"fast"`` decodes JPEG-tiled TIFFs
        directly (Aperio SVS and generic tiled TIFF whose levels are all JPEG tiles) and raises
        :class:`~hipt.readers.tiff_jpeg.UnsupportedSlideError` for anything else; ``"auto"`` takes
        the fast reader wherever it applies and OpenSlide everywhere else.

    Raises
    ------
    SlideReadError
        The file cannot be opened; the message names it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hipt.synthetic import write_generic_tiff
    >>> p = write_generic_tiff(pathlib.Path(tempfile.mkdtemp()) / "s.tiff", 1024, 1024).path
    >>> r = open_reader(p, "openslide")
    >>> r.name, r.level_dimensions[0]
    ('openslide', (1024, 1024))
    >>> r.close()
    """
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {READERS}")
    if reader in ("fast", "auto"):
        try:
            from hipt.readers.tiff_jpeg import TiffJpegReader
        except ImportError as exc:
            if reader == "fast":
                raise SlideReadError(f"{path}: the fast reader is not available ({exc})") from None
        else:
            if reader == "fast":
                return TiffJpegReader(path)
            try:
                # Constructing it is the support check (one header parse, not two).
                return TiffJpegReader(path)
            except SlideReadError:
                pass  # not JPEG-tiled TIFF, or unreadable: OpenSlide decides and reports
    from hipt.readers.openslide_reader import OpenSlideReader

    return OpenSlideReader(path)


__all__ = ["READERS", "LevelReader", "SlideReadError", "open_reader"]
