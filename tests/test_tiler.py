"""The region grid and the tiler, checked against the generated slides' true geometry."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hipt.h5schema import TILES_REQUIRED_ATTRS, read_tiles
from hipt.slide import Slide
from preprocessing.tiler import (
    CSV_COLUMNS,
    TileSettings,
    collect_slides,
    region_grid,
    tile_batch,
    tile_slide,
)
from preprocessing.tissue import TissueMask

DICOM = Path(__file__).parent / "data" / "dicom_boxes"


def _mask(shape, ds, boxes):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    img = np.full((*shape, 3), 240, np.uint8)
    return TissueMask(m, img, float(ds), ds * 0.5, 0.1, np.zeros(shape, bool))


def test_grid_is_anchored_at_the_tissue_box():
    tm = _mask((64, 64), 32, [(8, 40, 8, 24)])  # level-0 x 256..768, y 256..1280
    g = region_grid(tm, 512, 0.25)
    assert g.origin_level0 == (256, 256) and g.grid_shape == (2, 1)
    assert g.coords.tolist() == [[256, 256], [256, 768]]
    assert g.coords.dtype == np.int64
    assert np.allclose(g.tissue_fraction, [1.0, 1.0])


def test_threshold_and_small_fragments():
    # A 24x16 px block (fractions 1.0 and 0.5) and a lone 2x2 px fragment far away.
    tm = _mask((64, 64), 32, [(8, 32, 8, 24), (50, 52, 50, 52)])
    g = region_grid(tm, 512, 0.6)
    assert g.grid_shape == (3, 3)
    got = {tuple(c): round(float(f), 4) for c, f in zip(g.coords, g.tissue_fraction, strict=True)}
    # (256, 768) holds 8x16 of 16x16 px: 0.5 < 0.6, dropped, but its fragment is touched by
    # the kept (256, 256) region. The lone fragment keeps its own region.
    assert got == {(256, 256): 1.0, (1280, 1280): round(4 / 256, 4)}


def test_min_tissue_zero_keeps_no_empty_region():
    # Two fragments at opposite corners: the cells between them are bare glass.
    tm = _mask((64, 64), 32, [(0, 8, 0, 8), (56, 64, 56, 64)])
    g = region_grid(tm, 512, 0.0)
    assert g.grid_shape == (4, 4)
    assert g.coords.tolist() == [[0, 0], [1536, 1536]]
    assert (g.tissue_fraction > 0).all()


def test_fraction_counts_outside_the_slide_as_glass():
    tm = _mask((10, 10), 100, [(0, 10, 0, 10)])  # the whole 1000 px slide is tissue
    g = region_grid(tm, 2000, 0.2)
    assert g.coords.tolist() == [[0, 0]]
    assert g.tissue_fraction[0] == pytest.approx(0.25)


def _true_fractions(synth, coords, region0, fine_mpp=4.0):
    truth = synth.tissue_mask(fine_mpp)
    f = fine_mpp / synth.mpp
    out = []
    for x, y in coords:
        x0, y0 = round(x / f), round(y / f)
        n = round(region0 / f)
        out.append(truth[y0 : y0 + n, x0 : x0 + n].sum() / (n * n))
    return np.array(out)


def _true_origin(synth, min_fragment_um2, mpp=2.0):
    """Top-left (level 0) of the true tissue, without fragments the segmentation drops."""
    from scipy import ndimage

    m = synth.tissue_mask(mpp)
    labels, _ = ndimage.label(m)
    sizes = np.bincount(labels.ravel()) * mpp * mpp
    big = (sizes >= min_fragment_um2)[labels] & m
    ys, xs = np.nonzero(big)
    f = mpp / synth.mpp
    return xs.min() * f, ys.min() * f


def test_regions_match_the_true_geometry(tiff_pen, tmp_path):
    # 1024 px regions at 0.5 µm/px: a grid of several regions on this 4096x3072 slide.
    settings = TileSettings(region_px=1024, min_tissue=0.25)
    r = tile_slide(tiff_pen.path, tmp_path, settings)
    assert r.status == "ok", r.error
    t = read_tiles(tmp_path / "tiles" / "tiff_pen.h5")
    assert len(t) == r.n_regions > 3
    region0 = t.attrs["region_size_level0"]
    assert region0 == 1024
    # The grid starts at the true tissue box (to the segmentation's resolution) and steps 1024.
    bx0, by0 = _true_origin(tiff_pen, settings.seg.min_fragment_um2)
    ox, oy = t.attrs["grid_origin_level0"]
    step = t.attrs["tissue_mask_mpp"] / tiff_pen.mpp
    assert abs(ox - bx0) <= 2 * step and abs(oy - by0) <= 2 * step
    assert ((t.coords - [ox, oy]) % region0 == 0).all()
    # Stored tissue fractions agree with the truth; every truly tissue-rich cell is kept.
    true = _true_fractions(tiff_pen, t.coords, region0)
    assert np.abs(true - t.tissue_fraction).max() < 0.08
    rows, cols = t.attrs["grid_shape"]
    all_cells = np.array(
        [[ox + i * region0, oy + j * region0] for j in range(rows) for i in range(cols)]
    )
    all_true = _true_fractions(tiff_pen, all_cells, region0)
    kept = {tuple(c) for c in t.coords.tolist()}
    for c, f in zip(all_cells.tolist(), all_true, strict=True):
        if f >= 0.33:
            assert tuple(c) in kept, (c, f)
    # Row-major order: sorted by y, then x.
    order = np.lexsort((t.coords[:, 0], t.coords[:, 1]))
    assert (order == np.arange(len(order))).all()


def test_attrs_and_clam_compatibility(svs_025, tmp_path):
    r = tile_slide(svs_025.path, tmp_path, TileSettings(reader="openslide"))
    assert r.status == "ok" and r.mpp_source == "openslide.mpp-x" and r.mpp_level0 == 0.25
    t = read_tiles(tmp_path / "tiles" / "svs_025.h5")
    for key in TILES_REQUIRED_ATTRS:
        assert key in t.attrs
    a = t.attrs
    assert a["schema"] == "hipt.tiles/1"
    assert a["slide_size"] == [4096, 4096]
    assert a["region_size"] == 4096 and a["region_size_level0"] == 8192
    assert a["read_level"] == 0 and a["region_size_read_level"] == 8192
    assert a["patch_size"] == 256 and a["token_size"] == 16
    assert a["target_mpp"] == 0.5 and a["reader"] == "openslide"
    assert a["seg_mpp"] == 16.0 and a["min_tissue"] == 0.25
    assert a["slide_path"] == str(svs_025.path.resolve())
    import h5py

    with h5py.File(tmp_path / "tiles" / "svs_025.h5") as f:
        assert f["coords"].attrs["patch_level"] == 0
        assert f["coords"].attrs["patch_size"] == 8192
    # The whole 1024 µm tissue fits in one 2048 µm region.
    assert len(t) == 1
    x0, y0, _, _ = svs_025.tissue_bbox_level0()
    assert abs(t.coords[0, 0] - x0) <= 64 and abs(t.coords[0, 1] - y0) <= 64


def test_tiny_biopsy_yields_a_padded_region(tiny_biopsy, tmp_path):
    r = tile_slide(tiny_biopsy.path, tmp_path, TileSettings())
    assert r.status == "ok" and r.n_regions == 1
    t = read_tiles(tmp_path / "tiles" / "tiny_biopsy.h5")
    x, y = t.coords[0]
    assert 0 <= x < 1600 and 0 <= y < 1200
    assert x + 4096 > 1600  # extends past the slide edge
    with Slide(tiny_biopsy.path) as s:
        region = s.read_region(int(x), int(y), 4096, 0.5)
    assert (region[:, 1600 - x :] == 255).all() and (region[1200 - y :] == 255).all()
    assert (region[: 1200 - y, : 1600 - x] < 250).any()


def test_qc_png_shows_outline_and_regions(tiff_pen, tmp_path):
    tile_slide(tiff_pen.path, tmp_path, TileSettings(region_px=1024))
    img = np.asarray(Image.open(tmp_path / "qc" / "tiff_pen.png").convert("RGB"))
    assert img.shape[0] >= 300 and img.shape[1] >= 400
    assert ((img == (0, 170, 0)).all(-1)).sum() > 100  # tissue outline
    assert ((img == (20, 60, 230)).all(-1)).sum() > 100  # region boxes


def test_bad_slides_fail_with_one_line(
    not_a_slide,
    truncated_tiff,
    corrupt_lowres_slide,
    no_mpp_tiff,
    suspicious_svs,
    blank_slide,
    tmp_path,
):
    cases = {
        not_a_slide: "not a slide",
        truncated_tiff: "cannot read",
        no_mpp_tiff.path: "--mpp",
        suspicious_svs.path: "suspicious",
        blank_slide.path: "no tissue found",
    }
    for path, words in cases.items():
        r = tile_slide(path, tmp_path, TileSettings())
        assert r.status == "failed", path
        assert str(path) in r.error and words in r.error and "\n" not in r.error
        assert not (tmp_path / "tiles" / f"{path.stem}.h5").exists()
    assert tile_slide(no_mpp_tiff.path, tmp_path, TileSettings(mpp=0.5)).status == "ok"
    # An undecodable low-resolution level: segmented on the next finer level, with a warning.
    r = tile_slide(corrupt_lowres_slide.path, tmp_path, TileSettings())
    assert r.status == "ok" and r.n_regions >= 1
    assert "level 2 cannot be decoded" in r.error and "segmenting on level 1" in r.error
    assert (
        tile_slide(suspicious_svs.path, tmp_path, TileSettings(trust_metadata=True)).status == "ok"
    )


@pytest.fixture
def batch_dir(tmp_path, tiff_050, tiny_biopsy, not_a_slide):
    d = tmp_path / "in"
    d.mkdir()
    for p in (tiff_050.path, tiny_biopsy.path, not_a_slide):
        shutil.copy(p, d / p.name)
    return d


def test_batch_rerun_skips_complete_and_redoes_partial(batch_dir, tmp_path):
    out = tmp_path / "out"
    first = tile_batch([batch_dir], out, TileSettings(), progress=False)
    assert [(r.slide_id, r.status) for r in first] == [
        ("notes", "failed"),
        ("tiff_050", "ok"),
        ("tiny_biopsy", "ok"),
    ]
    rows = list(csv.DictReader(open(out / "tiling.csv")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
    assert rows[1]["status"] == "ok" and int(rows[1]["n_regions"]) == first[1].n_regions
    assert rows[1]["mpp_source"] == "openslide.mpp-x" and float(rows[1]["mpp_level0"]) == 0.5
    assert "not a slide" in rows[0]["error"]

    second = tile_batch([batch_dir], out, TileSettings(), progress=False)
    assert [r.status for r in second] == ["failed", "skipped", "skipped"]
    assert second[1].n_regions == first[1].n_regions

    # A damaged tiles file and a missing QC image are redone; other settings redo everything.
    (out / "tiles" / "tiff_050.h5").write_bytes(b"partial")
    (out / "qc" / "tiny_biopsy.png").unlink()
    third = tile_batch([batch_dir], out, TileSettings(), progress=False)
    assert [r.status for r in third] == ["failed", "ok", "ok"]
    fourth = tile_batch([batch_dir], out, TileSettings(min_tissue=0.5), progress=False)
    assert [r.status for r in fourth] == ["failed", "ok", "ok"]
    with open(batch_dir / "tiny_biopsy.tiff", "ab") as fh:  # the slide file changed
        fh.write(b"\0")
    sixth = tile_batch([batch_dir], out, TileSettings(min_tissue=0.5), progress=False)
    assert [r.status for r in sixth] == ["failed", "skipped", "ok"]
    fifth = tile_batch(
        [batch_dir], out, TileSettings(min_tissue=0.5), progress=False, overwrite=True
    )
    assert [r.status for r in fifth] == ["failed", "ok", "ok"]


def test_same_slide_twice_is_reported_once(batch_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(batch_dir / "tiff_050.tiff", other / "tiff_050.tiff")  # same slide id
    slides, problems = collect_slides(
        [
            batch_dir / "tiff_050.tiff",
            batch_dir / "tiff_050.tiff",
            other / "tiff_050.tiff",
            tmp_path / "missing.svs",
        ]
    )
    assert slides == [batch_dir / "tiff_050.tiff"]
    assert [p.status for p in problems] == ["skipped", "failed", "failed"]
    assert "given twice" in problems[0].error
    assert "already used" in problems[1].error and str(other / "tiff_050.tiff") in problems[1].error
    assert "no such file" in problems[2].error


def test_unwritable_output_folder(batch_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable") as err:
        tile_batch([batch_dir], blocker / "out", TileSettings(), progress=False)
    assert str(blocker / "out") in str(err.value)


def test_workers_give_the_same_result(batch_dir, tmp_path):
    one = tile_batch([batch_dir], tmp_path / "one", TileSettings(), progress=False)
    two = tile_batch([batch_dir], tmp_path / "two", TileSettings(), workers=2, progress=False)
    assert [(r.slide_id, r.status, r.n_regions) for r in one] == [
        (r.slide_id, r.status, r.n_regions) for r in two
    ]
    a = read_tiles(tmp_path / "one" / "tiles" / "tiff_050.h5")
    b = read_tiles(tmp_path / "two" / "tiles" / "tiff_050.h5")
    assert np.array_equal(a.coords, b.coords)
    assert not list((tmp_path / "two" / "tiles").glob(".*tmp*"))


def test_region_size_level0_rounds_for_odd_mpp(tiff_050, tmp_path):
    r = tile_slide(tiff_050.path, tmp_path, TileSettings(mpp=0.263, target_mpp=0.5))
    assert r.status == "ok"
    t = read_tiles(tmp_path / "tiles" / "tiff_050.h5")
    assert t.attrs["region_size_level0"] == round(4096 * 0.5 / 0.263)
    assert t.attrs["mpp_source"] == "user" and t.attrs["mpp_override"] == 0.263
    assert math.isclose(t.attrs["mpp_level0"], 0.263)


def test_verify_finds_an_unreadable_tile_in_level_0(corrupt_tile_slide, tiff_050, tmp_path):
    slide, _ = corrupt_tile_slide
    # Tiling reads only low levels, so the damaged level-0 tile goes unseen ...
    assert tile_slide(slide.path, tmp_path / "a", TileSettings()).status == "ok"
    # ... unless every kept region is decoded once.
    for reader in ("openslide", "auto"):
        r = tile_slide(slide.path, tmp_path / "b", TileSettings(verify=True, reader=reader))
        assert r.status == "failed"
        assert str(slide.path) in r.error and "verifying the region" in r.error
    assert tile_slide(tiff_050.path, tmp_path / "c", TileSettings(verify=True)).status == "ok"


def test_failed_redo_leaves_no_stale_outputs(corrupt_tile_slide, tmp_path):
    """A slide whose latest tiling failed must not keep an earlier run's tiles file."""
    slide, _ = corrupt_tile_slide
    out = tmp_path / "out"
    first = tile_batch([slide.path], out, TileSettings(), progress=False)
    assert [r.status for r in first] == ["ok"]
    tiles = out / "tiles" / f"{slide.path.stem}.h5"
    qc = out / "qc" / f"{slide.path.stem}.png"
    assert tiles.exists() and qc.exists()
    # Other settings redo the slide; verifying finds the unreadable tile and the slide fails.
    second = tile_batch([slide.path], out, TileSettings(verify=True), progress=False)
    assert [r.status for r in second] == ["failed"]
    assert not tiles.exists() and not qc.exists()


# ------------------------------------------------------------------------ issue 11 / 12 points
def _rows(path):
    return {r["slide_id"]: r for r in csv.DictReader(open(path))}


def test_coarser_scan_is_refused_unless_upsampling_is_allowed(tmp_path):
    from hipt import synthetic

    p = synthetic.write_generic_tiff(tmp_path / "ten_x.tiff", 2048, 2048, mpp=1.0, seed=2).path
    r = tile_slide(p, tmp_path / "a", TileSettings())
    assert r.status == "failed"
    assert "1 µm/px" in r.error and "--allow-upsampling" in r.error and "2x" in r.error
    out = tmp_path / "b"
    [r] = tile_batch([p], out, TileSettings(allow_upsampling=True), progress=False)
    assert r.status == "ok" and r.upsample_factor == 2.0
    assert read_tiles(out / "tiles" / "ten_x.h5").attrs["upsample_factor"] == 2.0
    assert _rows(out / "tiling.csv")["ten_x"]["upsample_factor"] == "2"
    # A later run without the flag does not take the upsampled tiles as done.
    [again] = tile_batch([p], out, TileSettings(), progress=False)
    assert again.status == "failed"


def test_edge_fill_is_a_recorded_setting(tiff_050, tmp_path):
    tile_slide(tiff_050.path, tmp_path, TileSettings())
    assert read_tiles(tmp_path / "tiles" / "tiff_050.h5").attrs["edge_fill"] == "white"
    [r] = tile_batch([tiff_050.path], tmp_path, TileSettings(edge_fill="black"), progress=False)
    assert r.status == "ok"  # another fill is another tiling, not a skip
    assert read_tiles(tmp_path / "tiles" / "tiff_050.h5").attrs["edge_fill"] == "black"
    with pytest.raises(ValueError, match="edge_fill"):
        TileSettings(edge_fill="grey")


def test_tiling_csv_keeps_earlier_runs_rows(tiff_050, tiny_biopsy, not_a_slide, tmp_path):
    out = tmp_path / "out"
    tile_batch([tiff_050.path], out, TileSettings(), progress=False)
    tile_batch([tiny_biopsy.path], out, TileSettings(), progress=False)
    tile_batch([not_a_slide], out, TileSettings(), progress=False)
    rows = _rows(out / "tiling.csv")
    assert set(rows) == {"tiff_050", "tiny_biopsy", "notes"}
    # The latest run's row wins, one row per slide.
    tile_batch([tiff_050.path], out, TileSettings(min_tissue=0.5), progress=False)
    lines = list(csv.DictReader(open(out / "tiling.csv")))
    assert [r["slide_id"] for r in lines].count("tiff_050") == 1
    assert _rows(out / "tiling.csv")["tiff_050"]["status"] == "ok"
    assert len(lines) == 3


def test_slide_ids_ome_tiff_dicom_folder_and_unsafe_names(tiff_050, tmp_path):
    from hipt.slide import slide_id_for

    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(tiff_050.path, d / "case_7.ome.tiff")
    shutil.copy(tiff_050.path, d / ".hidden.tiff")
    shutil.copy(tiff_050.path, d / "..tiff")
    dicom = d / "case_9_dicom"
    shutil.copytree(DICOM, dicom)
    assert slide_id_for(d / "case_7.ome.tiff") == "case_7"
    assert slide_id_for(dicom / "boxes_0.dcm") == "case_9_dicom"
    slides, problems = collect_slides([d, dicom / "boxes_1.dcm"])
    assert sorted(slide_id_for(s) for s in slides) == ["case_7", "case_9_dicom"]
    bad = {p.slide_id: p for p in problems if p.status == "failed"}
    assert set(bad) == {".hidden", "."} and all("must not" in p.error for p in bad.values())
    assert [p.status for p in problems if p.status == "skipped"] == ["skipped"]  # .dcm again
    # Opened as one slide and segmented (the 16 px test pattern holds no tissue).
    r = tile_slide(dicom, tmp_path / "out", TileSettings(mpp=0.25, target_mpp=0.5))
    assert r.slide_id == "case_9_dicom" and r.mpp_level0 == 0.25
    assert "no tissue found" in r.error and str(dicom) in r.error


def test_dicom_folder_is_one_slide(tmp_path):
    with Slide(DICOM) as s:
        assert s.slide_id == "dicom_boxes" and s.reader_name == "openslide"
        assert s.dimensions == (16, 16) and s.mpp_level0 == pytest.approx(0.499)


def test_skipped_folder_entries_are_listed(tiff_050, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(tiff_050.path, d / "good.tiff")
    (d / "folder.svs").mkdir()
    (d / "dangling.svs").symlink_to(d / "nowhere.svs")
    (d / "loop.tiff").symlink_to(d / "loop.tiff")
    out = tmp_path / "out"
    results = tile_batch([d], out, TileSettings(), progress=False)
    status = {r.slide_id: (r.status, r.error) for r in results}
    assert status["good"][0] == "ok"
    assert (
        status["folder"][0] == "not_processed"
        and "folder named like a slide" in status["folder"][1]
    )
    assert "dangling symlink" in status["dangling"][1]
    assert "symlink loop" in status["loop"][1]
    rows = _rows(out / "tiling.csv")
    assert {k: rows[k]["status"] for k in ("folder", "dangling", "loop")} == dict.fromkeys(
        ("folder", "dangling", "loop"), "not_processed"
    )


def test_claimed_size_over_the_limit_fails_that_slide_only(tiff_050, tiny_biopsy, tmp_path):
    out = tmp_path / "out"
    settings = TileSettings(max_slide_px=2048 * 2048 - 1)
    results = tile_batch([tiff_050.path, tiny_biopsy.path], out, settings, progress=False)
    assert [r.status for r in results] == ["failed", "ok"]
    assert "2048x2048 px" in results[0].error and "--max-slide-px" in results[0].error
    assert set(_rows(out / "tiling.csv")) == {"tiff_050", "tiny_biopsy"}


def test_claimed_size_impossible_for_the_file(tiff_050, tmp_path, monkeypatch):
    import preprocessing.tiler as tiler

    # A real 2048² slide of ~1 MB; a bound of 1 byte per pixel makes its claim "impossible".
    monkeypatch.setattr(tiler, "MIN_FILE_BYTES_PER_PX", 1.0)
    r = tile_slide(tiff_050.path, tmp_path, TileSettings())
    assert r.status == "failed" and "cannot be this small" in r.error


def test_rerun_removes_leftover_temporary_files(tiff_050, tmp_path):
    out = tmp_path / "out"
    (out / "qc").mkdir(parents=True)
    (out / "tiles").mkdir()
    leftovers = [out / "qc" / ".tiff_050.png.tmp-deadbeef", out / "tiles" / ".tiff_050.h5.tmp-1"]
    for f in leftovers:
        f.write_bytes(b"half")
    [r] = tile_batch([tiff_050.path], out, TileSettings(), progress=False)
    assert r.status == "ok"
    assert not any(f.exists() for f in leftovers)


def test_mpp_messages_name_the_real_cause(tmp_path):
    from hipt import synthetic

    # 72 dpi resolution tags: 352.8 µm/px is implausible, not missing.
    dpi72 = synthetic.write_generic_tiff(tmp_path / "dpi72.tiff", 1024, 1024, mpp=352.8).path
    r = tile_slide(dpi72, tmp_path / "o", TileSettings())
    assert r.status == "failed" and "implausible" in r.error and "352.8" in r.error
    assert "--mpp" in r.error
    # SVS MPP = 0: the objective power is used, with a warning saying why.
    zero = synthetic.write_svs(tmp_path / "zero.svs", 2048, 2048, mpp=0.25, description_mpp=0)
    r = tile_slide(zero.path, tmp_path / "o", TileSettings())
    assert r.status == "ok" and r.mpp_source == "openslide.objective-power"
    assert "objective power" in r.error and "mpp-x = 0" in r.error
