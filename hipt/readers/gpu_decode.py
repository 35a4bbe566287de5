"""Optional device-side JPEG decode of a region's tiles with ``torchvision.io.decode_jpeg``.

On CUDA, torchvision batches the tiles through nvJPEG and the region is assembled on the GPU, so
the CPU only reads bytes. The same code runs on the CPU (torchvision's libjpeg-turbo), which is
how it is tested where there is no GPU. It is *not* used by default: whether nvJPEG beats the
CPU thread pool of :class:`~hipt.readers.tiff_jpeg.TiffJpegReader` for a given node has to be
measured first (``benchmarks/bench_reader.py --device cuda``).

TIFF tiles are not standalone JPEG files: an Aperio or generic TIFF may keep the quantisation and
Huffman tables once in ``JPEGTables``, and Aperio's RGB-encoded tiles carry no marker saying they
are RGB (OpenSlide takes that from the TIFF photometric tag). :func:`standalone_jpeg` rebuilds a
self-describing JPEG from the tile: the tables are spliced in after SOI, and RGB tiles get an
Adobe APP14 segment with ``transform = 0`` (no colour transform), which libjpeg honours.
"""

from __future__ import annotations

import warnings

import numpy as np

from hipt.readers.base import SlideReadError
from hipt.readers.tiff_jpeg import TiffJpegReader

__all__ = ["GpuTileDecoder", "standalone_jpeg"]

# APP14 "Adobe" segment: version 100, flags 0, 0, transform 0 (components are stored as RGB).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def standalone_jpeg(tile: bytes | memoryview, tables: bytes | None, colorspace: str) -> bytes:
    """A JPEG any decoder reads alone, from TIFF tile bytes plus the level's ``JPEGTables``.

    Parameters
    ----------
    tile
        The tile's bytes as stored (SOI ... EOI, possibly without tables).
    tables
        The ``JPEGTables`` tag (SOI, DQT/DHT segments, EOI), or ``None``.
    colorspace
        ``"YCBCR"`` or ``"RGB"``: the JPEG colour space the TIFF photometric tag states.

    Examples
    --------
    >>> standalone_jpeg(b"\\xff\\xd8<body>\\xff\\xd9", b"\\xff\\xd8<tables>\\xff\\xd9", "YCBCR")
    b'\\xff\\xd8<tables><body>\\xff\\xd9'
    """
    tile = bytes(tile)
    if tile[:2] != b"\xff\xd8":
        raise ValueError("tile does not start with a JPEG SOI marker")
    head = b"\xff\xd8"
    if colorspace == "RGB":
        head += _ADOBE_RGB
    if tables:
        # Drop the tables' own SOI and EOI; keep their DQT/DHT segments.
        head += tables[2:-2] if tables[-2:] == b"\xff\xd9" else tables[2:]
    return head + tile[2:]


class GpuTileDecoder:
    """Read regions of a :class:`TiffJpegReader`'s levels, decoding tiles on a torch device.

    Parameters
    ----------
    reader
        An open fast reader; this object reads its tile bytes and shares its read plan, so the
        pixel layout (edges, white outside, corner rules) is the reader's.
    device
        ``"cuda"`` (nvJPEG), ``"cuda:1"``, or ``"cpu"``.

    Examples
    --------
    >>> with TiffJpegReader("slide.svs") as r:  # doctest: +SKIP
    ...     region = GpuTileDecoder(r, "cuda").read_level(0, 0, 0, 4096, 4096)
    >>> region.shape, region.device.type  # doctest: +SKIP
    (torch.Size([3, 4096, 4096]), 'cuda')
    """

    def __init__(self, reader: TiffJpegReader, device: str = "cuda") -> None:
        import torch

        self.reader = reader
        self.device = torch.device(device)

    def read_level(self, level: int, x0: int, y0: int, width: int, height: int):
        """uint8 tensor ``[3, height, width]`` on the device; same pixels as ``reader.read_level``
        where the corner falls on a whole level pixel (always at level 0). A sub-pixel corner
        (level > 0 of an odd-sized pyramid) is snapped to the nearest level pixel here, not
        interpolated as the CPU readers do; outside the slide is white.

        Raises
        ------
        SlideReadError
            A tile cannot be read or decoded; names the slide, level and tile.
        """
        import torch

        r = self.reader
        r.check_read(level, width, height)
        out = torch.full((3, height, width), 255, dtype=torch.uint8, device=self.device)
        jobs = r.plan(level, x0, y0, width, height)
        tables, space = r.jpeg_info(level)
        raw = r.read_tiles(level, [j[0] for j in jobs])
        present, blobs = [], []
        for job in jobs:
            data = raw[job[0]]
            if data is None:  # missing tile stays white, as in OpenSlide
                continue
            present.append(job)
            blob = standalone_jpeg(data, tables, space)
            blobs.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        if not blobs:
            return out
        tiles = self._decode(level, [j[0] for j in present], blobs)
        tw, th = r.tile_grid(level)[:2]
        # On the CPU, torch's strided uint8 copies are far slower than numpy's; numpy views
        # share the tensors' memory.
        on_cpu = out.device.type == "cpu"
        canvas = out.numpy() if on_cpu else out
        for (index, src, dst), tile in zip(present, tiles, strict=True):
            if tuple(tile.shape) != (3, th, tw):
                raise SlideReadError(
                    r.tile_message(level, index, f"decoded shape {tuple(tile.shape)}")
                )
            piece = tile.numpy() if on_cpu else tile
            canvas[:, dst[0], dst[1]] = piece[:, src[0], src[1]]
        return out

    def _decode(self, level: int, indices: list[int], blobs: list) -> list:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still
            # work, and nvJPEG batch decode is the point here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass
            return self._decode_each(level, indices, blobs, decode_jpeg, ImageReadMode.RGB)

    def _decode_each(self, level, indices, blobs, decode_jpeg, mode) -> list:
        # The batch failed: decode one by one to name the bad tile.
        tiles = []
        for index, blob in zip(indices, blobs, strict=True):
            try:
                tiles.append(decode_jpeg(blob, mode=mode, device=self.device))
            except RuntimeError as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise SlideReadError(
                    self.reader.tile_message(level, index, f"JPEG decode failed: {msg}")
                ) from None
        return tiles

    def read_level_numpy(self, level: int, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """The same read as a host ``[height, width, 3]`` uint8 array (for comparisons)."""
        t = self.read_level(level, x0, y0, width, height)
        return t.permute(1, 2, 0).contiguous().cpu().numpy()
