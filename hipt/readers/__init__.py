"""Pixel readers behind :class:`hipt.slide.Slide`.

A reader exposes the pyramid of one slide file and reads rectangles of one level. OpenSlide is the
general reader; a fast path for JPEG-tiled TIFFs may take over where it applies.
"""

from hipt.readers.base import LevelReader, SlideReadError

__all__ = ["LevelReader", "SlideReadError"]
