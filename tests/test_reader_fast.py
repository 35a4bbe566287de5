"""The fast JPEG-tile reader returns OpenSlide's pixels, falls back where it must, fails clearly.

Every slide here is a real TIFF written with tifffile and read by real OpenSlide. Besides the
project's generated slides, this file writes a few layouts the generators do not make: an
Aperio-style SVS whose RGB JPEG tiles share ``JPEGTables`` and carry no Adobe marker (so only the
TIFF photometric tag says they are RGB), a generic TIFF with a missing (zero-length) tile and a
tiled IFD that is not a pyramid level, and non-JPEG / stripped / non-TIFF files.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from hipt import synthetic
from hipt.readers import SlideReadError, open_reader
from hipt.readers.tiff_jpeg import TiffJpegReader, UnsupportedSlideError

# Measured: the fast path equals OpenSlide exactly on every level-pixel-aligned read.
MAX_GREY_LEVEL_DIFF = 0


# ------------------------------------------------------------------------ slide writers
def _texture(width: int, height: int, seed: int) -> np.ndarray:
    """Gradients, stripes and noise: every tile differs, and chroma varies inside tiles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.int16)
    img[..., 0] = xx * 255 // max(width - 1, 1)
    img[..., 1] = yy * 255 // max(height - 1, 1)
    img[..., 2] = ((xx // 23 + yy // 41) % 3) * 100
    img += rng.integers(-25, 25, size=img.shape, dtype=np.int16)
    return img.clip(0, 255).astype(np.uint8)


def _pyramid(img: np.ndarray, downsamples: list[int]) -> list[np.ndarray]:
    return [img[::d, ::d] for d in downsamples]


def _tiles(img: np.ndarray, tile: int) -> list[np.ndarray]:
    """Row-major full tiles, edge tiles padded with black (OpenSlide must crop the padding)."""
    h, w = img.shape[:2]
    out = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.zeros((tile, tile, 3), np.uint8)
            part = img[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            out.append(t)
    return out


def _segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """(marker, whole segment) up to and including SOS + entropy data + EOI as the last item."""
    assert jpeg[:2] == b"\xff\xd8"
    out, i = [], 2
    while True:
        marker = jpeg[i + 1]
        length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == 0xDA:
            out.append((marker, jpeg[i:]))
            return out
        out.append((marker, jpeg[i : i + 2 + length]))
        i += 2 + length


def _aperio_rgb_tile(tile: np.ndarray) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream) of an RGB-encoded JPEG written like Aperio's encoder.

    No APP0/APP14 marker and component ids 1, 2, 3, so a plain JPEG decoder would take it for
    YCbCr; only the TIFF photometric tag (RGB) tells OpenSlide otherwise.
    """
    full = imagecodecs.jpeg8_encode(tile, level=80, colorspace="RGB", outcolorspace="RGB")
    tables, body = b"\xff\xd8", b"\xff\xd8"
    for marker, seg in _segments(full):
        if marker in (0xDB, 0xC4):
            tables += seg
        elif 0xE0 <= marker <= 0xEF:
            continue
        elif marker == 0xC0:
            seg = bytearray(seg)
            for k in range(3):  # component specs start at byte 10, 3 bytes each
                seg[10 + 3 * k] = k + 1
            body += bytes(seg)
        elif marker == 0xDA:
            seg = bytearray(seg)
            for k in range(3):  # after FFDA, length (2), count (1): 2 bytes per component
                seg[5 + 2 * k] = k + 1
            body += bytes(seg)
        else:
            body += seg
    return tables + b"\xff\xd9", body


def write_aperio_rgb_svs(path: Path, width: int, height: int, tile: int, mpp: float) -> Path:
    """Aperio SVS with RGB JPEG tiles sharing JPEGTables; levels 1, 4 (+ thumbnail, label)."""
    img = _texture(width, height, seed=3)
    desc0 = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q=80|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
    )
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(_pyramid(img, [1, 4])):
            pairs = [_aperio_rgb_tile(t) for t in _tiles(level, tile)]
            tables = pairs[0][0]
            assert all(p[0] == tables for p in pairs), "tiles must share one set of tables"
            tw.write(
                iter([p[1] for p in pairs]),
                shape=level.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subsampling=(1, 1),
                compressionargs={"outcolorspace": "RGB"},
                jpegtables=tables,
                description=desc0 if i == 0 else "Aperio Image Library v12.0.15 \r\nlevel",
                metadata=None,
            )
            if i == 0:
                tw.write(img[::16, ::16], photometric="rgb", description="thumb", metadata=None)
        tw.write(
            np.full((64, 64, 3), 200, np.uint8),
            photometric="rgb",
            subfiletype=1,
            description="Aperio Image Library v12.0.15 \r\nlabel 64x64",
            metadata=None,
        )
    return path


def write_svs(path: Path, width: int, height: int, tile: int, mpp: float) -> Path:
    """Aperio SVS as tifffile writes JPEG (YCbCr 4:2:0, self-contained tiles)."""
    img = _texture(width, height, seed=1)
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q=85|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
    )
    kw = dict(compression="jpeg", photometric="rgb", description=desc, metadata=None)
    with tifffile.TiffWriter(path) as tw:
        levels = _pyramid(img, [1, 4, 16])
        tw.write(levels[0], tile=(tile, tile), **kw)
        tw.write(img[::32, ::32], **kw)  # stripped thumbnail
        for level in levels[1:]:
            tw.write(level, tile=(tile, tile), **kw)
    return path


def write_generic(
    path: Path,
    width: int,
    height: int,
    tile: int,
    mpp: float,
    *,
    compression: str = "jpeg",
    missing_tile: int | None = None,
    extra_tiled_page: bool = False,
    bigtiff: bool = False,
) -> Path:
    """Generic tiled TIFF: level 0 (subfiletype 0) then 2x reductions (subfiletype 1).

    ``missing_tile`` writes that level-0 tile with zero bytes; ``extra_tiled_page`` adds a tiled
    IFD with subfiletype 0 after level 0, which OpenSlide must not take for a level.
    """
    img = _texture(width, height, seed=2)
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, level in enumerate(_pyramid(img, [1, 2, 4])):
            kw = dict(
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                resolution=(px_per_cm / 2**i, px_per_cm / 2**i),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            if i == 0 and missing_tile is not None:
                data = [imagecodecs.jpeg8_encode(t, level=85) for t in _tiles(level, tile)]
                data[missing_tile] = b""
                tw.write(iter(data), shape=level.shape, dtype=np.uint8, **kw)
            else:
                tw.write(level, **kw)
            if i == 0 and extra_tiled_page:
                other = _texture(300, 200, seed=9)
                tw.write(other, tile=(16 * 4, 16 * 4), compression="jpeg", metadata=None)
    return path


def write_stripped(path: Path) -> Path:
    tifffile.imwrite(path, _texture(600, 400, 4), compression="jpeg", photometric="rgb")
    return path


# ------------------------------------------------------------------------ OpenSlide reference
def openslide_rgb(path: Path, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's read_region composited on white, the convention every hipt reader follows."""
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region((x0, y0), level, (w, h))).astype(np.uint16)
    a = rgba[..., 3:]
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fast_reader")
    return {
        # 0.25 µm/px SVS, 256 tiles, sizes that leave partial tiles at every level.
        "svs256": write_svs(d / "svs256.svs", 2300, 1700, 256, 0.25),
        # 0.5 µm/px SVS, 512 tiles, Aperio-style RGB JPEG with shared tables.
        "svs512rgb": write_aperio_rgb_svs(d / "svs512rgb.svs", 1800, 1400, 512, 0.5),
        # Generic TIFF, 512 tiles, 0.5 µm/px, with a tiled non-level IFD in the middle.
        "tif512": write_generic(d / "tif512.tiff", 2100, 1500, 512, 0.5, extra_tiled_page=True),
        # Generic TIFF, 256 tiles, 0.25 µm/px, one missing tile.
        "tif256": write_generic(d / "tif256.tiff", 1200, 1000, 256, 0.25, missing_tile=5),
        # BigTIFF (64-bit offsets), as large scans are written.
        "big512": write_generic(d / "big512.tiff", 1100, 900, 512, 0.25, bigtiff=True),
        # The project's generated slides (tissue model, as the pipeline tests use them).
        "synth_svs": synthetic.write_svs(d / "synth.svs", 2560, 2304, mpp=0.25, seed=4).path,
        "synth_tif": synthetic.write_generic_tiff(
            d / "synth.tiff", 2200, 1800, mpp=0.5, tile_px=512, seed=5
        ).path,
        "synth_tif256": synthetic.write_generic_tiff(
            d / "synth256.tiff", 1300, 1100, mpp=0.25, tile_px=256, seed=6
        ).path,
    }


def _windows(dims: list[tuple[int, int]], ds: list[float], tile: int) -> list[tuple]:
    """Reads per level: whole level, interior crossing tile seams, slide edges, outside."""
    out = []
    for level, ((w, h), d) in enumerate(zip(dims, ds, strict=True)):
        step = int(round(d)) if float(d).is_integer() else 0
        out.append((level, 0, 0, w, h))  # whole level, partial edge tiles included
        out.append((level, -37 * max(step, 1), -5 * max(step, 1), 300, 260))  # top-left outside
        if step:
            # Interior read crossing tile seams, and one hanging off the bottom-right edge.
            out.append((level, (tile // 2 + 3) * step, (tile - 7) * step, tile + 50, tile + 9))
            out.append((level, (w - 100) * step, (h - 60) * step, 400, 300))
            out.append((level, (w + 5) * step, 0, 40, 40))  # entirely outside
    return out


ALL_SLIDES = [
    "svs256",
    "svs512rgb",
    "tif512",
    "tif256",
    "big512",
    "synth_svs",
    "synth_tif",
    "synth_tif256",
]


@pytest.mark.parametrize("key", ALL_SLIDES)
def test_same_pixels_as_openslide(slides, key):
    path = slides[key]
    assert TiffJpegReader.supports(path), TiffJpegReader.unsupported_reason(path)
    with openslide.OpenSlide(str(path)) as osr:
        dims = [tuple(map(int, d)) for d in osr.level_dimensions]
        ds = [float(d) for d in osr.level_downsamples]
        props = dict(osr.properties)
    with TiffJpegReader(path, threads=2) as r:
        assert r.name == "fast"
        assert list(r.level_dimensions) == dims
        assert list(r.level_downsamples) == pytest.approx(ds, rel=1e-12)
        assert r.properties["openslide.mpp-x"] == props["openslide.mpp-x"]
        tile = r.tile_grid(0)[0]
        windows = _windows(dims, ds, tile)
        assert len(windows) >= 2 * len(dims)
        for win in windows:
            got = r.read_level(*win)
            want = openslide_rgb(path, *win)
            assert got.shape == want.shape == (win[4], win[3], 3)
            diff = int(np.abs(got.astype(np.int16) - want).max())
            assert diff <= MAX_GREY_LEVEL_DIFF, f"{key} {win}: max diff {diff}"


def test_mpp_and_layouts_are_what_was_written(slides):
    with TiffJpegReader(slides["svs256"]) as r:
        assert r.vendor == "aperio"
        assert float(r.properties["openslide.mpp-x"]) == 0.25
        assert r.level_count == 3  # the stripped thumbnail is not a level
        assert r.tile_grid(0) == (256, 256, 9, 7)
    with TiffJpegReader(slides["svs512rgb"]) as r:
        assert float(r.properties["openslide.mpp-x"]) == 0.5
        tables, space = r.jpeg_info(0)
        assert tables is not None and space == "RGB"
        assert r.tile_grid(0)[:2] == (512, 512)
    with TiffJpegReader(slides["tif512"]) as r:
        assert r.vendor == "generic-tiff"
        # The tiled subfiletype-0 IFD written after level 0 is not a level.
        assert r.level_dimensions == ((2100, 1500), (1050, 750), (525, 375))
        assert float(r.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_rgb_jpeg_needs_the_photometric_tag(slides):
    """Decoding the Aperio-style tiles as a plain JPEG (YCbCr guess) would give wrong colours."""
    with TiffJpegReader(slides["svs512rgb"]) as r:
        data = r.read_tile_bytes(0, 0)
        tables, _ = r.jpeg_info(0)
        right = r.decode_tile(0, 0)
    guessed = imagecodecs.jpeg8_decode(data, tables=tables)
    assert np.abs(guessed.astype(np.int16) - right).max() > 50
    want = openslide_rgb(slides["svs512rgb"], 0, 0, 0, 512, 512)
    assert np.array_equal(right, want)


def test_missing_tile_is_white_like_openslide(slides):
    path = slides["tif256"]
    # Tile 5 of the 5-across grid is the first tile of row 1.
    with TiffJpegReader(path) as r:
        got = r.read_level(0, 0, 256, 256, 256)
    assert (got == 255).all()
    assert np.array_equal(got, openslide_rgb(path, 0, 0, 256, 256, 256))


def test_batched_tile_reads(slides, monkeypatch):
    """A region's tiles come from a few large reads, byte for byte the same as one by one."""
    import hipt.readers.tiff_jpeg as tj

    with TiffJpegReader(slides["tif256"], threads=1) as r:
        tw, th, across, down = r.tile_grid(0)
        wanted = list(range(across * down))
        singles = {i: r.read_tile_bytes(0, i) for i in wanted}
        calls = []
        real = tj.os.pread
        monkeypatch.setattr(tj.os, "pread", lambda *a: calls.append(a) or real(*a))
        batched = r.read_tiles(0, wanted)
        assert len(calls) == 1  # the whole small level is one span
        assert batched[5] is None and singles[5] is None  # the missing tile
        for i in wanted:
            if singles[i] is not None:
                assert bytes(batched[i]) == singles[i]
        calls.clear()
        monkeypatch.setattr(tj, "_MERGE_GAP", 0)
        monkeypatch.setattr(tj, "_MAX_SPAN", 1)  # no merging at all: one read per tile
        assert bytes(r.read_tiles(0, [0, 7])[7]) == singles[7]
        assert len(calls) == 2


# Measured on odd-sized pyramids: OpenSlide's sub-pixel shift (cairo/pixman bilinear, 8-bit
# weights, painted tile by tile) against the fast reader's (8-bit weights, two rounded passes):
# over 60 M values of 6001 x 5999 px pyramids, 2.5 % differ by 1 grey level, 0.001 % by 2 or 3,
# none by more. Snapping to the nearest level pixel instead (the reader before) differed by
# 19-43 grey levels on the same reads.
MAX_SUBPIXEL_DIFF = 3


@pytest.fixture(scope="module")
def odd_slides(tmp_path_factory) -> dict[str, Path]:
    """Real-sized-like pyramids: odd dimensions, so every level's downsample is fractional."""
    d = tmp_path_factory.mktemp("odd_pyramids")
    return {
        "odd_tif": synthetic.write_generic_tiff(
            d / "odd.tiff", 3001, 2999, mpp=0.25, tile_px=512, seed=21
        ).path,
        "odd_svs": synthetic.write_svs(d / "odd.svs", 4099, 3071, mpp=0.25, seed=22).path,
    }


@pytest.mark.parametrize("key", ["odd_tif", "odd_svs"])
def test_fractional_downsamples_interpolate_like_openslide(odd_slides, key):
    path = odd_slides[key]
    rng = np.random.default_rng(3)
    with TiffJpegReader(path, threads=2) as r, openslide.OpenSlide(str(path)) as osr:
        assert all(not float(d).is_integer() for d in r.level_downsamples[1:])
        w0, h0 = r.level_dimensions[0]
        off_grid = 0
        for level in range(1, r.level_count):
            ds = r.level_downsamples[level]
            for _ in range(6):
                x0 = int(rng.integers(-200, w0 - 100))
                y0 = int(rng.integers(-200, h0 - 100))
                w, h = int(rng.integers(1, 600)), int(rng.integers(1, 600))
                off_grid += (x0 / ds) % 1 > 0.01 or (y0 / ds) % 1 > 0.01
                for fill in (255, 0):
                    rgba = np.asarray(osr.read_region((x0, y0), level, (w, h))).astype(np.int32)
                    a = rgba[..., 3:]
                    want = (rgba[..., :3] * a + fill * (255 - a) + 127) // 255
                    got = r.read_level(level, x0, y0, w, h, fill=fill)
                    diff = int(np.abs(got.astype(np.int32) - want).max())
                    assert diff <= MAX_SUBPIXEL_DIFF, f"{key} level {level} {(x0, y0, w, h)}"
        assert off_grid >= 5 * (r.level_count - 1)  # the reads really were off the pixel grid


def test_fractional_corner_on_integer_downsample(slides):
    """7 / 4 = 1.75 level px: blended between level pixels 1 and 2, as OpenSlide does."""
    path = slides["svs256"]
    with TiffJpegReader(path) as r:
        got = r.read_level(1, 7, 0, 100, 50).astype(np.int16)
        aligned = r.read_level(1, 8, 0, 100, 50)
    want = openslide_rgb(path, 1, 7, 0, 100, 50)
    assert np.abs(got - want).max() <= MAX_SUBPIXEL_DIFF
    assert not np.array_equal(got, aligned)  # not snapped to the nearest pixel


# ------------------------------------------------------------------------ fallback
def test_open_reader_auto_and_fast(slides, tmp_path):
    for key in ALL_SLIDES:
        r = open_reader(slides[key], "auto")
        assert r.name == "fast", key
        r.close()
    deflate = write_generic(tmp_path / "deflate.tiff", 700, 500, 256, 0.5, compression="zlib")
    r = open_reader(deflate, "auto")
    assert r.name == "openslide"
    assert r.read_level(0, 0, 0, 8, 8).shape == (8, 8, 3)
    r.close()
    with pytest.raises(SlideReadError, match=r"deflate\.tiff.*not JPEG"):
        open_reader(deflate, "fast")
    # A missing file is reported by OpenSlide's reader, naming the file.
    with pytest.raises(SlideReadError, match="nothere.svs"):
        open_reader(tmp_path / "nothere.svs", "auto")


def test_falls_back_for_what_it_cannot_read(tmp_path):
    zlib_tif = write_generic(tmp_path / "deflate.tiff", 700, 500, 256, 0.5, compression="zlib")
    stripped = write_stripped(tmp_path / "stripped.tiff")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    png = tmp_path / "image.png"
    png.write_bytes(imagecodecs.png_encode(_texture(64, 64, 0)))
    reasons = {
        p.name: TiffJpegReader.unsupported_reason(p) for p in (zlib_tif, stripped, text, png)
    }
    assert "not JPEG" in reasons["deflate.tiff"]
    assert reasons["stripped.tiff"] is not None
    assert reasons["notes.svs"] is not None and reasons["image.png"] is not None
    for p in (zlib_tif, stripped, text, png):
        assert not TiffJpegReader.supports(p)
        with pytest.raises(UnsupportedSlideError, match=p.name):
            TiffJpegReader(p)
    # OpenSlide still reads the deflate TIFF: that is where "auto" sends it.
    with openslide.OpenSlide(str(zlib_tif)) as osr:
        assert osr.level_count == 3


def test_aperio_zero_length_tile_is_left_to_openslide(tmp_path):
    """OpenSlide repaints missing Aperio tiles from the finer level; the fast path declines."""
    path = write_svs(tmp_path / "gap.svs", 1024, 768, 256, 0.25)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        count_tag = page.tags["TileByteCounts"]
        pos, n = count_tag.valueoffset, len(page.databytecounts)
        dtype = {3: "<u2", 4: "<u4", 16: "<u8"}[count_tag.dtype]
    counts = np.zeros(n, dtype)
    with open(path, "r+b") as fh:
        fh.seek(pos)
        current = np.frombuffer(fh.read(counts.nbytes), dtype).copy()
        current[3] = 0
        fh.seek(pos)
        fh.write(current.tobytes())
    assert "zero-length" in TiffJpegReader.unsupported_reason(path)


# ------------------------------------------------------------------------ errors
def _corrupt_tile(path: Path, level_page: int, index: int) -> None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level_page]
        off, count = page.dataoffsets[index], page.databytecounts[index]
    junk = np.random.default_rng(0).integers(0, 256, count - 2, dtype=np.uint8)
    junk[::7] = 0xFF
    with open(path, "r+b") as fh:
        fh.seek(off + 2)
        fh.write(junk.tobytes())


def test_corrupt_tile_names_slide_level_and_tile(tmp_path):
    path = write_generic(tmp_path / "broken.tiff", 1536, 1024, 256, 0.5)
    _corrupt_tile(path, 0, 8)  # level 0, column 2, row 1 of a 6-across grid
    with TiffJpegReader(path, threads=2) as r:
        assert r.read_level(0, 0, 0, 512, 256).shape == (256, 512, 3)  # row 0 is fine
        with pytest.raises(SlideReadError) as info:
            r.read_level(0, 256, 200, 700, 300)
        msg = str(info.value)
        assert "broken.tiff" in msg and "level 0" in msg and "tile 8" in msg
        assert "\n" not in msg
        # The reader stays usable for good tiles after an error.
        assert r.read_level(1, 0, 0, 100, 100).shape == (100, 100, 3)
    # OpenSlide also fails on that region (same batch behaviour: the slide is reported).
    with openslide.OpenSlide(str(path)) as osr, pytest.raises(openslide.OpenSlideError):
        osr.read_region((256, 200), 0, (700, 300))


def test_generated_corrupt_tile_slide(tmp_path):
    slide, (x, y) = synthetic.write_corrupt_tile_slide(tmp_path / "bad.tiff", 2048, 2048)
    with TiffJpegReader(slide.path) as r:
        tw, th, across, _ = r.tile_grid(0)
        index = (y // th) * across + x // tw
        with pytest.raises(SlideReadError, match=rf"bad\.tiff.*level 0, tile {index}\b"):
            r.read_level(0, x - 10, y - 10, 64, 64)


def test_truncated_file_is_a_tile_error(tmp_path):
    path = write_generic(tmp_path / "cut.tiff", 1024, 1024, 256, 0.5)
    with TiffJpegReader(path) as r:
        # Cut the file inside the last level-0 tile, after the reader has parsed the header.
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            end = int(page.dataoffsets[-1]) + 10
        with open(path, "r+b") as fh:
            fh.truncate(end)
        with pytest.raises(SlideReadError, match=r"cut\.tiff.*level 0, tile 15"):
            r.read_level(0, 768, 768, 256, 256)


def test_read_into_a_given_buffer(slides):
    with TiffJpegReader(slides["tif256"]) as r:
        want = r.read_level(0, -30, 700, 500, 400)
        buf = np.zeros((400, 500, 3), np.uint8)
        assert r.read_level(0, -30, 700, 500, 400, out=buf) is buf
        assert np.array_equal(buf, want)
        buf[:] = 7  # reused: every pixel is written again, margins included
        r.read_level(0, -30, 700, 500, 400, out=buf)
        assert np.array_equal(buf, want)
        assert (r.read_level(0, 10**6, 0, 4, 4, out=buf[:4, :4].copy()) == 255).all()
        with pytest.raises(ValueError, match="shape"):
            r.read_level(0, 0, 0, 50, 40, out=np.zeros((50, 40, 3), np.uint8))


def test_bad_arguments(slides):
    with TiffJpegReader(slides["tif512"]) as r:
        with pytest.raises(SlideReadError, match="level 7"):
            r.read_level(7, 0, 0, 10, 10)
        assert r.read_level(0, 0, 0, 0, 0).shape == (0, 0, 3)
    with pytest.raises(SlideReadError, match="closed"):
        r.read_level(0, 0, 0, 10, 10)


# ------------------------------------------------------------------------ threads and processes
def test_threads_share_one_reader(slides):
    path = slides["svs256"]
    with TiffJpegReader(path, threads=1) as r:
        want = [r.read_level(0, x, y, 700, 500) for x, y in [(0, 0), (900, 700), (1500, 1100)]]
    with TiffJpegReader(path, threads=3) as r:
        got: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            for _ in range(3):
                x, y = [(0, 0), (900, 700), (1500, 1100)][i]
                got[i] = r.read_level(0, x, y, 700, 500)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(3):
        assert np.array_equal(got[i], want[i])


def _child_read(reader: TiffJpegReader, queue) -> None:
    queue.put(reader.read_level(0, 300, 200, 900, 700).sum(dtype=np.int64))


def test_survives_fork_and_pickle(slides):
    path = slides["tif512"]
    with TiffJpegReader(path, threads=2) as r:
        want = r.read_level(0, 300, 200, 900, 700)  # the pool now exists in the parent
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_read, args=(r, q))
        p.start()
        total = q.get(timeout=60)
        p.join(timeout=60)
        assert p.exitcode == 0
        assert total == want.sum(dtype=np.int64)
        clone = pickle.loads(pickle.dumps(r))
    with clone:
        assert clone._fd is not None
        assert np.array_equal(clone.read_level(0, 300, 200, 900, 700), want)


# ------------------------------------------------------------------------ device decode
def _device() -> str:
    import torch

    # nvJPEG where a GPU is present; torchvision's CPU libjpeg-turbo path everywhere else.
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_standalone_jpeg_rebuilds_tables_and_rgb_marker(slides):
    from hipt.readers.gpu_decode import standalone_jpeg

    with TiffJpegReader(slides["svs512rgb"]) as r:
        tables, space = r.jpeg_info(0)
        data = r.read_tile_bytes(0, 1)
        want = r.decode_tile(0, 1)
    blob = standalone_jpeg(data, tables, space)
    assert blob.count(b"\xff\xd8") == 1 and b"Adobe" in blob
    # A plain decoder, told nothing, now gets OpenSlide's colours.
    assert np.array_equal(imagecodecs.jpeg8_decode(blob), want)
    with pytest.raises(ValueError, match="SOI"):
        standalone_jpeg(b"junk", None, "RGB")


@pytest.mark.parametrize("key", ["svs256", "svs512rgb", "tif256"])
def test_device_decode_matches_cpu_reader(slides, key):
    from hipt.readers.gpu_decode import GpuTileDecoder

    with TiffJpegReader(slides[key], threads=1) as r:
        dec = GpuTileDecoder(r, _device())
        for win in [(0, 0, 0, *r.level_dimensions[0]), (0, -40, -8, 600, 500), (1, 0, 0, 300, 200)]:
            got = dec.read_level(*win)
            assert tuple(got.shape) == (3, win[4], win[3])
            assert got.device.type == _device()
            host = got.permute(1, 2, 0).cpu().numpy()
            diff = int(np.abs(host.astype(np.int16) - r.read_level(*win)).max())
            # nvJPEG's IDCT/upsampling may differ from libjpeg-turbo's by a grey level or two.
            assert diff <= (0 if _device() == "cpu" else 2), f"{key} {win}: {diff}"


def test_device_decode_names_a_corrupt_tile(tmp_path):
    from hipt.readers.gpu_decode import GpuTileDecoder

    path = write_generic(tmp_path / "gbroken.tiff", 1024, 768, 256, 0.5)
    _corrupt_tile(path, 0, 5)
    with TiffJpegReader(path) as r:
        dec = GpuTileDecoder(r, _device())
        with pytest.raises(SlideReadError, match=r"gbroken\.tiff.*level 0, tile 5\b"):
            dec.read_level(0, 0, 0, 1024, 768)


def _threads_in_worker(_: int) -> int:
    from hipt.readers.tiff_jpeg import default_threads

    return default_threads()


def test_default_threads(monkeypatch):
    import torch

    from hipt.readers.tiff_jpeg import default_threads

    monkeypatch.delenv("HIPT_READER_THREADS", raising=False)
    assert 1 <= default_threads() <= 4
    monkeypatch.setenv("HIPT_READER_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("HIPT_READER_THREADS")
    # Inside DataLoader workers the workers are the parallelism: one decode thread each.
    loader = torch.utils.data.DataLoader(
        _Range(2), batch_size=None, num_workers=1, collate_fn=_threads_in_worker
    )
    assert list(loader) == [1, 1]


class _Range:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_decode_buffer_is_contiguous_and_off_the_32_byte_boundary() -> None:
    # libjpeg-turbo streams 32-byte-aligned output rows past the cache; the reader's tile
    # buffers start 16 bytes off that boundary so decoded tiles stay in cache for the copy.
    from hipt.readers.tiff_jpeg import decode_buffer

    for shape in [(256, 256, 3), (512, 512, 3), (240, 200, 3)]:
        buf = decode_buffer(shape)
        assert buf.shape == shape and buf.dtype == np.uint8 and buf.flags.c_contiguous
        assert buf.ctypes.data % 32 == 16 and buf.flags.writeable
