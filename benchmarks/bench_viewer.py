"""``hipt view`` on a 100,000 × 100,000 px slide: time to the first screen, and tile latency.

One generated Aperio SVS (0.25 µm/px, 4× pyramid, ``hipt.synthetic``; generated once and cached,
which takes minutes) with an attention heatmap of its 12 × 12 regions (token resolution, three
channels, the test inputs' NGFF writer). In the same run it measures:

* ``open``: a fresh server (``ViewerApp`` + HTTP in this process) answers what the page asks on
  load (the page, OpenSeadragon, the cohort, the slide's info, which opens the slide and its
  attention) and then every slide and overlay tile of the first screen of a 1280 × 800 viewer
  (the home view's level and the two below it, as OpenSeadragon fills in), over 6 connections as
  a browser does. Goal < 2 s. Rows for the fast reader (``--reader auto``) and OpenSlide.
* ``browser open`` (when Debian's chromium and playwright are there): the real page in headless
  Chromium, from navigation until every shown image reports fully loaded.
* ``tile``: requests of tiles not seen before at the three finest levels, one at a time, on a warm
  server (slide open): the median must be < 100 ms; ``cached`` repeats them (LRU hits).
* ``baseline``: openslide-python's ``DeepZoomGenerator.get_tile`` + JPEG encode of the same tiles,
  in process with no HTTP: the floor any Deep Zoom server over OpenSlide pays.

Usage::

    python benchmarks/bench_viewer.py                 # 100,000² slide, 200 tiles
    python benchmarks/bench_viewer.py --size 30000 --tiles 100

Results, with the machine named, go in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import http.client
import math
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the NGFF writer of the test inputs

VIEWPORT = (1280, 800)
CONNECTIONS = 6  # what a browser opens per host


def make_inputs(cache: Path, size: int) -> tuple[Path, Path]:
    from viewer_inputs import planted_heatmap

    from hipt import synthetic
    from hipt.atomic import atomic_path

    cache.mkdir(parents=True, exist_ok=True)
    slide = cache / f"bench_viewer_{size}.svs"
    if not slide.exists():
        print(f"generating {slide.name} ({size:,} px square; cached for later runs)...", flush=True)
        t = time.perf_counter()
        with atomic_path(slide) as tmp:
            synthetic.write_svs(
                tmp, size, size, mpp=0.25, seed=7, n_blobs=5, nuclei=False, reuse_interior=True
            )
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    heat = cache / f"bench_viewer_{size}_heatmaps"
    if not (heat / slide.stem / "attention.geojson").exists():
        region = 4096 * 0.5 / 0.25
        n = math.ceil(size / region)
        rng = random.Random(0)
        scored = {(c, r): rng.random() for c in range(n) for r in range(n)}
        planted_heatmap(heat, slide.stem, size, size, 0.25, scored)
    return slide, heat


class Client:
    """Keep-alive HTTP connections, one per thread, like a browser's per-host pool."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def get(self, path: str) -> bytes:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {body[:200]!r}")
        return body


def first_screen(info: dict) -> list[str]:
    """Slide and first-overlay tile URLs of the home view of a VIEWPORT-sized viewer."""
    w, h = info["width"], info["height"]
    fit = min(VIEWPORT[0] / w, VIEWPORT[1] / h)  # home view: the whole slide fits
    top = info["max_level"]
    home = top - max(0, math.floor(math.log2(1 / fit)))  # finest level not smaller than shown
    urls = []
    for level in range(max(0, home - 2), home + 1):
        scale = 2 ** (top - level)
        cols = math.ceil(math.ceil(w / scale) / info["tile_size"])
        rows = math.ceil(math.ceil(h / scale) / info["tile_size"])
        for template in [info["tile_url"]] + [o["url"] for o in info["overlays"][:1]]:
            urls += [
                template.format(level=level, col=c, row=r) for r in range(rows) for c in range(cols)
            ]
    return urls


def start(slide: Path, heat: Path, reader: str):
    from heatmaps.viewer.server import ViewerApp, make_server
    from heatmaps.viewer.sources import Catalogue

    app = ViewerApp(Catalogue(slide, heatmaps=heat), reader=reader)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return app, server


def stop(app, server) -> None:
    server.shutdown()
    server.server_close()
    app.close()


def measure_open(slide: Path, heat: Path, reader: str) -> tuple[float, int, dict]:
    import json

    app, server = start(slide, heat, reader)
    try:
        client = Client(server.server_address[1])
        t = time.perf_counter()
        client.get("/")
        client.get("/osd/openseadragon.min.js")
        client.get("/api/slides")
        info = json.loads(client.get(f"/api/slides/{slide.stem}"))
        t_info = time.perf_counter() - t
        urls = first_screen(info)
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(client.get, urls))
        return time.perf_counter() - t, t_info, len(urls), info
    finally:
        stop(app, server)


def measure_browser(slide: Path, heat: Path) -> float | None:
    if not Path("/usr/bin/chromium").exists():
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    app, server = start(slide, heat, "auto")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]})
            t = time.perf_counter()
            # The address hipt view prints for one slide.
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/?slide={slide.stem}")
            page.wait_for_function("window.hipt && window.hipt.idle()", timeout=60_000)
            elapsed = time.perf_counter() - t
            browser.close()
        return elapsed
    finally:
        stop(app, server)


def sample_tiles(info: dict, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` distinct random tile addresses at the three finest levels, over the tissue box."""
    rng = random.Random(seed)
    top, w, h = info["max_level"], info["width"], info["height"]
    out: set[tuple[int, int, int]] = set()
    while len(out) < n:
        level = top - rng.randrange(3)
        scale = 2 ** (top - level)
        cols = math.ceil(math.ceil(w / scale) / info["tile_size"])
        rows = math.ceil(math.ceil(h / scale) / info["tile_size"])
        # The middle half of the slide, where the generated tissue lies.
        out.add(
            (
                level,
                rng.randrange(cols // 4, 3 * cols // 4),
                rng.randrange(rows // 4, 3 * rows // 4),
            )
        )
    return sorted(out, key=lambda _: rng.random())


def time_each(fn, items) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--tiles", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hipt-bench-slides")
    args = ap.parse_args()
    slide, heat = make_inputs(args.cache, args.size)
    # Read the file once so no row pays for the disk (the page cache is warm for every method).
    with open(slide, "rb") as fh:
        while fh.read(64 << 20):
            pass

    rows = []
    for reader in ("auto", "openslide"):
        seconds, before_tiles, n, info = measure_open(slide, heat, reader)
        what = f"page, info ({before_tiles * 1000:.0f} ms), then {n} tiles"
        rows.append((f"open, reader {reader}", what, seconds * 1000, "< 2000"))
    browser = measure_browser(slide, heat)
    if browser is not None:
        rows.append(
            ("browser open (headless Chromium)", "page + first screen", browser * 1000, "< 2000")
        )

    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from heatmaps.viewer.tiles import OVERLAP, TILE_SIZE, encode_jpeg

    tiles = sample_tiles(info, args.tiles)
    app, server = start(slide, heat, "auto")
    try:
        client = Client(server.server_address[1])
        client.get(f"/api/slides/{slide.stem}")  # warm: slide and attention open
        sid = slide.stem
        slide_urls = [f"/tiles/{sid}/{lv}/{c}_{r}.jpeg" for lv, c, r in tiles]
        overlay_urls = [f"/overlay/{sid}/1/{lv}/{c}_{r}.png" for lv, c, r in tiles]
        cold = time_each(client.get, slide_urls)
        cached = time_each(client.get, slide_urls)
        overlay = time_each(client.get, overlay_urls)
        overlay_cached = time_each(client.get, overlay_urls)
    finally:
        stop(app, server)
    dz = DeepZoomGenerator(openslide.OpenSlide(slide), TILE_SIZE, OVERLAP)
    base = time_each(lambda t: encode_jpeg(dz.get_tile(t[0], (t[1], t[2]))), tiles)

    def stat(name, values, goal):
        ms = sorted(v * 1000 for v in values)
        p90 = ms[int(0.9 * (len(ms) - 1))]
        rows.append((name, f"median of {len(ms)} (p90 {p90:.1f})", statistics.median(ms), goal))

    stat("slide tile, new (warm server)", cold, "< 100")
    stat("slide tile, cached", cached, "")
    stat("overlay tile, new", overlay, "< 100")
    stat("overlay tile, cached", overlay_cached, "")
    stat("baseline: DeepZoomGenerator.get_tile + JPEG, no HTTP", base, "")

    print(
        f"\nmachine: {platform.machine()}, {platform.processor() or '?'}; slide {args.size:,}² SVS"
    )
    print("| what | n | ms | goal |\n|---|---|---|---|")
    for name, n, ms, goal in rows:
        print(f"| {name} | {n} | {ms:.1f} | {goal} |")


if __name__ == "__main__":
    main()
