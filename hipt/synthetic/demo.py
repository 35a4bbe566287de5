"""The demo cohort: slides of two visibly different subtypes, whose survival depends on the slides.

Built on :mod:`hipt.synthetic`'s tissue model. Each slide is a row of tissue fragments, one per
4096 px region at 0.5 µm/px (2048 µm), of pink *stroma* with sparse nuclei. One or two fragments
hold a round **lesion**, the subtype-defining tissue:

- ``glandular``: gland-like rings of dark nuclei around pale lumens, on light pink epithelium;
- ``solid``: solid sheets of densely packed nuclei on purple (hematoxylin-rich) stroma.

The generator knows where every lesion is (``truth.json``: centre and radius in level-0 px), so
the demo can say how often the regions a slide model attends to most fall on a lesion. A case's
survival time is exponential with a log-hazard that grows with the lesion area of its slides and
is higher for ``solid``, censored at random and at a follow-up limit, so what is in the slides
decides the outcome. Some cases have two slides; one slide is smaller than a region; one carries
pen marks; one is an Aperio SVS scanned at 0.25 µm/px among generic TIFFs at 0.5.

Examples
--------
>>> import tempfile
>>> c = write_demo_cohort(tempfile.mkdtemp(), n_cases=4, seed=0)  # doctest: +SKIP
>>> sorted(c.subtype_csv.read_text().splitlines()[0].split(","))  # doctest: +SKIP
['case_id', 'label', 'slide_id']
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hipt.atomic import write_text_atomic
from hipt.synthetic.slides import (
    EOSIN_RGB,
    FIELD_STEP_UM,
    GLASS_RGB,
    HEMATOXYLIN_RGB,
    NUCLEUS_RGB,
    PEN_RGB,
    TissueModel,
    _hash_uniform,
    write_generic_tiff,
    write_svs,
)

SUBTYPES = ("glandular", "solid")
REGION_UM = 2048.0  # one 4096 px region at 0.5 µm/px
MARGIN_UM = 64.0  # glass around the row of fragments
GLAND_CELL_UM = 64.0  # one gland per cell of this side
SHEET_CELL_UM = 8.0  # one nucleus per cell of this side in solid sheets
# Lesion patterns repeat every PATTERN_UM (a whole number of cells), so each is rendered once
# per µm/px and then looked up: rendering them per pixel made slides ten times slower to write.
PATTERN_UM = 512.0
LUMEN_RGB = np.array([236.0, 228.0, 236.0], dtype=np.float32)
FOLLOW_UP_MONTHS = 120.0


@dataclass
class Lesion:
    """A round patch of subtype-defining tissue, in µm of the slide."""

    cx_um: float
    cy_um: float
    radius_um: float


@dataclass
class DemoTissueModel(TissueModel):
    """Stroma fragments, one per region of a row, with lesions of one subtype.

    ``n_regions`` fragments sit side by side, each centred in its own 2048 µm cell, so the tiler's
    grid (which starts at the tissue's top-left) puts one fragment in each region.
    """

    subtype: str = "glandular"
    n_regions: int = 1
    lesions: list[Lesion] = field(default_factory=list)
    _patterns: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        rng = np.random.default_rng(self.seed + 7919)
        gx = np.arange(self.nx) * FIELD_STEP_UM
        gy = np.arange(self.ny) * FIELD_STEP_UM
        xx, yy = np.meshgrid(gx, gy)
        f = np.full(xx.shape, -1.0)
        cell = min(REGION_UM, self.width_um - 2 * MARGIN_UM, self.height_um - 2 * MARGIN_UM)
        for i in range(self.n_regions):
            cx = MARGIN_UM + (i + 0.5) * cell
            cy = MARGIN_UM + 0.5 * cell
            a, b = rng.uniform(0.42, 0.47, size=2) * cell
            f = np.maximum(f, 1.0 - ((xx - cx) / a) ** 2 - ((yy - cy) / b) ** 2)
        # Wavy edges, but small enough that a fragment stays inside its region's cell.
        self.tissue_field = f + 0.08 * rng.standard_normal(f.shape)

    def lesion_alpha(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Lesion coverage in [0, 1] at pixel centres ``xs`` × ``ys`` (µm), soft 4 µm edge."""
        out = np.zeros((len(ys), len(xs)), dtype=np.float32)
        for les in self.lesions:
            dx = (xs - les.cx_um).astype(np.float32)
            dy = (ys - les.cy_um).astype(np.float32)
            if np.abs(dx).min() > les.radius_um + 4 or np.abs(dy).min() > les.radius_um + 4:
                continue  # the lesion misses this rectangle
            d = np.hypot(dx[None, :], dy[:, None])
            np.maximum(out, np.clip((np.float32(les.radius_um) - d) / 4 + 0.5, 0, 1), out=out)
        return out

    def _cells(self, xs: np.ndarray, ys: np.ndarray, c: float) -> tuple:
        """Cell indices of the pixels and the cells' grid (hashed modulo the pattern period)."""
        gx, gy = np.floor(xs / c).astype(np.int64), np.floor(ys / c).astype(np.int64)
        ux, uy = np.meshgrid(np.arange(gx[0], gx[-1] + 1), np.arange(gy[0], gy[-1] + 1))
        n = round(PATTERN_UM / c)
        return gx, gy, ux, uy, ux % n, uy % n

    def _glands(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        c = GLAND_CELL_UM
        gx, gy, ux, uy, hx, hy = self._cells(xs, ys, c)
        ox = (ux + 0.5) * c + 6.0 * (_hash_uniform(hx, hy, self.seed, 11) - 0.5)
        oy = (uy + 0.5) * c + 6.0 * (_hash_uniform(hx, hy, self.seed, 12) - 0.5)
        r_mid = 15.0 + 6.0 * _hash_uniform(hx, hy, self.seed, 13)
        jx, jy = (gx - gx[0])[None, :], (gy - gy[0])[:, None]
        d = np.hypot(xs[None, :] - ox[jy, jx], ys[:, None] - oy[jy, jx]).astype(np.float32)
        mid = r_mid[jy, jx].astype(np.float32)
        img = np.empty((len(ys), len(xs), 3), np.float32)
        img[:] = EOSIN_RGB + 0.3 * (HEMATOXYLIN_RGB - EOSIN_RGB)
        ring = np.clip((4.0 - np.abs(d - mid)) / 1.0 + 0.5, 0, 1)[..., None]
        lumen = np.clip((mid - 4.0 - d) / 1.0 + 0.5, 0, 1)[..., None]
        img += lumen * (LUMEN_RGB - img)
        img += ring * 0.9 * (NUCLEUS_RGB - img)
        return img

    def _sheets(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        c = SHEET_CELL_UM
        gx, gy, ux, uy, hx, hy = self._cells(xs, ys, c)
        ox = (ux + 0.5) * c + 2.0 * (_hash_uniform(hx, hy, self.seed, 21) - 0.5)
        oy = (uy + 0.5) * c + 2.0 * (_hash_uniform(hx, hy, self.seed, 22) - 0.5)
        radius = np.where(_hash_uniform(hx, hy, self.seed, 23) < 0.85, 2.8, -10.0)
        jx, jy = (gx - gx[0])[None, :], (gy - gy[0])[:, None]
        d = np.hypot(xs[None, :] - ox[jy, jx], ys[:, None] - oy[jy, jx]).astype(np.float32)
        nuc = np.clip((radius[jy, jx] - d) / 1.0 + 0.5, 0, 1).astype(np.float32)[..., None]
        img = np.empty((len(ys), len(xs), 3), np.float32)
        img[:] = EOSIN_RGB + 0.85 * (HEMATOXYLIN_RGB - EOSIN_RGB)
        img += nuc * 0.95 * (NUCLEUS_RGB - img)
        return img

    def pattern(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """The subtype's lesion pattern, channels first (float32 ``[3, h, w]``), at ``mpp``."""
        draw = self._glands if self.subtype == "glandular" else self._sheets
        period = PATTERN_UM / mpp
        if abs(period - round(period)) > 1e-6 or period < 1:
            xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
            return np.ascontiguousarray(draw(xs, ys).transpose(2, 0, 1))
        period = round(period)
        if mpp not in self._patterns:
            centres = self._centres(0, period, mpp)
            self._patterns[mpp] = np.ascontiguousarray(draw(centres, centres).transpose(2, 0, 1))
        tex = self._patterns[mpp]
        iy = np.arange(y0_px, y0_px + h) % period
        ix = np.arange(x0_px, x0_px + w) % period
        return tex[:, iy][:, :, ix]

    def render(self, x0_px: int, y0_px: int, w: int, h: int, mpp: float) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]``: stroma, lesions of this subtype, pen strokes.

        Composited channel by channel on contiguous planes, in place (``t += a * (c - t)``):
        broadcasting over a trailing colour axis was five times slower.
        """
        xs, ys = self._centres(x0_px, w, mpp), self._centres(y0_px, h, mpp)
        alpha = self.tissue_alpha(x0_px, y0_px, w, h, mpp).astype(np.float32)
        out = np.empty((3, h, w), dtype=np.float32)
        for c in range(3):
            out[c] = GLASS_RGB[c]
        if alpha.any():
            # Stroma: pink, a little stain variation, sparse nuclei.
            stain = 0.1 + 0.15 * np.clip(self._smooth(self.stain_field, xs, ys), 0, 1)
            nuc = self._nuclei_alpha(xs, ys) * np.float32(0.6) if mpp < 4.0 else None
            les = self.lesion_alpha(xs, ys)
            pattern = self.pattern(x0_px, y0_px, w, h, mpp) if les.any() else None
            tmp = np.empty((h, w), dtype=np.float32)
            for c in range(3):
                t = stain * np.float32(HEMATOXYLIN_RGB[c] - EOSIN_RGB[c])
                t += EOSIN_RGB[c]
                if nuc is not None:
                    _blend(t, nuc, NUCLEUS_RGB[c], tmp)
                if pattern is not None:
                    _blend(t, les, pattern[c], tmp)
                _blend(out[c], alpha, t, tmp)
        for s in self.strokes:
            pen = self._stroke_alpha(s, xs, ys)
            if pen is not None:
                pen = pen.astype(np.float32)
                tmp = np.empty((h, w), dtype=np.float32)
                for c in range(3):
                    _blend(out[c], pen, PEN_RGB[s.colour][c], tmp)
        out += 0.5
        np.clip(out, 0, 255, out=out)
        return np.ascontiguousarray(out.astype(np.uint8).transpose(1, 2, 0))


def _blend(plane: np.ndarray, weight: np.ndarray, colour, tmp: np.ndarray) -> None:
    """``plane += weight * (colour - plane)`` in place (``tmp`` is scratch of the same shape)."""
    np.subtract(colour, plane, out=tmp)
    tmp *= weight
    plane += tmp


@dataclass
class DemoSlide:
    """The truth about one demo slide."""

    slide_id: str
    case_id: str
    subtype: str
    file: str
    mpp: float
    n_regions: int
    lesions_level0: list[dict]  # {"cx", "cy", "r"} in level-0 px
    lesion_area_mm2: float
    special: str = ""  # "svs_0.25", "smaller_than_region", "pen_marks" or ""


@dataclass
class DemoCohort:
    """Paths of a written demo cohort and its truth."""

    root: Path
    slides_dir: Path
    subtype_csv: Path
    survival_csv: Path
    truth_json: Path
    slides: list[DemoSlide]

    def lesion_fraction(self, slide_id: str, x: int, y: int, side_level0: float) -> float:
        """Share of the square region at level-0 ``(x, y)`` covered by the slide's lesions."""
        return region_lesion_fraction(self.truth(slide_id), x, y, side_level0)

    def truth(self, slide_id: str) -> DemoSlide:
        return next(s for s in self.slides if s.slide_id == slide_id)


def region_lesion_fraction(slide: DemoSlide, x: float, y: float, side_level0: float) -> float:
    """Share of the square region at level-0 ``(x, y)`` of side ``side_level0`` on a lesion.

    Examples
    --------
    >>> s = DemoSlide("s", "c", "solid", "s.tiff", 0.5, 1, [{"cx": 50, "cy": 50, "r": 1e9}], 1.0)
    >>> region_lesion_fraction(s, 0, 0, 100)
    1.0
    """
    n = 32
    t = (np.arange(n) + 0.5) / n * side_level0
    px, py = np.meshgrid(x + t, y + t)
    hit = np.zeros(px.shape, dtype=bool)
    for les in slide.lesions_level0:
        hit |= np.hypot(px - les["cx"], py - les["cy"]) <= les["r"]
    return float(hit.mean())


def _plan_cases(n_cases: int, rng: np.random.Generator) -> list[dict]:
    """Per case: subtype, slides (regions, lesion radii) and special roles of some slides."""
    cases = []
    for i in range(n_cases):
        subtype = SUBTYPES[i % 2]
        n_slides = 2 if i % 5 == 3 else 1
        slides = []
        for _ in range(n_slides):
            n_regions = int(rng.choice([2, 2, 3]))
            n_lesions = 1 if n_regions < 3 or rng.uniform() < 0.6 else 2
            radii = rng.uniform(420.0, 800.0, size=n_lesions)
            slides.append({"n_regions": n_regions, "radii": radii, "special": ""})
        cases.append({"case_id": f"case{i:03d}", "subtype": subtype, "slides": slides})
    # Special slides: an SVS at 0.25 µm/px, a biopsy smaller than a region, pen marks.
    cases[0]["slides"][0].update(special="svs_0.25", n_regions=1, radii=np.array([600.0]))
    cases[1]["slides"][0].update(special="smaller_than_region", n_regions=1)
    cases[2 % n_cases]["slides"][-1].update(special="pen_marks")
    return cases


def _write_slide(folder: Path, slide_id: str, case: dict, spec: dict, seed: int) -> DemoSlide:
    special = spec["special"]
    mpp = 0.25 if special == "svs_0.25" else 0.5
    rng = np.random.default_rng(seed)
    if special == "smaller_than_region":
        width_um, height_um, n_regions = 800.0, 600.0, 1
    else:
        n_regions = spec["n_regions"]
        width_um, height_um = n_regions * REGION_UM + 2 * MARGIN_UM, REGION_UM + 2 * MARGIN_UM
    cell = min(REGION_UM, width_um - 2 * MARGIN_UM, height_um - 2 * MARGIN_UM)
    lesion_regions = rng.choice(n_regions, size=min(len(spec["radii"]), n_regions), replace=False)
    lesions = []
    # A slide with fewer regions than lesions keeps as many lesions as it has regions.
    for k, radius in zip(lesion_regions, spec["radii"], strict=False):
        r = min(float(radius), 0.42 * cell)
        cx = MARGIN_UM + (k + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = MARGIN_UM + 0.5 * cell + rng.uniform(-0.08, 0.08) * cell
        lesions.append(Lesion(cx, cy, r))
    model = DemoTissueModel(
        width_um=width_um,
        height_um=height_um,
        seed=seed,
        pen_marks=special == "pen_marks",
        subtype=case["subtype"],
        n_regions=n_regions,
        lesions=lesions,
    )
    w_px, h_px = round(width_um / mpp), round(height_um / mpp)
    if special == "svs_0.25":
        path = write_svs(folder / f"{slide_id}.svs", w_px, h_px, mpp=mpp, model=model).path
    else:
        path = write_generic_tiff(
            folder / f"{slide_id}.tiff", w_px, h_px, mpp=mpp, model=model
        ).path
    return DemoSlide(
        slide_id=slide_id,
        case_id=case["case_id"],
        subtype=case["subtype"],
        file=path.name,
        mpp=mpp,
        n_regions=n_regions,
        lesions_level0=[
            {"cx": les.cx_um / mpp, "cy": les.cy_um / mpp, "r": les.radius_um / mpp}
            for les in lesions
        ],
        lesion_area_mm2=sum(math.pi * (les.radius_um / 1000) ** 2 for les in lesions),
        special=special,
    )


def _survival(slides: list[DemoSlide], case_ids: list[str], seed: int) -> dict[str, tuple]:
    """Per case ``(months, event)``: log-hazard from lesion area (summed) and subtype."""
    rng = np.random.default_rng(seed + 104729)
    area = {c: sum(s.lesion_area_mm2 for s in slides if s.case_id == c) for c in case_ids}
    solid = {c: next(s.subtype for s in slides if s.case_id == c) == "solid" for c in case_ids}
    mean_area = float(np.mean(list(area.values())))
    out = {}
    for c in case_ids:
        log_hazard = math.log(1 / 40.0) + 1.0 * (area[c] - mean_area) + 0.8 * solid[c]
        t = rng.exponential(1.0 / math.exp(log_hazard))
        censor = min(rng.uniform(24.0, 2 * FOLLOW_UP_MONTHS), FOLLOW_UP_MONTHS)
        out[c] = (round(min(t, censor), 2), int(t <= censor))
    return out


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_demo_cohort(
    root: str | os.PathLike,
    *,
    n_cases: int = 24,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> DemoCohort:
    """Write the demo's slides, ``subtype.csv``, ``survival.csv`` and ``truth.json`` under ``root``.

    A complete cohort already there (``truth.json`` and every slide it names) is kept, so a second
    call is quick. ``workers`` processes write slides in parallel; ``progress`` (optional) is
    called with each slide id once it is written.
    """
    root = Path(root)
    slides_dir = root / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_json = root / "truth.json"
    if truth_json.is_file():
        cohort = read_demo_cohort(root)
        if all((slides_dir / s.file).is_file() for s in cohort.slides):
            return cohort
    rng = np.random.default_rng(seed)
    jobs = [
        (slides_dir, f"{case['case_id']}_s{si}", case, spec, seed * 1000 + ci * 10 + si)
        for ci, case in enumerate(_plan_cases(max(n_cases, 4), rng))
        for si, spec in enumerate(case["slides"])
    ]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        slides = []
        for slide in pool.map(_write_slide, *zip(*jobs, strict=True)):
            slides.append(slide)
            if progress:
                progress(slide.slide_id)
    case_ids = sorted({s.case_id for s in slides})
    surv = _survival(slides, case_ids, seed)
    sub_rows = [{"slide_id": s.slide_id, "case_id": s.case_id, "label": s.subtype} for s in slides]
    surv_rows = [
        {"slide_id": s.slide_id, "case_id": s.case_id, "survival_months": surv[s.case_id][0],
         "event": surv[s.case_id][1]}
        for s in slides
    ]  # fmt: skip
    write_text_atomic(root / "subtype.csv", _csv(sub_rows))
    write_text_atomic(root / "survival.csv", _csv(surv_rows))
    # Written last: its presence means the cohort is complete.
    write_text_atomic(truth_json, json.dumps([asdict(s) for s in slides], indent=1))
    return read_demo_cohort(root)


def read_demo_cohort(root: str | os.PathLike) -> DemoCohort:
    """The cohort written by :func:`write_demo_cohort` under ``root``."""
    root = Path(root)
    slides = [DemoSlide(**d) for d in json.loads((root / "truth.json").read_text())]
    return DemoCohort(
        root, root / "slides", root / "subtype.csv", root / "survival.csv", root / "truth.json",
        slides,
    )  # fmt: skip
