"""`hipt heatmap` end to end on a planted run: the planted region, patch and token light up at
their level-0 places in the PNGs, the OME-Zarr and the GeoJSON; formats pass their validators.

The run (:mod:`heatmaps.planted`) is a generated slide with a black token-sized square, features
written directly, and a fold folder whose slide model and encoders are set by hand so that one
region, one patch (of every region) and the black token dominate their levels.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import geojson
import h5py
import numpy as np
import pytest
import shapely
from PIL import Image

from heatmaps.colors import colorize
from heatmaps.ngff import AttentionZarr
from heatmaps.planted import make_planted_run
from heatmaps.render import TITLE_PX
from hipt.models.checkpoint import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def hipt_heatmap(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipt.cli", "heatmap", *map(str, args), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_run(tmp_path_factory.mktemp("planted"), grid=(3, 2))


@pytest.fixture(scope="module")
def weights(planted):
    return ["--vit256", planted.vit256_path, "--vit4k", planted.vit4k_path]


@pytest.fixture(scope="module")
def rendered(planted, weights):
    """One full render (all levels, top-1 region, two smoothing passes) through the real CLI."""
    out = planted.root / "heatmaps"
    p = hipt_heatmap(
        "--run",
        planted.fold_dir,
        "--features",
        planted.features_path,
        *weights,
        "--top-k",
        1,
        "--set",
        "smoothing.passes=2",
        "--set",
        "thumbnail_px=1024",
        "--out",
        out,
    )
    assert p.returncode == 0, p.stderr
    return out / "planted"


def _box_px(box, d):
    x, y, side = box
    return int(x // d), int(y // d), max(1, int(math.ceil(side / d)))


# --------------------------------------------------------------------------- outputs
def test_every_output_is_written(rendered):
    names = {p.name for p in rendered.iterdir()}
    assert {
        "slide.png",
        "top_regions",
        "attention.ome.zarr",
        "attention.geojson",
        "heatmap.json",
        "scores.h5",
    } <= names
    assert sorted(p.name for p in (rendered / "top_regions").iterdir()) == [
        "rank1.png",
        "rank1_heads.png",
    ]
    # No temporary folder or slide lock left (the record's file lock stays, as a side file).
    left = [p.name for p in rendered.parent.iterdir() if p.name.startswith(".")]
    assert left == [".heatmaps.csv.lock"]


def test_heatmap_json_records_inputs(rendered, planted):
    rec = json.loads((rendered / "heatmap.json").read_text())
    assert rec["features"]["sha256"] == file_sha256(planted.features_path)
    assert rec["run"]["checkpoint_sha256"] == file_sha256(planted.fold_dir / "best.pt")
    assert rec["run"]["fold"] == 0 and rec["run"]["model"] == "abmil"
    assert rec["weights"]["vit256_sha256"] == file_sha256(planted.vit256_path)
    assert rec["config"]["top_k"] == 1 and rec["config"]["colormap"] == "turbo"
    probs = rec["prediction"]["probabilities"]
    assert set(probs) == {"normal", "tumour"} and sum(probs.values()) == pytest.approx(1.0)
    assert rec["top_regions"][0]["region"] == planted.planted_region
    assert rec["slide"]["size_level0"] == [6144, 4096]


def test_slide_png_lights_planted_region(rendered, planted):
    png = np.asarray(Image.open(rendered / "slide.png").convert("RGB")).astype(float)
    with_overlay = colorize(np.array(1.0), "turbo").astype(float)
    # The thumbnail sits at the top-left below the title strip (see render.py).
    thumb_h = png.shape[0] - TITLE_PX
    scale = thumb_h / 4096  # thumbnail px per level-0 px
    scores = []
    for x, y in planted.coords:
        x0, y0 = int((x + 512) * scale), int(TITLE_PX + (y + 512) * scale)
        x1, y1 = int((x + 1536) * scale), int(TITLE_PX + (y + 1536) * scale)
        mean = png[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        scores.append(-np.abs(mean - (0.5 * with_overlay + 0.5 * 242)).sum())
    assert int(np.argmax(scores)) == planted.planted_region


def test_zarr_validates_and_opens_as_ngff(rendered):
    from ngff_zarr import from_ngff_zarr
    from ngff_zarr.validate import validate

    path = rendered / "attention.ome.zarr"
    attrs = json.loads((path / ".zattrs").read_text())
    validate(attrs, version="0.4", model="image", strict=True)
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    ms = from_ngff_zarr(str(path), validate=True)
    assert ms.images[0].dims == ("c", "y", "x")
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["region", "patch", "token"]
    assert all(
        c["window"]["start"] == 0 and c["window"]["end"] == 1 for c in attrs["omero"]["channels"]
    )


def test_zarr_scales_agree_with_downsample_and_slide(rendered, planted):
    z = AttentionZarr(rendered / "attention.ome.zarr")
    d = z.downsamples[0]
    assert d == pytest.approx(16 * 0.5 / planted.mpp_level0)  # one token by default
    ms = z.metadata["multiscales"][0]
    for s, (arr, ds) in enumerate(zip(z.arrays, ms["datasets"], strict=True)):
        assert arr.shape[1:] == (math.ceil(4096 / (d * 2**s)), math.ceil(6144 / (d * 2**s)))
        scale = ds["coordinateTransformations"][0]["scale"]
        assert scale == pytest.approx(
            [1.0, d * 2**s * planted.mpp_level0] * 1 + [d * 2**s * planted.mpp_level0]
        )
    base = z.read(0, "region")
    assert 0.0 <= base.min() and base.max() <= 1.0


def test_zarr_lights_planted_region_patch_and_token(rendered, planted):
    z = AttentionZarr(rendered / "attention.ome.zarr")
    d = z.downsamples[0]
    side = planted.region_size_level0
    region = z.read(0, "region")
    for i, (x, y) in enumerate(planted.coords):
        v = z.value_at("region", x + side / 2, y + side / 2)
        assert (v == 1.0) == (i == planted.planted_region), (i, v)
    # The planted patch is the most attended patch of its region.
    patch = z.read(0, "patch")
    x, y = planted.planted_region_xy
    r0, c0, n = int(y // d), int(x // d), int(side // d)
    inside = patch[r0 : r0 + n, c0 : c0 + n]
    px, py, cell = planted.patch_box()
    row, col = np.unravel_index(np.argmax(inside), inside.shape)
    assert px <= (c0 + col + 0.5) * d < px + cell and py <= (r0 + row + 0.5) * d < py + cell
    # The token channel peaks on the planted token, and only the top region has tokens.
    token = z.read(0, "token")
    row, col = np.unravel_index(np.argmax(token), token.shape)
    tx, ty, tside = planted.token_box()
    assert tx <= (col + 0.5) * d < tx + tside and ty <= (row + 0.5) * d < ty + tside
    assert token[:, : int(planted.coords[planted.planted_region][0] // d)].max() == 0
    assert region.shape == token.shape


def test_geojson_is_valid_qupath_and_lights_planted(rendered, planted):
    text = (rendered / "attention.geojson").read_text()
    fc = geojson.loads(text)
    assert fc.is_valid, fc.errors()
    w, h = 6144, 4096
    regions, patches = [], []
    for f in fc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        poly = shapely.geometry.shape(f["geometry"])
        assert shapely.is_valid(poly), shapely.validation.explain_validity(poly)
        x0, y0, x1, y1 = poly.bounds
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        props = f["properties"]
        assert props["objectType"] in ("tile", "detection")
        assert (
            set(props["classification"]) == {"name", "color"}
            and len(props["classification"]["color"]) == 3
        )
        assert isinstance(props["measurements"], dict)
        assert 0 < props["measurements"]["attention_rank"] <= 1
        (regions if props["classification"]["name"] == "region" else patches).append((poly, props))
    assert len(regions) == 6 and len(patches) == 256  # every region, the patches of the top one
    best = max(regions, key=lambda rp: rp[1]["measurements"]["attention"])[0]
    x, y = planted.planted_region_xy
    assert best.bounds == (x, y, x + 2048, y + 2048)
    best_patch = max(patches, key=lambda rp: rp[1]["measurements"]["attention"])[0]
    px, py, cell = planted.patch_box()
    assert best_patch.bounds == (px, py, px + cell, py + cell)


def test_top_region_token_map_peaks_on_planted_token(rendered, planted):
    with h5py.File(rendered / "scores.h5", "r") as f:
        assert int(f["top_regions"][0]) == planted.planted_region
        tokens = f[f"token_attention/{planted.planted_region}"][()]  # [heads, 1024, 1024] raw
        patch_raw = f["patch_attention"][planted.planted_region]  # [heads, 256]
    assert tokens.shape == (6, 1024, 1024)
    x, y = planted.planted_region_xy
    tx, ty, tside = planted.token_box()
    per_px = 2048 / 1024  # level-0 px per map px
    for head in tokens:
        row, col = np.unravel_index(np.argmax(head), head.shape)
        assert (
            tx <= x + (col + 0.5) * per_px < tx + tside
            and ty <= y + (row + 0.5) * per_px < ty + tside
        )
        assert head.max() > 0.5  # the black token takes most of its patch's attention
    assert (patch_raw.argmax(1) == planted.planted_patch).all()
    # Two passes, the second read 136 px (at 0.5 µm/px) right and down. Had it reused the first
    # pass's pixels (the original's bug), its peak would sit 34 map px off the planted token.
    rec = json.loads((rendered / "heatmap.json").read_text())
    assert rec["top_regions"][0]["shifts_px"] == [0, 136]
    mean = tokens.mean(0)
    row, col = np.unravel_index(np.argmax(mean), mean.shape)
    assert mean[row + 34, col + 34] < 0.2 * mean[row, col]
    png = np.asarray(Image.open(rendered / "top_regions" / "rank1.png"))
    assert png.shape[1] > 3 * 1024  # plain, patch and token panels side by side


def test_rerun_with_same_inputs_skips(rendered, planted, weights, capsys):
    from hipt.cli import main

    before = (rendered / "heatmap.json").stat().st_mtime_ns
    args = ["--run", planted.fold_dir, "--features", planted.features_path, *weights, "--top-k", 1]
    args += ["--set", "smoothing.passes=2", "--set", "thumbnail_px=1024", "--out", rendered.parent]
    assert main(["heatmap", *map(str, args)]) == 0
    assert "0 rendered, 1 skipped" in capsys.readouterr().err
    assert (rendered / "heatmap.json").stat().st_mtime_ns == before
    rows = (rendered.parent / "heatmaps.csv").read_text().splitlines()
    assert rows[1].startswith("planted,skipped")
