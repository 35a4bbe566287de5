"""`hipt heatmap` batch mode and bad input on a planted run.

The batch runs through a real subprocess; the other cases call the same ``hipt`` entry point
in-process (argument parsing included), which spares the seconds of importing torch and timm
per case. Renders here stay at slide and region level (no ViT-256 pass).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from heatmaps.planted import make_planted_run
from hipt.embed import tiles_sha256
from hipt.h5schema import read_tiles, write_tiles

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--levels", "slide,region", "--top-k", "1", "--set", "thumbnail_px=512")


def hipt_heatmap(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hipt.cli", "heatmap", *map(str, args), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def hipt_inprocess(capsys, *args: object) -> tuple[int, str]:
    """``hipt heatmap ARGS`` through :func:`hipt.cli.main` in this process: (exit code, stderr)."""
    from hipt.cli import main

    code = main(["heatmap", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def _records(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "heatmaps.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_run(tmp_path_factory.mktemp("planted_cli"), grid=(3, 2))


@pytest.fixture(scope="module")
def weights(planted):
    return ["--vit256", planted.vit256_path, "--vit4k", planted.vit4k_path]


def _copy_features(planted, folder: Path, slide_id: str, **attrs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slide_id}.h5"
    shutil.copy(planted.features_path, path)
    with h5py.File(path, "r+") as f:
        f.attrs["slide_id"] = slide_id
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.fixture(scope="module")
def batch(planted, weights):
    """A folder of four features files: one good, three that must fail, each for its reason."""
    folder = planted.root / "batch_features"
    _copy_features(planted, folder, "planted")
    _copy_features(planted, folder, "stranger")  # not in the cohort
    _copy_features(planted, folder, "otherweights", vit4k_sha256="0" * 64)
    # "moved": its tiles file records a slide path that no longer exists.
    tiles = read_tiles(planted.tiles_path)
    attrs = dict(
        tiles.attrs, slide_id="moved", slide_path=str(planted.root / "gone" / "moved.tiff")
    )
    attrs.pop("schema")
    moved_tiles = write_tiles(
        planted.root / "tiles" / "moved.h5", tiles.coords, tiles.tissue_fraction, attrs
    )
    _copy_features(planted, folder, "moved", tiles_sha256=tiles_sha256(read_tiles(moved_tiles)))
    with open(planted.root / "cohort.csv", "a") as fh:
        fh.write("otherweights,case_o,normal\nmoved,case_m,normal\n")
    out = planted.root / "batch_out"
    p = hipt_heatmap(
        "--run",
        planted.fold_dir,
        "--features",
        folder,
        *weights,
        *FAST,
        "--out",
        out,
        "--set",
        "colormap=viridis",
    )
    return p, out, folder


def test_batch_renders_good_slides_and_records_each_failure(batch):
    p, out, _ = batch
    assert p.returncode == 1, p.stderr
    rec = _records(out)
    assert rec["planted"]["status"] == "ok"
    assert "not in the run's cohort" in rec["stranger"]["error"]
    assert (
        "other encoders" in rec["otherweights"]["error"]
        and "vit4k_sha256" in rec["otherweights"]["error"]
    )
    assert "not found" in rec["moved"]["error"] and "--slide" in rec["moved"]["error"]
    assert all(rec[s]["status"] == "failed" for s in ("stranger", "otherweights", "moved"))
    assert "1 rendered, 0 skipped, 3 failed" in p.stderr
    # .heatmaps.csv.lock: the file lock runs sharing OUT merge heatmaps.csv under
    assert sorted(q.name for q in out.iterdir()) == [
        ".heatmaps.csv.lock",
        "heatmaps.csv",
        "planted",
    ]
    for line in p.stderr.splitlines():
        if "FAILED" in line:
            assert "Traceback" not in line
    assert "Traceback" not in p.stderr


def test_batch_region_level_outputs(batch, planted):
    _, out, _ = batch
    rec = json.loads((out / "planted" / "heatmap.json").read_text())
    assert rec["config"]["levels"] == ["slide", "region"] and rec["config"]["colormap"] == "viridis"
    zattrs = json.loads((out / "planted" / "attention.ome.zarr" / ".zattrs").read_text())
    assert [c["label"] for c in zattrs["omero"]["channels"]] == ["region", "patch"]
    panels = sorted(q.name for q in (out / "planted" / "top_regions").iterdir())
    assert panels == ["rank1.png", "rank1_heads.png"]


def test_batch_rerun_skips_done_and_retries_failed(batch, planted, weights, capsys):
    _, out, folder = batch
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        folder,
        *weights,
        *FAST,
        "--out",
        out,
        "--set",
        "colormap=viridis",
    )
    assert code == 1 and "0 rendered, 1 skipped, 3 failed" in err
    assert _records(out)["planted"]["status"] == "skipped"
    # Another setting is another render.
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        folder / "planted.h5",
        *weights,
        *FAST,
        "--out",
        out,
    )
    assert code == 0, err
    assert _records(out)["planted"]["status"] == "ok"
    rec = json.loads((out / "planted" / "heatmap.json").read_text())
    assert rec["config"]["colormap"] == "turbo"


def test_cohort_mode_uses_the_runs_csv_and_features(batch, planted, weights, capsys):
    out = planted.root / "cohort_out"
    code, _ = hipt_inprocess(
        capsys, "--run", planted.fold_dir, "--cohort", *weights, *FAST, "--out", out
    )
    rec = _records(out)
    assert set(rec) == {"planted", "otherweights", "moved"}  # the cohort CSV's slides
    assert rec["planted"]["status"] == "ok"
    assert "no features file" in rec["moved"]["error"]
    assert code == 1


def test_fold_without_model_is_refused(planted, tmp_path, capsys):
    empty = tmp_path / "runs" / "x" / "fold_0"
    empty.mkdir(parents=True)
    out = tmp_path / "out"
    code, err = hipt_inprocess(
        capsys, "--run", empty, "--features", planted.features_path, "--out", out
    )
    assert code == 2
    assert "no trained model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, err = hipt_inprocess(
        capsys, "--run", planted.fold_dir.parent, "--features", planted.features_path
    )
    assert code == 2 and "pass one of its folds" in err


def test_top_k_above_regions_leaves_nothing(planted, weights, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        planted.features_path,
        *weights,
        "--levels",
        "slide,region",
        "--top-k",
        7,
        "--out",
        out,
    )
    assert code == 1
    assert "--top-k 7 is larger than the slide's 6 regions" in err
    # no partial or temporary folder, no slide lock left
    assert sorted(q.name for q in out.iterdir()) == [".heatmaps.csv.lock", "heatmaps.csv"]


def test_weights_other_than_the_features_are_refused(planted, tmp_path, capsys):
    state = torch.load(planted.vit4k_path, weights_only=True)
    state["norm.weight"] = state["norm.weight"] * 2
    other = tmp_path / "other_vit4k.pth"
    torch.save(state, other)
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        planted.features_path,
        "--vit256",
        planted.vit256_path,
        "--vit4k",
        other,
        *FAST,
        "--out",
        tmp_path / "o",
    )
    assert code == 1
    assert "vit4k_sha256 of the given weights" in err
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        planted.features_path,
        *FAST,
        "--out",
        tmp_path / "o",
    )
    assert code == 1 and "pass that file with --vit256" in err


def test_bad_config_is_one_line_per_problem(planted, tmp_path, capsys):
    cfg = tmp_path / "heatmap.yaml"
    cfg.write_text("opacity: 3\ncolormap: nope\nsmoothing:\n  passes: 0\nbogus: 1\n")
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        planted.features_path,
        "--config",
        cfg,
        "--out",
        tmp_path / "o",
    )
    assert code == 2
    for key in ("opacity", "colormap", "smoothing.passes", "bogus"):
        assert key in err
    assert not (tmp_path / "o").exists()


def test_help_lists_heatmap(capsys):
    from hipt.cli import main

    assert main([]) == 2
    assert "heatmap" in capsys.readouterr().out


def test_slide_given_on_the_command_line_wins(batch, planted, weights, capsys):
    """The 'moved' slide renders once --slide says where it is now."""
    _, _, folder = batch
    out = planted.root / "moved_out"
    code, err = hipt_inprocess(
        capsys,
        "--run",
        planted.fold_dir,
        "--features",
        folder / "moved.h5",
        "--slide",
        planted.slide_path,
        *weights,
        *FAST,
        "--out",
        out,
    )
    assert code == 0, err
    rec = json.loads((out / "moved" / "heatmap.json").read_text())
    assert rec["slide"]["path"] == str(planted.slide_path)


def test_source_package_is_not_an_output_folder(planted, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # where the default --out "heatmaps" is the package itself
    code, err = hipt_inprocess(
        capsys, "--run", planted.fold_dir, "--features", planted.features_path
    )
    assert code == 2 and "Python package folder" in err
    assert not (ROOT / "heatmaps" / "heatmaps.csv").exists()
