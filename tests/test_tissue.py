"""Tissue segmentation against the generator's true mask, pen marks, blank glass."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hsv

from hipt.slide import Slide
from preprocessing.tissue import (
    NoTissueError,
    SegmentationParams,
    otsu_threshold,
    rgb_to_hsv,
    segment_rgb,
    segment_tissue,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("name", ["svs_025", "tiff_pen"])
def test_mask_matches_the_true_tissue(request, name):
    synth = request.getfixturevalue(name)
    with Slide(synth.path) as s:
        tm = segment_tissue(s)
    h, w = tm.mask.shape
    truth = synth.tissue_mask(tm.mask_mpp)[:h, :w]
    pen = synth.model.pen_mask(0, 0, w, h, tm.mask_mpp)
    assert _iou(tm.mask, truth & ~pen) > 0.9
    # Segmented on a low level: 16 µm/px, or finer for small slides (>= 512 px image).
    assert max(h, w) >= 512 and tm.mask_mpp <= 16
    assert tm.downsample * s.mpp_level0 == pytest.approx(tm.mask_mpp)


def test_pen_marks_are_not_tissue(tiff_pen):
    with Slide(tiff_pen.path) as s:
        tm = segment_tissue(s)
    h, w = tm.mask.shape
    pen = tiff_pen.model.pen_mask(0, 0, w, h, tm.mask_mpp)
    truth = tiff_pen.tissue_mask(tm.mask_mpp)[:h, :w]
    pen_on_glass = pen & ~truth
    assert pen_on_glass.sum() > 200  # the strokes really are there
    assert (tm.mask & pen_on_glass).sum() / pen_on_glass.sum() < 0.02
    assert (tm.pen & pen_on_glass).sum() / pen_on_glass.sum() > 0.8


def test_blank_glass_has_no_tissue(blank_slide):
    with Slide(blank_slide.path) as s, pytest.raises(NoTissueError) as err:
        segment_tissue(s)
    assert "no tissue found" in str(err.value) and str(blank_slide.path) in str(err.value)


def test_small_fragments_dropped_holes_filled():
    img = np.full((200, 200, 3), 242, np.uint8)
    img[40:160, 40:160] = (225, 150, 190)  # tissue
    img[90:110, 90:110] = 242  # a hole (lumen)
    img[10:13, 180:183] = (225, 150, 190)  # a 3x3 px speck
    params = SegmentationParams(min_fragment_um2=100 * 16 * 16)  # 100 px at 16 µm/px
    mask, threshold, pen = segment_rgb(img, 16.0, params)
    assert mask[40:160, 40:160].all()  # hole filled
    assert not mask[10:13, 180:183].any()  # speck dropped
    assert mask.sum() == 120 * 120
    assert 0.02 < threshold < 0.3 and not pen.any()


def test_dark_and_blue_pixels_are_ink():
    img = np.full((100, 100, 3), 242, np.uint8)
    img[20:80, 20:80] = (225, 150, 190)
    img[20:80, 45:50] = (35, 60, 190)  # blue stroke across the tissue
    img[5:8, 5:95] = (20, 20, 25)  # black ink on glass
    mask, _, pen = segment_rgb(img, 16.0, SegmentationParams(min_fragment_um2=0))
    assert not mask[20:80, 45:50].any() and pen[20:80, 45:50].all()
    assert not mask[5:8].any() and pen[5:8, 5:95].all()
    assert mask[20:80, 20:45].all()


def test_hsv_matches_skimage():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    h, s, v = rgb_to_hsv(rgb)
    ref = rgb2hsv(rgb)
    assert np.allclose(s, ref[..., 1], atol=1e-5)
    assert np.allclose(v, ref[..., 2], atol=1e-5)
    hue_diff = np.abs(h / 360 - ref[..., 0])
    assert np.all((hue_diff < 1e-4) | (hue_diff > 1 - 1e-4) | (ref[..., 1] == 0))


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.4, 0.05, 3000)]).clip(0, 1)
    t = otsu_threshold(values)
    assert 0.1 < t < 0.3


def test_params_become_flat_attrs():
    attrs = SegmentationParams().as_attrs()
    assert attrs["seg_mpp"] == 16.0
    assert attrs["seg_closing_iterations"] == 3
    assert attrs["seg_pen_hue_range"] == [70.0, 250.0]
    assert all(k.startswith("seg_") for k in attrs)
