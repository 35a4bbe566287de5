"""The generated slides: what OpenSlide sees, determinism, truth masks, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile

from hipt import synthetic


def test_generic_tiff_is_a_pyramid_with_mpp(tiff_050):
    with openslide.OpenSlide(str(tiff_050.path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512), (256, 256))
        assert s.level_downsamples == pytest.approx((1, 2, 4, 8))
    assert tiff_050.level_downsamples == (1, 2, 4, 8)


def test_svs_is_aperio_with_mpp_and_magnification(svs_025):
    with openslide.OpenSlide(str(svs_025.path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.objective-power"]) == 40
        assert s.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
        assert "thumbnail" in s.associated_images and "label" in s.associated_images
    with tifffile.TiffFile(svs_025.path) as t:
        assert t.pages[0].tilewidth == 256 and t.pages[0].compression == 7  # JPEG


def test_same_seed_same_pixels_different_seed_different():
    a = synthetic.TissueModel(1000, 800, seed=5)
    b = synthetic.TissueModel(1000, 800, seed=5)
    c = synthetic.TissueModel(1000, 800, seed=6)
    ra, rb, rc = (m.render(0, 0, 500, 400, 2.0) for m in (a, b, c))
    assert np.array_equal(ra, rb)
    assert np.abs(ra.astype(int) - rc).mean() > 5


def test_render_is_resolution_independent():
    m = synthetic.TissueModel(1024, 1024, seed=3)
    fine = m.render(0, 0, 2048, 2048, 0.5).astype(np.float64)
    coarse = m.render(0, 0, 1024, 1024, 1.0).astype(np.float64)
    fine_avg = fine.reshape(1024, 2, 1024, 2, 3).mean(axis=(1, 3))
    assert np.abs(fine_avg - coarse).mean() < 2.0


def test_tiles_compose_to_the_whole_image():
    m = synthetic.TissueModel(600, 600, seed=1, pen_marks=True)
    whole = m.render(0, 0, 512, 512, 1.0)
    rows = [
        np.concatenate([m.render(x, y, 256, 256, 1.0) for x in (0, 256)], axis=1) for y in (0, 256)
    ]
    assert np.array_equal(np.concatenate(rows, axis=0), whole)


def test_truth_mask_matches_the_pixels(tiff_pen):
    mask = tiff_pen.tissue_mask(mask_mpp=16.0)
    assert mask.shape == (96, 128)
    assert 0.05 < mask.mean() < 0.8
    with openslide.OpenSlide(str(tiff_pen.path)) as s:
        # level 3 (downsample 8) is 4 µm/px; average 4x4 to get 16 µm/px
        assert s.level_dimensions[3] == (512, 384)
        img = np.asarray(s.read_region((0, 0), 3, (512, 384)).convert("RGB"), float)
    img = img.reshape(96, 4, 128, 4, 3).mean(axis=(1, 3))
    sat = (img.max(-1) - img.min(-1)) / img.max(-1)
    assert sat[mask].mean() > 0.3  # stained
    glass = ~mask & ~tiff_pen.model.pen_mask(0, 0, 128, 96, 16.0)
    assert sat[glass].mean() < 0.05


def test_pen_marks_are_saturated_blue_green_black(tiff_pen):
    m = tiff_pen.model
    assert {s.colour for s in m.strokes} == {"blue", "green", "black"}
    for s in m.strokes:
        x, y = (np.array(s.p0) + np.array(s.p1)) / 2 / 4.0  # midpoint at 4 µm/px
        rgb = m.render(int(x), int(y), 1, 1, 4.0)[0, 0].astype(int)
        assert np.abs(rgb - synthetic.PEN_RGB[s.colour]).max() <= 2


def test_bbox_is_inside_the_slide(svs_025):
    x0, y0, x1, y1 = svs_025.tissue_bbox_level0()
    assert 0 < x0 < x1 <= 4096 and 0 < y0 < y1 <= 4096


def test_special_writers(
    no_mpp_tiff,
    tiny_biopsy,
    single_level_tiff,
    blank_slide,
    suspicious_svs,
    not_a_slide,
    truncated_tiff,
):
    with openslide.OpenSlide(str(no_mpp_tiff.path)) as s:
        assert "openslide.mpp-x" not in s.properties
        assert "openslide.objective-power" not in s.properties
    assert tiny_biopsy.width_px * tiny_biopsy.mpp < 4096 * 0.5
    with openslide.OpenSlide(str(single_level_tiff.path)) as s:
        assert s.level_count == 1
    assert not blank_slide.tissue_mask().any()
    with openslide.OpenSlide(str(suspicious_svs.path)) as s:
        assert float(s.properties["openslide.objective-power"]) == 10
        assert float(s.properties["openslide.mpp-x"]) == 0.25
    assert not_a_slide.read_text().startswith("This is not a slide")
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(str(truncated_tiff))


def test_corrupt_tile_breaks_only_that_tile(corrupt_tile_slide):
    slide, (x, y) = corrupt_tile_slide
    assert (x, y) == (1024, 1024)  # the middle 512 px tile of a 2048 px level 0
    with openslide.OpenSlide(str(slide.path)) as s:
        s.read_region((0, 0), 0, (512, 512))  # a healthy tile reads
    with openslide.OpenSlide(str(slide.path)) as s, pytest.raises(openslide.OpenSlideError):
        s.read_region((x, y), 0, (512, 512))


def test_big_slide_is_written_in_bounded_memory(tmp_path):
    tracemalloc.start()
    try:
        s = synthetic.write_generic_tiff(
            tmp_path / "big.tiff", 6144, 6144, mpp=1.0, seed=1, nuclei=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = 6144 * 6144 * 3
    assert peak < full / 3, f"peak {peak / 2**20:.0f} MiB vs a {full / 2**20:.0f} MiB full array"
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.level_dimensions[0] == (6144, 6144)
