"""Fast reader for JPEG-tiled TIFF slides (Aperio SVS and generic tiled TIFF).

OpenSlide decodes JPEG tiles with libjpeg-turbo too, but paints every tile through cairo, converts
to premultiplied ARGB and back, and serialises a region on one thread. This reader takes the raw
tile bytes straight from the file (offsets, byte counts and ``JPEGTables`` from the TIFF tags),
decodes them with libjpeg-turbo (imagecodecs) and copies the visible part of each tile into one
preallocated RGB buffer; the tiles of a region are decoded in parallel by a small thread pool
(libjpeg-turbo releases the GIL).

It only takes slides where it can promise OpenSlide's pixels. :meth:`TiffJpegReader.supports`
says yes when OpenSlide would open the file as ``aperio`` or ``generic-tiff`` *and* every pyramid
level is one OpenSlide itself decodes on its direct JPEG path: tiled, JPEG-compressed, 8-bit,
3 samples, contiguous planes, photometric RGB or YCbCr. Anything else (non-JPEG tiles, stripped
TIFFs, JPEG 2000 SVS, NDPI, MRXS, DICOM, Aperio levels with zero-length tiles that OpenSlide
repaints from the level above) stays with OpenSlide.

Pixel equality with OpenSlide (measured in ``tests/test_reader_fast.py``):

* Exact (0 grey levels) for every read whose top-left corner falls on a whole pixel of the level
  read, i.e. ``x0`` and ``y0`` are multiples of the level downsample (always true at level 0),
  including reads that cross the slide edge (white outside, as OpenSlide's transparent pixels
  composited on white) and partial edge tiles (their padding is cut off, as OpenSlide does).
  Both decoders are libjpeg-turbo with the same settings (islow DCT, fancy upsampling), and the
  JPEG colour space is taken from the TIFF photometric tag exactly as OpenSlide does (it
  overrides whatever the JPEG stream suggests): Aperio files with photometric RGB may hold
  RGB-encoded tiles with no Adobe APP14 marker, which a plain JPEG decoder would take for YCbCr.
* When ``x0 / downsample`` is fractional (level > 0 of a real scan, whose odd dimensions make
  every downsample fractional, so the tiler's region corners are never on a whole level pixel),
  OpenSlide shifts the level image by the sub-pixel fraction with bilinear interpolation; this
  reader does the same (one more pixel decoded each way, 8-bit bilinear weights).
  Measured on 6001 x 5999 px pyramids: 2.5 % of values differ by 1 grey level, 0.001 % by 2-3
  (cairo's 8-bit weights and its tile-by-tile painting), none by more. Snapping to the nearest
  level pixel instead (this reader until then) gave 19-43 grey levels at nucleus edges. The
  shift costs one more pass over the region (in strips, spread over the decode threads).
* Negative corners follow OpenSlide: the output is shifted by ``int(-x0 / downsample)`` pixels
  and the level is read from its first column.

Levels are chosen as OpenSlide chooses them: for Aperio every tiled IFD in file order (the
stripped thumbnail, label and macro are not levels, whatever their ``subfiletype``); for generic
TIFF the first IFD plus every tiled IFD whose ``subfiletype`` has the reduced-resolution bit,
sorted by width. The level list is cross-checked against OpenSlide's when the reader opens, and
``properties`` is OpenSlide's own property map (read once), so µm/px keys are identical.

Thread and process safety: each instance owns one file descriptor and reads with ``os.pread``
(a region's tiles in a few large reads), so there is no shared seek position and any number of
threads may read at once. After a
``fork`` the thread pool is recreated in the child; DataLoader workers should each open their
own reader (pickling a reader reopens the file by path).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hipt.readers.base import WHITE, SlideReadError, check_out

__all__ = ["TiffJpegReader", "UnsupportedSlideError", "decode_buffer", "default_threads"]

_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_FAST_VENDORS = ("aperio", "generic-tiff")
# Tiles closer than this in the file are fetched by one read (the bytes between are discarded).
_MERGE_GAP = 1 << 20
_MAX_SPAN = 64 << 20
# A sub-pixel fraction this close to a whole pixel is taken as whole (see _origin).
_WHOLE_PX = 1.0 / 512
# Rows per strip of the sub-pixel shift (float32 strips of a 4096 px row stay in cache).
_SHIFT_ROWS = 32


class UnsupportedSlideError(SlideReadError):
    """The fast path does not handle this file; use OpenSlide instead."""


def default_threads() -> int:
    """Decode threads per reader.

    ``HIPT_READER_THREADS`` if set; 1 inside a PyTorch DataLoader worker (the workers already
    use the cores, and threads on top would oversubscribe them); otherwise the CPUs this
    process may use, at most 4 (more gain little for one 4096 px region).
    """
    env = os.environ.get("HIPT_READER_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"HIPT_READER_THREADS must be an integer, not {env!r}") from None
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None:
        data = getattr(getattr(torch, "utils", None), "data", None)
        if data is not None and data.get_worker_info() is not None:
            return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


@dataclass(frozen=True)
class _Level:
    """Where the JPEG tiles of one pyramid level lie in the file."""

    page: int  # index of the top-level IFD
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    tiles_down: int
    offsets: np.ndarray  # int64 [tiles_down * tiles_across], row-major
    bytecounts: np.ndarray  # int64, same order; 0 = missing tile
    jpeg_tables: bytes | None
    colorspace: str  # JPEG colour space from the photometric tag: "YCBCR" or "RGB"


def _level_from_page(page, index: int) -> _Level:
    """Describe one tiled TIFF page, or raise UnsupportedSlideError saying why it is not JPEG RGB."""
    if not page.is_tiled:
        raise UnsupportedSlideError(f"IFD {index} is not tiled")
    if page.compression != _JPEG:
        raise UnsupportedSlideError(
            f"IFD {index} tiles are not JPEG (TIFF compression {int(page.compression)})"
        )
    if int(page.planarconfig) != 1:
        raise UnsupportedSlideError(f"IFD {index} has separate colour planes")
    if int(page.photometric) not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        raise UnsupportedSlideError(
            f"IFD {index} photometric {int(page.photometric)} is neither RGB nor YCbCr"
        )
    if page.bitspersample != 8 or page.samplesperpixel != 3:
        raise UnsupportedSlideError(
            f"IFD {index} has {page.samplesperpixel} samples of {page.bitspersample} bits, not 3x8"
        )
    if page.imagedepth != 1:
        raise UnsupportedSlideError(f"IFD {index} has ImageDepth {page.imagedepth}")
    tw, th = int(page.tilewidth), int(page.tilelength)
    w, h = int(page.imagewidth), int(page.imagelength)
    across, down = -(-w // tw), -(-h // th)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size != across * down or counts.size != across * down:
        raise UnsupportedSlideError(
            f"IFD {index} lists {offsets.size} tiles, expected {across}x{down}"
        )
    tables = page.jpegtables
    return _Level(
        page=index,
        width=w,
        height=h,
        tile_width=tw,
        tile_height=th,
        tiles_across=across,
        tiles_down=down,
        offsets=offsets,
        bytecounts=counts,
        jpeg_tables=bytes(tables) if tables else None,
        colorspace="RGB" if int(page.photometric) == _PHOTOMETRIC_RGB else "YCBCR",
    )


def _scan(path: Path) -> tuple[str, list[_Level]]:
    """The OpenSlide vendor and the pyramid levels OpenSlide would see, finest first.

    Raises UnsupportedSlideError when any level is not one this reader decodes like OpenSlide.
    """
    import openslide
    import tifffile

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here just means "not ours"
        raise UnsupportedSlideError(f"OpenSlide cannot detect the format ({exc})") from exc
    if vendor not in _FAST_VENDORS:
        raise UnsupportedSlideError(f"format {vendor or 'unknown'!r} is not Aperio or generic TIFF")
    try:
        with tifffile.TiffFile(path) as tif:
            levels: list[_Level] = []
            for index, page in enumerate(tif.pages):
                if vendor == "aperio":
                    # OpenSlide's Aperio driver: every tiled IFD is a level, in file order; the
                    # stripped ones are the thumbnail, label and macro.
                    if not page.is_tiled:
                        continue
                    level = _level_from_page(page, index)
                    if (level.bytecounts == 0).any():
                        # OpenSlide repaints missing Aperio tiles from the finer level.
                        raise UnsupportedSlideError(f"IFD {index} has zero-length tiles")
                else:
                    # generic-tiff: tiled IFDs that are the first image or reduced-resolution.
                    if not page.is_tiled:
                        continue
                    if index != 0 and not (int(page.subfiletype) & 1):
                        continue
                    level = _level_from_page(page, index)
                levels.append(level)
    except UnsupportedSlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile's many error types
        raise UnsupportedSlideError(f"tifffile cannot parse it ({exc})") from exc
    if not levels:
        raise UnsupportedSlideError("no tiled levels")
    if vendor == "generic-tiff":
        widths = [lv.width for lv in levels]
        if len(set(widths)) != len(widths):
            raise UnsupportedSlideError("two levels have the same width")
        levels.sort(key=lambda lv: -lv.width)
    return vendor, levels


class TiffJpegReader:
    """Read levels of a JPEG-tiled Aperio SVS or generic tiled TIFF by decoding tiles directly.

    Implements :class:`hipt.readers.base.LevelReader` with ``name == "fast"``. Pixels equal
    OpenSlide's ``read_region`` composited on the fill colour, exactly on whole level pixels and
    within 3 grey levels on sub-pixel corners (see the module docstring).

    Parameters
    ----------
    path
        The slide file.
    threads
        Tiles of one region decoded in parallel; ``None`` means :func:`default_threads`,
        ``1`` decodes on the calling thread.

    Raises
    ------
    UnsupportedSlideError
        The file is not a JPEG-tiled Aperio or generic TIFF (check :meth:`supports` first, or
        let :func:`hipt.readers.open_reader` choose).
    SlideReadError
        The file cannot be opened.

    Examples
    --------
    >>> if TiffJpegReader.supports("slide.svs"):  # doctest: +SKIP
    ...     with TiffJpegReader("slide.svs") as r:
    ...         rgb = r.read_level(0, 1024, 2048, 4096, 4096)  # uint8 [4096, 4096, 3]
    """

    name = "fast"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self._threads_arg = None if threads is None else max(1, int(threads))
        self._threads_pid = -1
        self._threads_n = 1
        self._fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        self._scratch = threading.local()
        try:
            self.vendor, self._levels = _scan(self.path)
        except UnsupportedSlideError as exc:
            raise UnsupportedSlideError(f"{self.path}: fast reader cannot read it: {exc}") from None
        self.properties = self._openslide_properties()
        self.level_count = len(self._levels)
        self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        w0, h0 = self.level_dimensions[0]
        # OpenSlide's formula for levels without a stated downsample (both of these formats).
        self.level_downsamples = tuple(
            1.0 if i == 0 else (h0 / lv.height + w0 / lv.width) / 2.0
            for i, lv in enumerate(self._levels)
        )
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise SlideReadError(f"{self.path}: cannot open: {exc.strerror}") from None

    # -- discovery -------------------------------------------------------------------------

    @staticmethod
    def unsupported_reason(path: str | os.PathLike) -> str | None:
        """Why the fast path cannot read ``path``, or ``None`` when it can."""
        try:
            _scan(Path(path))
        except UnsupportedSlideError as exc:
            return str(exc)
        return None

    @staticmethod
    def supports(path: str | os.PathLike) -> bool:
        """Whether ``path`` is an Aperio or generic TIFF whose every level is JPEG-tiled RGB.

        Examples
        --------
        >>> TiffJpegReader.supports("slide.mrxs")  # doctest: +SKIP
        False
        """
        return TiffJpegReader.unsupported_reason(path) is None

    def _openslide_properties(self) -> dict[str, str]:
        """OpenSlide's property map (µm/px, objective, vendor), read once; levels cross-checked."""
        import openslide

        try:
            with openslide.OpenSlide(str(self.path)) as osr:
                props = dict(osr.properties)
                dims = tuple(tuple(int(v) for v in d) for d in osr.level_dimensions)
        except Exception as exc:  # noqa: BLE001 - OpenSlideError, OSError, ...
            raise SlideReadError(f"{self.path}: cannot read slide properties: {exc}") from None
        mine = tuple((lv.width, lv.height) for lv in self._levels)
        if dims != mine:
            # A layout this reader misjudged: better to hand the slide to OpenSlide than differ.
            raise UnsupportedSlideError(
                f"{self.path}: fast reader sees levels {mine}, OpenSlide sees {dims}"
            )
        return props

    # -- reading ---------------------------------------------------------------------------

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
        """See :meth:`hipt.readers.base.LevelReader.read_level`.

        A corner on a whole level pixel is decoded straight into ``out`` (a reused buffer saves
        the page faults of a fresh 4096 px region, about a third of its decode time). Otherwise
        one more pixel each way is decoded and shifted by the sub-pixel fraction with bilinear
        weights, as OpenSlide does (see the module docstring for how close that comes).
        """
        self.check_read(level, width, height)
        check_out(out, width, height)
        if out is None:
            out = np.empty((height, width, 3), dtype=np.uint8)
        ds = self.level_downsamples[level]
        (ox, lx, fx), (oy, ly, fy) = _origin(int(x0), ds), _origin(int(y0), ds)
        if fx == 0.0 and fy == 0.0:
            self._paint(level, ox, oy, lx, ly, out, int(fill))
            return out
        window = np.empty((height + 1, width + 1, 3), dtype=np.uint8)
        self._paint(level, ox, oy, lx, ly, window, int(fill))
        self._shift(window, fx, fy, out)
        return out

    def _paint(
        self, level: int, ox: int, oy: int, lx: int, ly: int, out: np.ndarray, fill: int
    ) -> None:
        """Fill ``out`` with ``level`` from level pixel ``(lx, ly)`` placed at output ``(ox, oy)``."""
        height, width = out.shape[:2]
        jobs = self._plan_px(level, ox, oy, lx, ly, width, height)
        if not jobs:
            out[...] = fill
            return
        # Only the margin outside the slide is painted: filling a whole 4096 region first would
        # cost about a sixth of its decode time.
        r0 = min(j[2][0].start for j in jobs)
        r1 = max(j[2][0].stop for j in jobs)
        c0 = min(j[2][1].start for j in jobs)
        c1 = max(j[2][1].stop for j in jobs)
        out[:r0] = fill
        out[r1:] = fill
        out[r0:r1, :c0] = fill
        out[r0:r1, c1:] = fill

        # All the bytes first, in a few large reads: one pread per tile costs more than the
        # read itself (each system call also slows the decode that follows it).
        blobs = self.read_tiles(level, [j[0] for j in jobs])

        def run(some: list) -> None:
            # Each thread decodes into its own reused tile buffer, placed so libjpeg-turbo keeps
            # the tile in cache for the copy below (see decode_buffer); a new array per tile
            # gets whatever alignment the allocator hands out.
            scratch = self._tile_buffer(level)
            for index, src, dst in some:
                data = blobs[index]
                tile = None if data is None else self._decode(level, index, data, out=scratch)
                # Disjoint windows: no lock needed. A missing tile is outside, as in OpenSlide.
                out[dst] = fill if tile is None else tile[src]

        self._in_threads(run, jobs)

    def _in_threads(self, run, items: list) -> None:
        """``run(share)`` over interleaved shares of ``items``, one per decode thread."""
        n = min(self.threads, len(items))
        if n <= 1:
            run(items)
        else:
            # Interleaved shares (glass and tissue tiles decode at different speeds); list()
            # re-raises the first worker exception on the calling thread.
            list(self._executor().map(run, [items[i::n] for i in range(n)]))

    def _shift(self, window: np.ndarray, fx: float, fy: float, out: np.ndarray) -> None:
        """``out`` = ``window`` shifted by ``(fx, fy)`` of a pixel with bilinear weights.

        8-bit weights (as cairo's are), across then down, each pass rounded to nearest, in
        uint16 strips of ``_SHIFT_ROWS`` rows spread over the decode threads (numpy releases
        the GIL). Each thread computes in its own reused buffers: fresh temporaries of this size
        come from mmap and page-fault on every strip. Measured: 0.07 s per 2048² px on one
        core, against 0.19 s for the float32 form with temporaries; within 1 grey level of
        exact bilinear.
        """
        height, width = out.shape[:2]
        ax, ay = int(round(fx * 256)), int(round(fy * 256))

        def run(starts: list[int]) -> None:
            src = np.empty((_SHIFT_ROWS + 1, width + 1, 3), np.uint16)
            rows = np.empty((_SHIFT_ROWS + 1, width, 3), np.uint16)
            tmp = np.empty((_SHIFT_ROWS + 1, width, 3), np.uint16)
            for r0 in starts:
                n = min(height, r0 + _SHIFT_ROWS) - r0
                s, h, t = src[: n + 1], rows[: n + 1], tmp[: n + 1]
                np.copyto(s, window[r0 : r0 + n + 1])
                np.multiply(s[:, :-1], 256 - ax, out=h)  # at most 255 * 256: fits uint16
                np.multiply(s[:, 1:], ax, out=t)
                h += t
                h += 128
                h >>= 8
                down, below = t[:n], s[:n, :-1]  # reuse the buffers for the vertical pass
                np.multiply(h[:-1], 256 - ay, out=down)
                np.multiply(h[1:], ay, out=below)
                down += below
                down += 128
                down >>= 8
                np.copyto(out[r0 : r0 + n], down, casting="unsafe")

        self._in_threads(run, list(range(0, height, _SHIFT_ROWS)))

    def check_read(self, level: int, width: int, height: int) -> None:
        """Raise SlideReadError unless the reader is open, ``level`` exists and the size is >= 0."""
        if self._fd is None:
            raise SlideReadError(f"{self.path}: reader is closed")
        if not 0 <= level < self.level_count:
            raise SlideReadError(
                f"{self.path}: level {level} out of range (slide has {self.level_count})"
            )
        if width < 0 or height < 0:
            raise SlideReadError(f"{self.path}: negative size {width}x{height}")

    def plan(
        self, level: int, x0: int, y0: int, width: int, height: int
    ) -> list[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
        """The tiles a read needs: ``(tile index, slices in the tile, slices in the output)``.

        Slices are ``(rows, columns)``; the output is ``[height, width]`` of ``level`` with its
        top-left at level-0 ``(x0, y0)``, snapped to the nearest whole level pixel (no
        sub-pixel shift). Other decoders (:mod:`hipt.readers.gpu_decode`) share this plan.
        """
        ds = self.level_downsamples[level]
        ox, lx = _start(int(x0), ds)
        oy, ly = _start(int(y0), ds)
        return self._plan_px(level, ox, oy, lx, ly, width, height)

    def _plan_px(
        self, level: int, ox: int, oy: int, lx: int, ly: int, width: int, height: int
    ) -> list[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
        """:meth:`plan` for level pixel ``(lx, ly)`` placed at output pixel ``(ox, oy)``."""
        lv = self._levels[level]
        # The visible window in level pixels: [cx0, cx1) x [cy0, cy1).
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + width - ox, lv.width), min(ly + height - oy, lv.height)
        if cx1 <= cx0 or cy1 <= cy0:
            return []
        jobs = []
        tw, th = lv.tile_width, lv.tile_height
        for row in range(cy0 // th, (cy1 - 1) // th + 1):
            ty0 = row * th
            ys, ye = max(cy0, ty0), min(cy1, ty0 + th)
            for col in range(cx0 // tw, (cx1 - 1) // tw + 1):
                tx0 = col * tw
                xs, xe = max(cx0, tx0), min(cx1, tx0 + tw)
                jobs.append(
                    (
                        row * lv.tiles_across + col,
                        (slice(ys - ty0, ye - ty0), slice(xs - tx0, xe - tx0)),
                        (slice(ys - ly + oy, ye - ly + oy), slice(xs - lx + ox, xe - lx + ox)),
                    )
                )
        return jobs

    def read_tile_bytes(self, level: int, index: int) -> bytes | None:
        """Raw JPEG bytes of tile ``index`` (row-major) of ``level``; ``None`` for a missing tile."""
        lv = self._levels[level]
        count = int(lv.bytecounts[index])
        if count == 0:
            return None
        offset = int(lv.offsets[index])
        try:
            data = os.pread(self._fd, count, offset)
        except OSError as exc:
            raise SlideReadError(self.tile_message(level, index, exc.strerror)) from None
        if len(data) != count:
            raise SlideReadError(
                self.tile_message(level, index, f"file ends early ({len(data)}/{count} bytes)")
            )
        return data

    def read_tiles(self, level: int, indices: list[int]) -> dict[int, memoryview | None]:
        """Raw bytes of several tiles of ``level``, read in as few ``pread`` calls as possible.

        Tiles lying close together in the file (gaps up to ``_MERGE_GAP`` bytes, as the rows
        of a region usually are) come from one read. Missing tiles map to ``None``.
        """
        lv = self._levels[level]
        out: dict[int, memoryview | None] = {}
        present = []
        for i in set(indices):
            if lv.bytecounts[i] == 0:
                out[i] = None
            else:
                present.append((int(lv.offsets[i]), int(lv.bytecounts[i]), i))
        present.sort()
        k = 0
        while k < len(present):
            start, end, j = present[k][0], present[k][0] + present[k][1], k + 1
            while j < len(present):
                off, count, _ = present[j]
                if off - end > _MERGE_GAP or max(end, off + count) - start > _MAX_SPAN:
                    break
                end = max(end, off + count)
                j += 1
            try:
                data = os.pread(self._fd, end - start, start)
            except OSError as exc:
                raise SlideReadError(
                    self.tile_message(level, present[k][2], exc.strerror)
                ) from None
            view = memoryview(data)
            for off, count, i in present[k:j]:
                if off + count - start > len(data):
                    got = max(0, len(data) - (off - start))
                    raise SlideReadError(
                        self.tile_message(level, i, f"file ends early ({got}/{count} bytes)")
                    )
                out[i] = view[off - start : off - start + count]
            k = j
        return out

    def decode_tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded RGB tile ``[tile_height, tile_width, 3]`` (padding included), or ``None``."""
        data = self.read_tile_bytes(level, index)
        return None if data is None else self._decode(level, index, data)

    def _tile_buffer(self, level: int) -> np.ndarray:
        """This thread's reusable ``[tile_height, tile_width, 3]`` decode buffer for ``level``."""
        lv = self._levels[level]
        shape = (lv.tile_height, lv.tile_width, 3)
        buffers = getattr(self._scratch, "buffers", None)
        if buffers is None:
            buffers = self._scratch.buffers = {}
        buf = buffers.get(shape)
        if buf is None:
            buf = buffers[shape] = decode_buffer(shape)
        return buf

    def _decode(self, level: int, index: int, data, out: np.ndarray | None = None) -> np.ndarray:
        """Decode one tile (into ``out`` when given, a tile-shaped uint8 buffer)."""
        import imagecodecs

        lv = self._levels[level]
        if out is not None:
            try:
                return imagecodecs.jpeg8_decode(
                    data,
                    tables=lv.jpeg_tables,
                    colorspace=lv.colorspace,
                    outcolorspace="RGB",
                    out=out,
                )
            except Exception:  # noqa: BLE001 - decode again below for the precise error
                pass
        try:
            tile = imagecodecs.jpeg8_decode(
                data, tables=lv.jpeg_tables, colorspace=lv.colorspace, outcolorspace="RGB"
            )
        except Exception as exc:  # noqa: BLE001 - Jpeg8Error and friends
            raise SlideReadError(
                self.tile_message(level, index, f"JPEG decode failed: {exc}")
            ) from None
        if tile.shape != (lv.tile_height, lv.tile_width, 3):
            raise SlideReadError(
                self.tile_message(
                    level,
                    index,
                    f"decoded shape {tile.shape} is not {lv.tile_height}x{lv.tile_width}x3",
                )
            )
        return tile

    def tile_grid(self, level: int) -> tuple[int, int, int, int]:
        """``(tile_width, tile_height, tiles_across, tiles_down)`` of ``level``."""
        lv = self._levels[level]
        return lv.tile_width, lv.tile_height, lv.tiles_across, lv.tiles_down

    def jpeg_info(self, level: int) -> tuple[bytes | None, str]:
        """``(JPEGTables or None, JPEG colour space "YCBCR"/"RGB")`` of ``level``."""
        lv = self._levels[level]
        return lv.jpeg_tables, lv.colorspace

    def tile_message(self, level: int, index: int, problem: str) -> str:
        """One-line error text naming the slide, the level and the tile (index, column, row)."""
        lv = self._levels[level]
        col, row = index % lv.tiles_across, index // lv.tiles_across
        return (
            f"{self.path}: corrupt tile at level {level}, tile {index} "
            f"(column {col}, row {row}): {problem}"
        )

    @property
    def threads(self) -> int:
        """Decode threads in this process (a default is worked out again after a fork)."""
        if self._threads_arg is not None:
            return self._threads_arg
        pid = os.getpid()
        if self._threads_pid != pid:
            self._threads_n, self._threads_pid = default_threads(), pid
        return self._threads_n

    def _executor(self) -> ThreadPoolExecutor:
        # A pool inherited through fork has no threads behind it: make a fresh one per process.
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:
            with self._pool_lock:
                if self._pool is None or self._pool_pid != pid:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self.threads, thread_name_prefix="hipt-jpeg"
                    )
                    self._pool_pid = pid
        return self._pool

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file descriptor and the decode threads; safe to call twice."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TiffJpegReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __reduce__(self):
        # Each process gets its own descriptor and pool.
        return (type(self), (str(self.path), self._threads_arg))

    def __repr__(self) -> str:
        return (
            f"TiffJpegReader({str(self.path)!r}, levels={self.level_count}, vendor={self.vendor!r})"
        )


def decode_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous uint8 array of ``shape`` for libjpeg-turbo to decode into, fast.

    libjpeg-turbo's SIMD colour conversion writes output rows that start on a 32-byte boundary
    with non-temporal stores, which bypass the CPU cache; a tile that is copied on right away
    must then come back from memory. Measured on the benchmark machine, decoding into a buffer
    16 bytes off that boundary ran 2.3x faster (about 820 against 350 megapixels/s per core),
    and numpy may hand out either alignment. So the buffer starts 16 bytes past a 32-byte
    boundary (every row does too when a row is a multiple of 32 bytes, as for 256 or 512 px
    RGB tiles).
    """
    n = math.prod(shape)
    raw = np.empty(n + 64, dtype=np.uint8)
    start = (16 - raw.ctypes.data) % 32
    return raw[start : start + n].reshape(shape)


def _origin(coord: int, downsample: float) -> tuple[int, int, float]:
    """(output offset, first level pixel, sub-pixel fraction) of a read from level-0 ``coord``.

    OpenSlide's rule: a negative corner shifts the output by ``int(-coord / downsample)`` and
    starts at level pixel 0; otherwise the read starts at level coordinate
    ``coord / downsample``, whose fraction is interpolated. A fraction within ``1/512`` of a
    whole pixel moves no value by half a grey level and counts as whole.
    """
    if coord < 0:
        return int(-coord / downsample), 0, 0.0
    pos = coord / downsample
    first = math.floor(pos)
    frac = pos - first
    if frac < _WHOLE_PX:
        return 0, first, 0.0
    if frac > 1.0 - _WHOLE_PX:
        return 0, first + 1, 0.0
    return 0, first, frac


def _start(coord: int, downsample: float) -> tuple[int, int]:
    """(output offset, first level pixel) of a read starting at level-0 ``coord``.

    Negative corners follow OpenSlide: shift the output by ``int(-coord / downsample)`` and start
    at level pixel 0. Positive ones snap ``coord / downsample`` to the nearest level pixel.
    """
    if coord < 0:
        return int(-coord / downsample), 0
    return 0, int(math.floor(coord / downsample + 0.5))
