"""`hipt tile` end to end, through a real subprocess, on a folder of good and bad slides."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hipt.h5schema import read_tiles

ROOT = Path(__file__).resolve().parents[1]


def hipt_tile(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipt.cli", "tile", *map(str, args), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cohort(
    tmp_path_factory,
    svs_025,
    tiff_050,
    tiny_biopsy,
    not_a_slide,
    truncated_tiff,
    corrupt_lowres_slide,
    no_mpp_tiff,
    suspicious_svs,
    blank_slide,
):
    d = tmp_path_factory.mktemp("cohort")
    for p in (
        svs_025.path,
        tiff_050.path,
        tiny_biopsy.path,
        not_a_slide,
        truncated_tiff,
        corrupt_lowres_slide.path,
        no_mpp_tiff.path,
        suspicious_svs.path,
        blank_slide.path,
    ):
        shutil.copy(p, d / Path(p).name)
    return d


BAD = {
    "notes": "not a slide",
    "truncated": "truncated",
    "corrupt_lowres": "corrupt_lowres.tiff",
    "no_mpp": "--mpp",
    "suspicious": "suspicious",
    "blank": "no tissue found",
}
GOOD = ("svs_025", "tiff_050", "tiny_biopsy")


def test_folder_with_bad_slides(cohort, tmp_path):
    out = tmp_path / "out"
    # The folder, plus one of its slides again: reported, not tiled twice.
    p = hipt_tile(cohort, cohort / "tiff_050.tiff", "--out", out, "--reader", "openslide")
    assert p.returncode == 1, p.stderr
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}
    assert set(rows) == set(GOOD) | set(BAD)
    for sid in GOOD:
        assert rows[sid]["status"] == "ok" and int(rows[sid]["n_regions"]) >= 1
        t = read_tiles(out / "tiles" / f"{sid}.h5")
        assert len(t) == int(rows[sid]["n_regions"]) and t.attrs["reader"] == "openslide"
        assert (out / "qc" / f"{sid}.png").stat().st_size > 1000
    for sid, words in BAD.items():
        assert rows[sid]["status"] == "failed", sid
        assert words in rows[sid]["error"] and sid in rows[sid]["error"]
        assert not (out / "tiles" / f"{sid}.h5").exists()
    # The summary lists every failure (one line each) and the duplicate.
    summary = p.stdout
    assert "tiled 3 slide(s), skipped 1, failed 6" in summary
    for sid, words in BAD.items():
        line = next(ln for ln in summary.splitlines() if ln.strip().startswith(f"{sid}:"))
        assert words in line
    assert "same slide given twice" in summary

    # A re-run skips what is complete and retries the failures.
    again = hipt_tile(cohort, "--out", out, "--reader", "openslide")
    assert again.returncode == 1
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}
    assert all(rows[s]["status"] == "skipped" for s in GOOD)
    assert all(rows[s]["status"] == "failed" for s in BAD)


def test_overrides_fix_mpp_problems(no_mpp_tiff, suspicious_svs, tmp_path):
    p = hipt_tile(no_mpp_tiff.path, "--out", tmp_path, "--mpp", "0.5")
    assert p.returncode == 0, p.stdout + p.stderr
    t = read_tiles(tmp_path / "tiles" / "no_mpp.h5")
    assert t.attrs["mpp_source"] == "user" and t.attrs["mpp_level0"] == 0.5
    p = hipt_tile(suspicious_svs.path, "--out", tmp_path, "--trust-metadata", "--min-tissue", "0.1")
    assert p.returncode == 0, p.stdout + p.stderr
    t = read_tiles(tmp_path / "tiles" / "suspicious.h5")
    assert t.attrs["trust_metadata"] == 1 and t.attrs["min_tissue"] == 0.1
    assert t.attrs["mpp_source"] == "openslide.mpp-x"


def test_unwritable_output_folder(tiff_050, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = hipt_tile(tiff_050.path, "--out", blocker / "out")
    assert p.returncode == 2
    assert "not writable" in p.stderr and str(blocker / "out") in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_help_and_bad_arguments(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "hipt.cli", "tile", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0
    for flag in (
        "--target-mpp",
        "--workers",
        "--mpp",
        "--trust-metadata",
        "--min-tissue",
        "--reader",
        "--overwrite",
        "--verify",
    ):
        assert flag in p.stdout
    p = hipt_tile(tmp_path, "--out", tmp_path / "o", "--min-tissue", "2")
    assert p.returncode == 2 and "min-tissue" in p.stderr
    # A zero region size is refused up front, not as a division error on every slide.
    p = hipt_tile(tmp_path, "--out", tmp_path / "o", "--region-px", "0")
    assert p.returncode == 2 and "region-px" in p.stderr
