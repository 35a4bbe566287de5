"""The demo cohort's tissue model: lesions where the truth says, subtypes that differ visibly,
survival that follows the lesions."""

from __future__ import annotations

import numpy as np

from hipt.synthetic.demo import (
    REGION_UM,
    DemoSlide,
    DemoTissueModel,
    Lesion,
    _plan_cases,
    _survival,
    region_lesion_fraction,
)


def _model(subtype: str) -> DemoTissueModel:
    return DemoTissueModel(
        width_um=2 * REGION_UM + 128, height_um=REGION_UM + 128, seed=3, subtype=subtype,
        n_regions=2, lesions=[Lesion(1088.0, 1088.0, 600.0)],
    )  # fmt: skip


def _patch(model: DemoTissueModel, cx_um: float, cy_um: float, mpp: float = 0.5) -> np.ndarray:
    x0, y0 = round(cx_um / mpp) - 128, round(cy_um / mpp) - 128
    return model.render(x0, y0, 256, 256, mpp).astype(np.float32)


def test_lesions_look_different_from_stroma_and_from_each_other():
    glands, sheets = _model("glandular"), _model("solid")
    stroma = _patch(glands, 1088.0 + REGION_UM, 1088.0)  # centre of the lesion-free fragment
    gland = _patch(glands, 1088.0, 1088.0)
    sheet = _patch(sheets, 1088.0, 1088.0)
    # Glands: pale lumens (bright pixels) and dark nuclear rings, which stroma has few of.
    assert (gland.min(axis=2) > 220).mean() > 0.1 > (stroma.min(axis=2) > 220).mean()
    # Solid sheets: much darker (hematoxylin and packed nuclei) than stroma or glands.
    assert sheet.mean() < gland.mean() - 25 and sheet.mean() < stroma.mean() - 40
    # The same tissue at 0.25 µm/px (an SVS) has the same colours on average.
    assert abs(_patch(sheets, 1088.0, 1088.0, mpp=0.25).mean() - sheet.mean()) < 6


def test_fragments_fill_their_own_region_and_glass_lies_between():
    model = _model("solid")
    alpha = model.tissue_alpha(0, 0, 2 * 4096 + 256, 4096 + 256, 0.5)
    for k in range(2):  # each region's cell holds most of one fragment
        cell = alpha[64:4160, 64 + k * 4096 : 64 + (k + 1) * 4096]
        assert 0.55 < cell.mean() < 0.9
    assert alpha[:, :32].max() == 0 and alpha[:32, :].max() == 0  # glass border


def test_lesion_fraction_of_regions_from_the_truth():
    slide = DemoSlide(
        "s", "c", "solid", "s.tiff", 0.5, 2, [{"cx": 2176, "cy": 2176, "r": 1200}], 1.0
    )
    assert region_lesion_fraction(slide, 128, 128, 4096) > 0.25
    assert region_lesion_fraction(slide, 128 + 4096, 128, 4096) == 0.0


def test_cohort_plan_has_the_special_slides_and_both_subtypes():
    cases = _plan_cases(12, np.random.default_rng(0))
    specials = [s["special"] for c in cases for s in c["slides"] if s["special"]]
    assert sorted(specials) == ["pen_marks", "smaller_than_region", "svs_0.25"]
    assert {c["subtype"] for c in cases} == {"glandular", "solid"}
    assert any(len(c["slides"]) > 1 for c in cases)


def test_survival_is_shorter_with_more_lesion_and_for_solid():
    rng = np.random.default_rng(1)
    slides, ids = [], []
    for i in range(400):
        area = float(rng.uniform(0.2, 3.0))
        subtype = "solid" if i % 2 else "glandular"
        slides.append(DemoSlide(f"s{i}", f"c{i}", subtype, "x", 0.5, 1, [], area))
        ids.append(f"c{i}")
    surv = _survival(slides, ids, seed=0)
    t = np.array([surv[c][0] for c in ids])
    area = np.array([s.lesion_area_mm2 for s in slides])
    solid = np.array([s.subtype == "solid" for s in slides])
    assert np.corrcoef(area, t)[0, 1] < -0.1
    assert np.median(t[solid]) < np.median(t[~solid])
    assert {surv[c][1] for c in ids} == {0, 1}  # deaths and censored cases
