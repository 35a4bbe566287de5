"""Slide: µm/px and its source, level choice, reads at a target µm/px, bad files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from hipt.readers import SlideReadError, open_reader
from hipt.slide import MppError, Slide, SlowReadWarning, mpp_from_properties

READERS = ["openslide", "auto"]


def test_geometry_of_an_svs(svs_025):
    with Slide(svs_025.path) as s:
        assert s.slide_id == "svs_025"
        assert s.dimensions == (4096, 4096)
        assert s.level_count == 3
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert s.mpp_level0 == pytest.approx(0.25)
        assert s.mpp_source == "openslide.mpp-x"
        assert s.objective_power == 40
        assert s.region_size_level0(4096, 0.5) == pytest.approx(8192)
        assert [s.best_level_for(t) for t in (0.1, 0.25, 0.5, 0.99, 1.0, 3.0, 4.0, 100)] == [
            0,
            0,
            0,
            0,
            1,
            1,
            2,
            2,
        ]
        assert s.thumbnail_level(300) == 2
        assert s.thumbnail_level(1024) == 1
        assert s.thumbnail_level(10) == 2  # nothing that small: the coarsest level


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"openslide.mpp-x": "0.2527"}, (0.2527, "openslide.mpp-x", None)),
        (
            {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
            (0.25, "tiff.XResolution", None),
        ),
        (
            {"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"},
            (0.5, "tiff.XResolution", None),
        ),
        # 72 dpi is a writer's default, not a scan: fall through to the objective power.
        (
            {
                "openslide.mpp-x": "352.77",
                "tiff.XResolution": "72",
                "tiff.ResolutionUnit": "inch",
                "openslide.objective-power": "20",
            },
            (0.5, "openslide.objective-power", 20.0),
        ),
        ({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}, (None, None, None)),
        ({"openslide.mpp-x": "garbage", "openslide.objective-power": "0"}, (None, None, None)),
    ],
)
def test_mpp_sources_in_order(props, expected):
    mpp, source, power = mpp_from_properties(props)
    assert source == expected[1]
    assert power == expected[2]
    assert mpp == (None if expected[0] is None else pytest.approx(expected[0]))


def test_user_mpp_overrides(svs_025):
    with Slide(svs_025.path, mpp=0.3) as s:
        assert (s.mpp_level0, s.mpp_source) == (0.3, "user")


def test_missing_mpp_is_an_error_naming_file_and_fix(no_mpp_tiff):
    with pytest.raises(MppError) as err:
        Slide(no_mpp_tiff.path)
    msg = str(err.value)
    assert str(no_mpp_tiff.path) in msg and "--mpp" in msg and "\n" not in msg
    assert isinstance(err.value, SlideReadError)
    with Slide(no_mpp_tiff.path, mpp=0.5) as s:
        assert s.mpp_source == "user"


def test_suspicious_mpp_needs_trust_or_override(suspicious_svs):
    with pytest.raises(MppError, match="suspicious") as err:
        Slide(suspicious_svs.path)
    assert str(suspicious_svs.path) in str(err.value) and "--trust-metadata" in str(err.value)
    with (
        pytest.warns(UserWarning, match="suspicious"),
        Slide(suspicious_svs.path, trust_metadata=True) as s,
    ):
        assert s.mpp_level0 == pytest.approx(0.25)
    with Slide(suspicious_svs.path, mpp=1.0) as s:
        assert s.mpp_source == "user"


# OpenSlide is slow on the 8192 px read of the full region, so it reads the tissue part only.
@pytest.mark.parametrize(("reader", "size_px"), [("auto", 4096), ("openslide", 2048)])
def test_two_scans_of_the_same_tissue_give_the_same_region(svs_025, tiff_050, reader, size_px):
    """0.25 µm/px (read from level 0, halved) vs 0.5 µm/px (read as is): same 4096 region."""
    with Slide(svs_025.path, reader=reader) as a, Slide(tiff_050.path, reader=reader) as b:
        assert a.best_level_for(0.5) == 0 and b.best_level_for(0.5) == 0
        ra = a.read_region(0, 0, size_px, 0.5)
        rb = b.read_region(0, 0, size_px, 0.5)
    assert ra.shape == rb.shape == (size_px, size_px, 3) and ra.dtype == np.uint8
    diff = np.abs(ra.astype(np.int16) - rb.astype(np.int16))
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99.9) <= 12  # JPEG noise only
    # Both slides cover 1024 µm = 2048 px at 0.5 µm/px; the rest of the region is white padding.
    assert (ra[2048:] == 255).all() and (ra[:, 2048:] == 255).all()
    assert (ra[:2048, :2048] < 250).mean() > 0.1


def test_level_from_rounded_dimensions_still_serves_the_target(tiff_050):
    """A 2x level whose size was rounded down reports a downsample a hair above 2."""
    with Slide(tiff_050.path, mpp=0.25) as s:
        (w0, h0), (w1, h1) = s.level_dimensions[:2]
        assert (w1, h1) == (w0 // 2, h0 // 2)
        # As OpenSlide reports it for a level-0 scan one pixel wider and taller.
        s.level_downsamples = (1.0, ((w0 + 1) / w1 + (h0 + 1) / h1) / 2, *s.level_downsamples[2:])
        assert s.level_mpp(1) > 0.5
        assert s.best_level_for(0.5) == 1
        # A level really coarser than the target (0.5 %) is still refused.
        s.level_downsamples = (1.0, 2.01, *s.level_downsamples[2:])
        assert s.best_level_for(0.5) == 0


def test_integer_factor_is_an_area_average(svs_025, tiff_050):
    with Slide(svs_025.path, reader="openslide") as s:
        # 2.0 µm/px is served by level 1 (1.0 µm/px) reduced 2x.
        assert s.best_level_for(2.0) == 1
        got = s.read_region(1024, 1024, 256, 2.0)
        level1 = s.read_level(1, 1024, 1024, 512, 512)
    assert np.array_equal(got, np.asarray(Image.fromarray(level1).reduce(2)))
    with Slide(tiff_050.path, reader="openslide") as s:
        # 1.0 µm/px is level 1 itself; it matches the 2x2 mean of level 0 up to JPEG noise.
        got = s.read_region(512, 512, 512, 1.0).astype(np.float64)
        level0 = s.read_level(0, 512, 512, 1024, 1024).astype(np.float64)
    assert np.abs(got - level0.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))).mean() < 2.0


def test_fractional_factor_uses_a_box_filter(tiff_050):
    with Slide(tiff_050.path) as s:
        out = s.read_region(0, 0, 300, 0.6)  # level-0 side 360 px
        src = s.read_level(0, 0, 0, 360, 360)
    expect = np.asarray(Image.fromarray(src).resize((300, 300), Image.Resampling.BOX))
    assert out.shape == (300, 300, 3)
    assert np.abs(out.astype(int) - expect).max() <= 1


def test_outside_the_slide_is_white(tiff_050):
    with Slide(tiff_050.path) as s:
        out = s.read_region(1900, -200, 512, 0.5)
        assert (out[:200] == 255).all()  # above the slide
        assert (out[:, 148:] == 255).all()  # right of the slide
        assert out.shape == (512, 512, 3)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    ("x", "y", "size_px", "target_mpp"), [(1900, -200, 512, 0.5), (0, 0, 300, 0.6)]
)
def test_read_region_into_a_given_array(tiff_050, reader, x, y, size_px, target_mpp):
    # Direct reads (the reader fills the array) and resampled ones (the result is copied in)
    # give what a plain read gives, in the caller's array, including the white outside.
    with Slide(tiff_050.path, reader=reader) as s:
        want = s.read_region(x, y, size_px, target_mpp)
        buf = np.zeros((size_px, size_px, 3), np.uint8)
        assert s.read_region(x, y, size_px, target_mpp, out=buf) is buf
        np.testing.assert_array_equal(buf, want)
        with pytest.raises(ValueError, match="out must be a writable uint8"):
            s.read_region(x, y, size_px, target_mpp, out=np.zeros((size_px, size_px, 4), np.uint8))


def test_non_pyramidal_tiff_reads_with_a_warning(single_level_tiff):
    with pytest.warns(SlowReadWarning, match="no pyramid"):
        s = Slide(single_level_tiff.path)
    with s:
        assert s.level_count == 1
        thumb, ds = s.thumbnail(256)
        assert thumb.shape == (256, 256, 3) and ds == 8
        r = s.read_region(0, 0, 512, 2.0)  # level 0 reduced 4x
        assert r.shape == (512, 512, 3)
        half = np.asarray(Image.fromarray(r).reduce(2)).astype(int)
        assert np.abs(half - thumb).mean() < 1.0


def test_thumbnail_uses_a_low_level(svs_025):
    with Slide(svs_025.path) as s:
        thumb, ds = s.thumbnail(512)
        assert thumb.shape == (256, 256, 3) and ds == 16


@pytest.mark.parametrize("reader", READERS)
def test_not_a_slide(not_a_slide, reader):
    with pytest.raises(SlideReadError) as err:
        Slide(not_a_slide, reader=reader)
    assert str(not_a_slide) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("reader", READERS)
def test_truncated_tiff(truncated_tiff, reader):
    with pytest.raises(SlideReadError, match="truncated|cannot read") as err:
        Slide(truncated_tiff, reader=reader)
    assert str(truncated_tiff) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SlideReadError, match="no such file"):
        Slide(tmp_path / "nope.svs")


@pytest.mark.parametrize("reader", READERS)
def test_unreadable_tile_in_a_valid_pyramid(corrupt_tile_slide, reader):
    slide, (x, y) = corrupt_tile_slide
    with Slide(slide.path, reader=reader) as s:
        good = s.read_region(0, 0, 512, 0.5)
        assert good.shape == (512, 512, 3)
        with pytest.raises(SlideReadError) as err:
            s.read_region(x, y, 512, 0.5)
    assert str(slide.path) in str(err.value) and "\n" not in str(err.value)


def test_closed_slide_refuses_reads(tiff_050):
    s = Slide(tiff_050.path)
    s.close()
    s.close()
    with pytest.raises(SlideReadError, match="closed"):
        s.read_region(0, 0, 16)


def test_open_reader_choices(tiff_050):
    r = open_reader(tiff_050.path, "openslide")
    try:
        assert r.name == "openslide"
        assert r.read_level(2, 0, 0, 8, 4).shape == (4, 8, 3)
    finally:
        r.close()
    # Every reader refuses a read after close with an error naming the file.
    for name in ("openslide", "fast"):
        r = open_reader(tiff_050.path, name)
        r.close()
        with pytest.raises(SlideReadError, match=r"tiff_050\.tiff.*closed"):
            r.read_level(0, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="unknown reader"):
        open_reader(tiff_050.path, "magic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Slide(tiff_050.path, reader="fast") as s:
            assert s.reader_name == "fast"


def test_mpp_x_and_y_disagreeing_warns(tmp_path):
    import tifffile

    from hipt import synthetic

    model = synthetic.TissueModel(512, 512, seed=1)
    path = tmp_path / "rect.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            model.render(0, 0, 1024, 1024, 0.5),
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            resolution=(20000.0, 10000.0),  # 0.5 µm across, 1.0 µm down
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    with pytest.warns(UserWarning, match="not square"), Slide(path) as s:
        assert s.mpp_level0 == pytest.approx(0.5)


@pytest.mark.parametrize("reader", ["openslide", "fast"])
def test_level0_reduction_goes_strip_by_strip(svs_025, reader):
    """A 0.25 µm/px scan read at 0.5: the same pixels as reducing the whole read, bounded memory."""
    import tracemalloc

    with Slide(svs_025.path, reader=reader) as s:
        assert s.best_level_for(0.5) == 0
        # y0 odd and off the tile rows: strips carry a level row from one to the next.
        whole = s.read_level(0, 6, 1001, 4096, 4096)
        want = np.asarray(Image.fromarray(whole).reduce(2))
        del whole
        out = np.zeros((2048, 2048, 3), np.uint8)
        tracemalloc.start()
        s.read_region(6, 1001, 2048, 0.5, out=out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert np.array_equal(out, want)
    # The whole 4096² level-0 square would be 48 MiB (OpenSlide's RGBA copies 3x that); a
    # strip is at most STRIP_BYTES (OpenSlide's own copies of it come on top).
    bound = (16 if reader == "fast" else 64) << 20
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("reader", READERS)
def test_outside_the_slide_takes_the_fill(tiff_050, reader):
    with Slide(tiff_050.path, reader=reader) as s:
        white = s.read_region(1900, -200, 512, 0.5)
        black = s.read_region(1900, -200, 512, 0.5, fill=0)
        reduced = s.read_region(1900, -400, 256, 1.0, fill=0)
    assert (black[:200] == 0).all() and (black[:, 148:] == 0).all()
    assert np.array_equal(black[200:, :148], white[200:, :148])
    assert (reduced[:100] == 0).all()


@pytest.mark.parametrize(("x", "y"), [(6, 1001), (3001, 3333)])  # inside; across two edges
def test_40x_region_is_openslide_level0_reduced_by_pil(svs_025, x, y):
    """The fast reader's 2x strip reduction gives exactly OpenSlide's level 0 + PIL reduce(2)."""
    with Slide(svs_025.path, reader="openslide") as s:
        want = np.asarray(Image.fromarray(s.read_level(0, x, y, 2048, 2048)).reduce(2))
    with Slide(svs_025.path, reader="fast") as s:
        assert s.reader_name == "fast" and s.best_level_for(0.5) == 0
        out = np.zeros((1024, 1024, 3), np.uint8)
        assert s.read_region(x, y, 1024, 0.5, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert (want < 250).mean() > 0.05  # tissue, not only white
