"""End to end: ``hipt view`` in a subprocess, driven by Debian's Chromium (headless, Playwright).

A generated slide has one planted high-attention region; the page must load without console
errors, tiles must arrive, and switching the overlay off must change the pixels over that region
and nowhere else. The screenshot is kept in the test's tmp folder.

Needs ``/usr/bin/chromium`` and the ``playwright`` package (``.ci/run`` installs both, and sets
``HIPT_REQUIRE_BROWSER=1`` so that a missing browser fails there instead of skipping) and
OpenSeadragon from ``make setup``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from viewer_inputs import planted_heatmap

from heatmaps.viewer.server import find_openseadragon
from heatmaps.viewer.tiles import colormap_lut
from hipt import synthetic

CHROMIUM = Path("/usr/bin/chromium")
SLIDE_PX, MPP = 2048, 2.0  # 2 x 2 regions of 1024 level-0 px
PLANTED = (1, 0)  # region column, row
REGION_L0 = 1024


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("HIPT_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    _need(CHROMIUM.exists(), "Debian's chromium is not installed (apt-get install chromium)")
    _need(find_openseadragon() is not None, "OpenSeadragon is not installed (make setup)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def viewer_url(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("browser")
    slides, heat = root / "slides", root / "heatmaps"
    slides.mkdir()
    synthetic.write_generic_tiff(slides / "planted.tiff", SLIDE_PX, SLIDE_PX, mpp=MPP, seed=4)
    synthetic.write_generic_tiff(slides / "second.tiff", 1024, 768, mpp=0.5, seed=8)
    planted_heatmap(heat, "planted", SLIDE_PX, SLIDE_PX, MPP, {PLANTED: 0.95})
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "hipt.cli", "view", str(slides), "--heatmaps", str(heat)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not m:
        proc.kill()
        pytest.fail(f"hipt view did not start: {line}{proc.stderr.read()}")
    yield m.group(1)
    proc.terminate()
    proc.wait(timeout=30)


def _wait_idle(page) -> None:
    page.wait_for_function("window.hipt && window.hipt.idle()", timeout=30_000)
    page.wait_for_timeout(400)  # one more drawn frame after the last tile
    page.wait_for_function("window.hipt.idle()", timeout=30_000)


def _pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#osd").screenshot())).convert("RGB"))


def _rects(page) -> dict:
    """Screen boxes (in the #osd element, CSS px) of the planted region and the navigator."""
    x0, y0 = PLANTED[0] * REGION_L0, PLANTED[1] * REGION_L0
    return page.evaluate(
        """([x0, y0, side]) => {
            const v = window.hipt.viewer, item = v.world.getItemAt(0);
            const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x0, y0));
            const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x0 + side, y0 + side));
            const osd = document.getElementById("osd").getBoundingClientRect();
            const nav = v.navigator.element.getBoundingClientRect();
            return {region: [a.x, a.y, b.x, b.y],
                    nav: [nav.left - osd.left, nav.top - osd.top, nav.right - osd.left, nav.bottom - osd.top]};
        }""",
        [x0, y0, REGION_L0],
    )


def _mask(shape, box, grow: float) -> np.ndarray:
    h, w = shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    x0, y0, x1, y1 = box
    return (xs >= x0 - grow) & (xs < x1 + grow) & (ys >= y0 - grow) & (ys < y1 + grow)


def test_overlay_toggle_changes_only_the_planted_region(browser, viewer_url, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors, tiles = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: tiles.append((r.url, r.status)))
    page.goto(viewer_url + "?slide=planted")
    _wait_idle(page)
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    slide_tiles = [s for u, s in tiles if "/tiles/planted/" in u]
    overlay_tiles = [s for u, s in tiles if "/overlay/planted/0/" in u]
    assert len(slide_tiles) >= 4 and set(slide_tiles) == {200}
    assert len(overlay_tiles) >= 4 and set(overlay_tiles) == {200}
    assert page.evaluate("window.hipt.failed") == []

    # The pointer rests on the side panel for every picture: OpenSeadragon draws its zoom
    # buttons differently while the pointer is over the viewer.
    page.mouse.move(1090, 710)
    page.wait_for_timeout(300)
    with_overlay = _pixels(page).astype(int)
    rects = _rects(page)
    page.uncheck("#overlay-0")
    _wait_idle(page)
    without = _pixels(page).astype(int)
    diff = np.abs(with_overlay - without).max(axis=2)

    inside = _mask(diff.shape, rects["region"], grow=-3)
    elsewhere = ~_mask(diff.shape, rects["region"], grow=3) & ~_mask(diff.shape, rects["nav"], 2)
    assert inside.sum() > 5_000  # the region is large on screen
    assert (diff[inside] > 10).mean() > 0.95, "the overlay did not change the planted region"
    ys, xs = np.nonzero(elsewhere & (diff > 2))
    where = f"{len(xs)} px in x {xs.min()}-{xs.max()}, y {ys.min()}-{ys.max()}" if len(xs) else ""
    assert diff[elsewhere].max() <= 2, (
        f"pixels changed outside the planted region: {where}, {rects}"
    )

    page.check("#overlay-0")
    _wait_idle(page)
    again = np.abs(_pixels(page).astype(int) - with_overlay).max(axis=2)
    assert again[~_mask(diff.shape, rects["nav"], 2)].max() <= 2  # back as it was

    # Opacity 1: the planted region shows the colormap's colour of 0.95 itself.
    page.evaluate(
        """() => { const s = document.getElementById("opacity-0");
                   s.value = "1"; s.dispatchEvent(new Event("input")); }"""
    )
    page.wait_for_timeout(400)
    _wait_idle(page)
    x0, y0, x1, y1 = rects["region"]
    centre = _pixels(page)[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
    expected = np.array(colormap_lut("coolwarm")[round(0.95 * 255)], dtype=int)
    assert np.abs(centre - expected).max() <= 2, (centre, expected)
    assert errors == []
    page.close()


def test_click_hover_scale_bar_and_cohort(browser, viewer_url):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(viewer_url)
    # Two slides: the cohort list first, sortable, each row opening the viewer.
    page.wait_for_selector("#cohort-table tbody tr")
    first = lambda: page.locator("#cohort-table tbody tr").first.inner_text()  # noqa: E731
    assert first().startswith("planted")
    page.click("#cohort-table th[data-key=slide_id]")
    assert first().startswith("second")
    page.click("#cohort-table tbody tr >> text=planted")
    page.wait_for_url(re.compile(r"\?slide=planted$"))
    _wait_idle(page)

    box = _rects(page)["region"]
    osd = page.locator("#osd").bounding_box()
    cx, cy = osd["x"] + (box[0] + box[2]) / 2, osd["y"] + (box[1] + box[3]) / 2
    page.mouse.move(cx, cy)
    page.wait_for_function("document.getElementById('hover').textContent.includes('0.950')")
    page.mouse.click(cx, cy)
    page.wait_for_function("document.getElementById('region').textContent.includes('Top patches')")
    region_text = page.inner_text("#region")
    assert "attention" in region_text and "0.950" in region_text
    assert re.search(r"x 1024, y 0, 1024 × 1024 px", region_text)
    assert re.fullmatch(r"\d+(\.\d+)? (µm|mm)", page.inner_text("#scalebar-label"))
    assert errors == []
    page.close()
