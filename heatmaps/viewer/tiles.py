"""Deep Zoom tiles of a slide and of its attention overlays, and the cache that holds them.

The slide is cut by openslide-python's :class:`~openslide.deepzoom.DeepZoomGenerator` (the tile
geometry every Deep Zoom viewer expects); its pixels come from the project's reader
(:func:`hipt.readers.open_reader`: the fast JPEG-tile reader where it applies, OpenSlide
elsewhere). An overlay tile covers exactly the level-0 rectangle of the slide tile with the same
address, so the two always line up; its pixels are the attention values sampled at the tile's
pixel centres (nearest, so region and patch borders stay sharp), coloured by a matplotlib
colormap, transparent where there is no attention or it is below a threshold.

Examples
--------
>>> import tempfile, pathlib
>>> from hipt.synthetic import write_generic_tiff
>>> p = write_generic_tiff(pathlib.Path(tempfile.mkdtemp()) / "s.tiff", 1024, 768).path
>>> tiles = SlideTiles(p)
>>> tiles.level_count, tiles.level_dimensions[-1]
(11, (1024, 768))
>>> tiles.tile(10, 0, 0).size
(255, 255)
>>> tiles.close()
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from hipt.readers import open_reader
from hipt.slide import mpp_from_properties

TILE_SIZE = 254  # with a 1 px overlap each side, interior tiles are 256 px
OVERLAP = 1
JPEG_QUALITY = 85


class TileRequestError(ValueError):
    """A tile request names a level or address that does not exist (a 4xx, not a crash)."""


class _ReaderAsOpenSlide:
    """The few ``OpenSlide`` members :class:`DeepZoomGenerator` uses, over a hipt pixel reader."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self.properties = dict(reader.properties)
        self.level_count = int(reader.level_count)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in reader.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in reader.level_downsamples)
        self.dimensions = self.level_dimensions[0]

    def get_best_level_for_downsample(self, downsample: float) -> int:
        # OpenSlide's rule: the last level whose downsample does not exceed the one asked for.
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        rgb = self._reader.read_level(level, location[0], location[1], size[0], size[1])
        # Already composited on white; DeepZoomGenerator wants an alpha channel to composite.
        return Image.fromarray(rgb).convert("RGBA")

    def close(self) -> None:
        self._reader.close()


class SlideTiles:
    """Deep Zoom tiles of one slide file.

    Parameters
    ----------
    path : path-like
        The slide.
    reader : {"auto", "openslide", "fast"}
        Pixel reader (see :func:`hipt.readers.open_reader`).
    mpp : float, optional
        Level-0 µm/px when the metadata has none (otherwise read from the metadata).

    Attributes
    ----------
    mpp_level0 : float or None
        µm/px of level 0, for the scale bar; None when unknown.
    """

    def __init__(self, path: str | os.PathLike, reader: str = "auto", mpp: float | None = None):
        self.path = Path(path)
        self._osr = _ReaderAsOpenSlide(open_reader(self.path, reader))
        self.reader_name: str = self._osr._reader.name
        self.dz = DeepZoomGenerator(self._osr, tile_size=TILE_SIZE, overlap=OVERLAP)
        found, _, _ = mpp_from_properties(self._osr.properties)
        self.mpp_level0: float | None = mpp if mpp is not None else found
        self.dimensions: tuple[int, int] = self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self.dz.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.dz.level_dimensions

    def check_address(self, level: int, col: int, row: int) -> None:
        """Raise :class:`TileRequestError` with a one-line reason unless the tile exists."""
        if not 0 <= level < self.dz.level_count:
            raise TileRequestError(f"level {level} out of range 0..{self.dz.level_count - 1}")
        cols, rows = self.dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileRequestError(
                f"tile ({col}, {row}) out of range at level {level}: {cols} x {rows} tiles"
            )

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        """The RGB slide tile at Deep Zoom ``level``, column ``col``, row ``row``."""
        self.check_address(level, col, row)
        tile = self.dz.get_tile(level, (col, row))
        size = self.dz.get_tile_dimensions(level, (col, row))
        if tile.size != size:
            # DeepZoomGenerator shrinks with an aspect-keeping thumbnail, so a few-pixel tile of a
            # non-square slide can come out one pixel short of the size its own layout declares.
            tile = tile.resize(size, Image.Resampling.LANCZOS)
        return tile

    def tile_level0_box(self, level: int, col: int, row: int) -> tuple[float, float, float, float]:
        """Level-0 ``(x, y, width, height)`` the tile covers, and so its overlay tile too."""
        self.check_address(level, col, row)
        (x0, y0), slide_level, (w, h) = self.dz.get_tile_coordinates(level, (col, row))
        ds = self._osr.level_downsamples[slide_level]
        return float(x0), float(y0), w * ds, h * ds

    def tile_size(self, level: int, col: int, row: int) -> tuple[int, int]:
        self.check_address(level, col, row)
        return self.dz.get_tile_dimensions(level, (col, row))

    def close(self) -> None:
        self._osr.close()


def encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: overlay tiles are flat colour areas, so fast compression is already small.
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------ colour
def colormap_lut(name: str) -> np.ndarray:
    """A uint8 ``[256, 3]`` RGB lookup table of the matplotlib colormap ``name`` (via
    :func:`heatmaps.colors.lut`).

    Raises ``ValueError`` naming the allowed maps when ``name`` is unknown.

    Examples
    --------
    >>> lut = colormap_lut("coolwarm")
    >>> lut.shape, lut.dtype
    ((256, 3), dtype('uint8'))
    """
    import matplotlib

    from heatmaps.colors import lut  # the colours hipt heatmap's PNGs use too

    if name not in matplotlib.colormaps:
        raise ValueError(
            f"unknown colormap {name!r}; use a matplotlib colormap such as coolwarm, turbo, "
            "viridis, inferno or jet"
        )
    return lut(name, 256)


def colorize(values: np.ndarray, lut: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """RGBA uint8 of attention ``values`` in [0, 1]: ``lut`` colours, alpha 0 where NaN or below.

    A value v takes the LUT entry ``round(v * 255)``, so 0 is the map's first colour and 1 its
    last. Values outside [0, 1] are clipped.

    Examples
    --------
    >>> lut = colormap_lut("gray")
    >>> colorize(np.array([[0.0, 1.0, np.nan]]), lut)[0].tolist()
    [[0, 0, 0, 255], [255, 255, 255, 255], [0, 0, 0, 0]]
    """
    # One gather through a 257-entry RGBA table (entry 256: transparent) as 32-bit words.
    table = np.zeros((257, 4), dtype=np.uint8)
    table[:256, :3] = lut
    table[:256, 3] = 255
    with np.errstate(invalid="ignore"):
        index = np.round(np.clip(values, 0.0, 1.0) * 255)
        hidden = ~(values >= threshold)  # NaN compares False, so it is hidden too
    index[hidden] = 256
    words = table.view(np.uint32)[:, 0][index.astype(np.intp)]
    return words.view(np.uint8).reshape(*values.shape, 4)


# ------------------------------------------------------------------------------ cache
class TileCache:
    """A thread-safe LRU cache of encoded tiles bounded by their total size in bytes.

    It holds encoded tiles (a few kB each), never a slide's pixels, so memory stays bounded
    whatever the slide size.

    Examples
    --------
    >>> c = TileCache(max_bytes=10)
    >>> c.get_or_make("a", lambda: b"123456")
    b'123456'
    >>> _ = c.get_or_make("b", lambda: b"123456")  # pushes "a" out: 12 bytes > 10
    >>> "a" in c, "b" in c, c.bytes
    (False, True, 6)
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get_or_make(self, key: object, make: Callable[[], bytes]) -> bytes:
        """The cached bytes for ``key``, or ``make()``'s, stored for next time."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = make()  # outside the lock: tiles of other requests render in parallel
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = data
                self.bytes += len(data)
                while self.bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= len(old)
        return data
