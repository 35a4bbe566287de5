"""``hipt view``'s server over real HTTP: Deep Zoom tiles against openslide-python's generator,
overlay colours at known attention values, region lookup, the cohort list, cache headers and
every refusal (traversal, encoded traversal, symlinks out, bad parameters, other hosts)."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import matplotlib
import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from viewer_inputs import planted_heatmap

from heatmaps.viewer.server import ViewerApp, make_server
from heatmaps.viewer.sources import Catalogue
from heatmaps.viewer.tiles import OVERLAP, TILE_SIZE, TileCache
from hipt import synthetic

SLIDE_PX = 2048
MPP = 2.0  # a 4096 px region at 0.5 µm/px is 1024 level-0 px: 2 x 2 regions
SCORED = {(0, 0): 0.2, (1, 0): 0.5, (0, 1): 1.0}  # region (1, 1) is unscored (0: no value)


class Server:
    """A viewer server on a free loopback port, in a thread of this process."""

    def __init__(self, app: ViewerApp) -> None:
        self.app = app
        self.httpd = make_server(app, "127.0.0.1", 0)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str, headers: dict | None = None, method: str = "GET"):
        """Send ``path`` exactly as written (no client-side normalisation of ``..``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        for k, v in sent.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp, body

    def json(self, path: str):
        resp, body = self.get(path)
        assert resp.status == 200, body
        return json.loads(body)

    def image(self, path: str) -> Image.Image:
        resp, body = self.get(path)
        assert resp.status == 200, body
        return Image.open(io.BytesIO(body))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.close()


@pytest.fixture(scope="module")
def viewer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("viewer")
    slides, heat, outside = root / "slides", root / "heatmaps", root / "outside"
    for d in (slides, heat, outside):
        d.mkdir()
    synthetic.write_generic_tiff(slides / "planted.tiff", SLIDE_PX, SLIDE_PX, mpp=MPP, seed=4)
    synthetic.write_svs(slides / "scan.svs", 3000, 2200, mpp=0.25, seed=5)
    synthetic.write_not_a_slide(slides / "notes.svs")
    planted_heatmap(heat, "planted", SLIDE_PX, SLIDE_PX, MPP, SCORED)
    # A link in the slide folder to a slide outside it must not be served.
    synthetic.write_generic_tiff(outside / "secret.tiff", 512, 512, mpp=0.5, seed=6)
    (slides / "escape.tiff").symlink_to(outside / "secret.tiff")
    return {"root": root, "slides": slides, "heatmaps": heat, "outside": outside}


@pytest.fixture(scope="module")
def server(viewer_files):
    app = ViewerApp(Catalogue(viewer_files["slides"], heatmaps=viewer_files["heatmaps"]))
    srv = Server(app)
    yield srv
    srv.close()


def _decode(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB"))


# ------------------------------------------------------------------------------ slide tiles
@pytest.mark.parametrize("slide_id, name", [("planted", "planted.tiff"), ("scan", "scan.svs")])
def test_levels_and_tile_sizes_match_deepzoom(server, viewer_files, slide_id, name):
    dz = DeepZoomGenerator(openslide.OpenSlide(viewer_files["slides"] / name), TILE_SIZE, OVERLAP)
    info = server.json(f"/api/slides/{slide_id}")
    assert info["max_level"] == dz.level_count - 1
    assert (info["width"], info["height"]) == dz.level_dimensions[-1]
    _, dzi = server.get(f"/dzi/{slide_id}.dzi")
    assert dzi.decode() == dz.get_dzi("jpeg")
    for level in range(dz.level_count):
        cols, rows = dz.level_tiles[level]
        for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
            url = info["tile_url"].format(level=level, col=col, row=row)
            assert server.image(url).size == dz.get_tile_dimensions(level, (col, row)), url
        resp, body = server.get(f"/tiles/{slide_id}/{level}/{cols}_0.jpeg")
        assert resp.status == 404 and b"out of range" in body


@pytest.mark.parametrize("slide_id, name", [("planted", "planted.tiff"), ("scan", "scan.svs")])
def test_tile_pixels_match_deepzoom(server, viewer_files, slide_id, name):
    dz = DeepZoomGenerator(openslide.OpenSlide(viewer_files["slides"] / name), TILE_SIZE, OVERLAP)
    top = dz.level_count - 1
    for level, col, row in [(top, 1, 1), (top, 3, 2), (top - 1, 1, 0), (top - 3, 0, 0)]:
        ours = _decode(server.image(f"/tiles/{slide_id}/{level}/{col}_{row}.jpeg")).astype(int)
        ref = np.asarray(dz.get_tile(level, (col, row))).astype(int)
        assert ours.shape == ref.shape
        # Our JPEG (quality 85) of the same pixels: small mean error, no misplaced tile.
        assert np.abs(ours - ref).mean() < 3.0, (level, col, row)


def test_tiles_carry_cache_headers_and_revalidate(server):
    resp, body = server.get("/tiles/planted/10/1_1.jpeg")
    assert resp.status == 200 and resp.getheader("Content-Type") == "image/jpeg"
    assert re.fullmatch(r"public, max-age=\d+", resp.getheader("Cache-Control"))
    etag = resp.getheader("ETag")
    again, empty = server.get("/tiles/planted/10/1_1.jpeg", {"If-None-Match": etag})
    assert again.status == 304 and empty == b""
    other, _ = server.get("/overlay/planted/0/10/1_1.png", {"If-None-Match": etag})
    assert other.status == 200  # another tile's ETag does not match


def test_tile_cache_is_bounded_in_bytes():
    cache = TileCache(max_bytes=1000)
    for i in range(50):
        cache.get_or_make(i, lambda: b"x" * 300)
    assert cache.bytes <= 1000 and len(cache) == 3
    assert 49 in cache and 0 not in cache
    calls = []
    cache.get_or_make(49, lambda: calls.append(1) or b"y")
    assert calls == [] and cache.hits == 1


# ------------------------------------------------------------------------------ overlays
def _expected(cmap: str, value: float) -> list[int]:
    """The colour of ``value`` straight from matplotlib (256-entry map, value * 255 rounded)."""
    rgba = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[int(round(value * 255))]
    return [int(round(c * 255)) for c in rgba[:3]]


@pytest.mark.parametrize("cmap", ["coolwarm", "viridis"])
def test_overlay_colours_at_known_values(server, cmap):
    # Level 7 is 128 px for the 2048 px slide: one tile, 64 px per region.
    tile = _decode(server.image(f"/overlay/planted/0/7/0_0.png?cmap={cmap}"))
    assert tile.shape == (128, 128, 4)
    for (col, row), value in SCORED.items():
        block = tile[row * 64 + 1 : row * 64 + 63, col * 64 + 1 : col * 64 + 63]
        assert (block[..., 3] == 255).all()
        assert (block[..., :3] == _expected(cmap, value)).all(), (col, row, value)
    assert (tile[65:127, 65:127, 3] == 0).all()  # unscored region: transparent


def test_overlay_threshold_hides_low_attention(server):
    tile = _decode(server.image("/overlay/planted/0/7/0_0.png?min=0.6"))
    assert (tile[1:63, 1:63, 3] == 0).all()  # 0.2
    assert (tile[1:63, 65:127, 3] == 0).all()  # 0.5
    assert (tile[65:127, 1:63, 3] == 255).all()  # 1.0


def test_overlay_is_nearest_at_region_and_patch_borders(server):
    # Level 11 is full resolution; tile column 4 starts at level-0 x = 4 * 254 - 1 = 1015,
    # so the region border x = 1024 falls at tile pixel 9.
    tile = _decode(server.image("/overlay/planted/0/11/4_0.png"))
    row = tile[20, :, :3]
    left, right = _expected("coolwarm", 0.2), _expected("coolwarm", 0.5)
    assert (row[:9] == left).all() and (row[9:] == right).all()
    # Patch channel: 16 patches of 64 px per region, values rise by column; patch
    # borders are hard steps at multiples of 64 level-0 px.
    patch = _decode(server.image("/overlay/planted/1/11/0_0.png"))[10, :, :3].astype(int)
    steps = np.nonzero(np.abs(np.diff(patch, axis=0)).sum(1))[0] + 1
    assert steps.tolist() == [64, 128, 192]


def test_overlay_tile_sizes_follow_slide_tiles(server):
    for level, col, row in [(11, 0, 0), (11, 8, 8), (9, 1, 1), (2, 0, 0)]:
        slide = server.image(f"/tiles/planted/{level}/{col}_{row}.jpeg")
        overlay = server.image(f"/overlay/planted/2/{level}/{col}_{row}.png")
        assert overlay.size == slide.size and overlay.mode == "RGBA"


# ------------------------------------------------------------------------------ JSON API
def test_region_under_a_point_with_top_patches(server):
    data = server.json("/api/region/planted?x=1500&y=300")
    region = data["region"]
    assert region["measurements"] == {"attention": 0.5}
    assert region["bbox"] == [1024.0, 0.0, 2048.0, 1024.0]
    top = region["top_patches"]
    assert len(top) == 5 and top[0]["measurements"]["attention"] == 1.0
    assert top[0]["bbox"][0] == 1024 + 15 * 64  # the last patch column has the most attention
    assert data["values"]["region"] == pytest.approx(0.5)
    assert data["values"]["patch"] == pytest.approx(8 / 16)  # patch column 7: (7 + 1) / 16
    empty = server.json("/api/region/planted?x=1500&y=1500")
    assert empty["region"] is None and empty["values"]["region"] is None


def test_slide_info(server):
    info = server.json("/api/slides/planted")
    assert info["mpp"] == pytest.approx(MPP)
    assert [o["label"] for o in info["overlays"]] == ["region", "patch", "token"]
    assert info["heatmap"] == {"run": "test", "fold": 0}
    assert info["regions"] is True
    assert len(server.app._region_index(server.app.catalogue.get("planted"))) == 3 * (1 + 256)
    scan = server.json("/api/slides/scan")
    assert scan["overlays"] == [] and scan["mpp"] == pytest.approx(0.25)


def test_cohort_lists_slides_with_run_predictions(viewer_files, tmp_path):
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_1").mkdir()
    with open(run / "fold_0" / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "case_id",
                "slide_ids",
                "n_regions",
                "label",
                "label_index",
                "prob_A",
                "prob_B",
                "pred",
            ]
        )
        w.writerow(["c1", "planted;other", 3, "B", 1, 0.2, 0.8, "B"])
    with open(run / "fold_1" / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "case_id",
                "slide_ids",
                "n_regions",
                "label",
                "label_index",
                "prob_A",
                "prob_B",
                "pred",
            ]
        )
        w.writerow(["c2", "scan", 1, "A", 0, 0.4, 0.6, "B"])
    app = ViewerApp(Catalogue(viewer_files["slides"], heatmaps=viewer_files["heatmaps"], run=run))
    srv = Server(app)
    try:
        rows = {r["slide_id"]: r for r in srv.json("/api/slides")["slides"]}
    finally:
        srv.close()
    assert set(rows) == {"planted", "scan", "notes"}  # the link out of the folder is not listed
    assert rows["planted"]["prediction"] == "B" and rows["planted"]["probability"] == 0.8
    assert rows["planted"]["fold"] == "0" and rows["planted"]["heatmap"] is True
    assert rows["scan"]["label"] == "A" and rows["scan"]["fold"] == "1"
    assert rows["scan"]["heatmap"] is False


def test_survival_run_gives_risk(viewer_files, tmp_path):
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "predictions.csv").write_text(
        "case_id,slide_ids,n_regions,survival_months,event,risk\nc1,planted,3,12.5,1,-4.25\n"
        "c2,scan,2,nan,0,1.5\n"
    )
    cat = Catalogue(viewer_files["slides"], run=tmp_path)
    assert cat.get("planted").info == {
        "case_id": "c1",
        "fold": "0",
        "risk": -4.25,
        "survival_months": 12.5,
        "event": 1.0,
    }
    assert cat.get("scan").info["survival_months"] is None  # "nan" is no value, JSON-safe


# ------------------------------------------------------------------------------ refusals
REFUSALS = [
    ("/tiles/planted/12/0_0.jpeg", 404, "level 12 out of range 0..11"),
    ("/tiles/planted/99999999999/0_0.jpeg", 400, "whole number"),
    ("/tiles/planted/5/-1_0.jpeg", 400, "tile column '-1' must be a whole number"),
    ("/tiles/planted/5/0_-3.jpeg", 400, "tile row '-3' must be a whole number"),
    ("/tiles/planted/11/9_0.jpeg", 404, "out of range at level 11"),
    ("/tiles/planted/abc/0_0.jpeg", 400, "level 'abc'"),
    ("/tiles/planted/5/0_0.png", 400, "must be <col>_<row>.jpeg"),
    ("/tiles/nope/0/0_0.jpeg", 404, "unknown slide 'nope'"),
    ("/api/slides/nope", 404, "unknown slide"),
    ("/api/slides/escape", 404, "unknown slide 'escape'"),  # a symlink out of the folder
    ("/api/slides/notes", 422, "cannot be opened"),
    ("/overlay/planted/3/5/0_0.png", 404, "attention channel 3 out of range"),
    ("/overlay/scan/0/5/0_0.png", 404, "has no attention overlay"),
    ("/overlay/planted/0/5/0_0.png?min=2", 400, "must lie in [0, 1]"),
    ("/overlay/planted/0/5/0_0.png?min=nan", 400, "must lie in [0, 1]"),
    ("/overlay/planted/0/5/0_0.png?min=low", 400, "is not a number"),
    ("/overlay/planted/0/5/0_0.png?cmap=nope", 400, "unknown colormap 'nope'"),
    ("/overlay/planted/0/5/0_0.png?path=/etc/passwd", 400, "unknown parameter 'path'"),
    ("/api/region/planted?x=1", 400, "parameter y is required"),
    ("/api/region/planted?x=1&y=inf", 400, "must lie in"),
    ("/api/colormap/nope", 400, "unknown colormap"),
    ("/static/../server.py", 400, "'..' is not allowed"),
    ("/static/%2e%2e/server.py", 400, "'..' is not allowed"),
    ("/static/%2E%2E/%2e%2E/tiles.py", 400, "'..' is not allowed"),
    ("/static/..%2fserver.py", 400, "encodes a separator"),
    ("/static/%2Fetc%2Fpasswd", 400, "encodes a separator"),
    ("/static//etc/passwd", 400, "empty path segment"),
    ("/osd/../../package.json", 400, "'..' is not allowed"),
    ("/static/.hidden", 400, "hidden files"),
    ("/static/%5c..%5cserver.py", 400, "encodes a separator"),
    ("/static/nope.js", 404, "no such file"),
    ("/etc/passwd", 404, "no such page"),
]


@pytest.mark.parametrize("path, status, reason", REFUSALS)
def test_refusals_are_4xx_with_one_line(server, path, status, reason):
    resp, body = server.get(path)
    text = body.decode()
    assert resp.status == status, text
    assert reason in text
    assert text.count("\n") == 1 and "Traceback" not in text
    assert resp.getheader("Content-Type").startswith("text/plain")


def test_absolute_and_backslash_request_targets_are_refused(server):
    for target in ("http://127.0.0.1/etc/passwd", "\\static\\viewer.js", "*"):
        resp, body = server.get(target)
        assert 400 <= resp.status < 500 and body.count(b"\n") == 1, target


def test_server_listens_on_loopback_by_default(viewer_files):
    app = ViewerApp(Catalogue(viewer_files["slides"]))
    httpd = make_server(app)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
    finally:
        httpd.server_close()
        app.close()


def test_other_methods_and_foreign_hosts_are_refused(server):
    resp, body = server.get("/api/slides", method="POST")
    assert resp.status == 405 and body == b"only GET and HEAD are served\n"
    resp, body = server.get("/api/slides", {"Host": "evil.example:80"})
    assert resp.status == 403 and b"not served" in body
    resp, _ = server.get("/api/slides", {"Host": "localhost"})
    assert resp.status == 200


def test_static_symlinks_out_of_the_folder_are_refused(viewer_files, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<p>ok</p>")
    secret = viewer_files["outside"] / "secret.txt"
    secret.write_text("secret")
    (static / "leak.txt").symlink_to(secret)
    (static / "sub").symlink_to(viewer_files["outside"], target_is_directory=True)
    app = ViewerApp(Catalogue(viewer_files["slides"]), static_dir=static)
    srv = Server(app)
    try:
        ok, body = srv.get("/")
        leak, leak_body = srv.get("/static/leak.txt")
        sub, sub_body = srv.get("/static/sub/secret.txt")
    finally:
        srv.close()
    assert ok.status == 200 and body == b"<p>ok</p>"
    for resp, text in ((leak, leak_body), (sub, sub_body)):
        assert resp.status == 403 and b"outside the served folder" in text
        assert b"secret" not in text.replace(b"secret.txt", b"")


def test_heatmap_folder_linked_from_outside_is_ignored(viewer_files, tmp_path):
    heat = tmp_path / "heat"
    heat.mkdir()
    (heat / "planted").symlink_to(viewer_files["heatmaps"] / "planted", target_is_directory=True)
    cat = Catalogue(viewer_files["slides"], heatmaps=heat)
    assert cat.get("planted").heatmap_dir is None


# ------------------------------------------------------------------------------ CLI
def test_hipt_view_binds_to_localhost_and_serves(viewer_files):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "hipt.cli", "view", str(viewer_files["slides"]), "--port", "0"]
    cmd += ["--heatmaps", str(viewer_files["heatmaps"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + proc.stderr.read()
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
        conn.request("GET", "/api/slides")
        slides = json.loads(conn.getresponse().read())["slides"]
        assert {s["slide_id"] for s in slides} == {"planted", "scan", "notes"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "escape.tiff: skipped, it is a link to a file outside" in proc.stderr.read()


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/folder"], "no such slide or folder"),
        (["SLIDES", "--heatmaps", "/no/such"], "no such heatmaps folder"),
        (["SLIDES", "--cmap", "nope"], "unknown colormap 'nope'"),
        (["SLIDES", "--port", "70000"], "must lie in 0..65535"),
    ],
)
def test_hipt_view_bad_arguments(viewer_files, args, message):
    args = [str(viewer_files["slides"]) if a == "SLIDES" else a for a in args]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "hipt.cli", "view", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_test_inputs_follow_ngff(viewer_files):
    ngff_zarr = pytest.importorskip("ngff_zarr")
    ms = ngff_zarr.from_ngff_zarr(
        str(viewer_files["heatmaps"] / "planted" / "attention.ome.zarr"), validate=True
    )
    assert [a.name for a in ms.metadata.axes] == ["c", "y", "x"]
