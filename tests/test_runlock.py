"""Overlapping runs on one output folder: `hipt tile`, `hipt heatmap` and `hipt pretrain`.

Real processes started together, real lock files of dead and live processes. The invariants are
checked whichever run wins each slide: every slide done exactly once, no false failure, a full
record, no lock or temporary file left. (`hipt embed`'s own tests are in test_embed_faults.py.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hipt.h5schema import read_tiles
from hipt.runlock import ItemLock

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
HOST = os.uname().nodename


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_text(pid: int, host: str = HOST, **extra: object) -> str:
    return json.dumps(dict(host=host, pid=pid, **extra))


def _hipt(*args: object) -> list[str]:
    return [sys.executable, "-m", "hipt.cli", *map(str, args), "--no-progress"]


def _together(*cmds: list[str], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start every command at once; (exit code, stdout, stderr) of each."""
    procs = [
        subprocess.Popen(
            c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in cmds
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["slide_id"] for r in rows}), rows  # one row per slide
    return {r["slide_id"]: r for r in rows}


# ------------------------------------------------------------------------------- the lock
def test_a_requeued_slurm_jobs_own_lock_is_taken_over_from_any_host(tmp_path, monkeypatch):
    path = tmp_path / ".run.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # Another host's lock of another job (or of this job's same start) cannot be checked: held.
    for job, restart in (("99", 0), ("4242", 1)):
        path.write_text(_lock_text(1, "node-a", job=job, restart=restart))
        assert not ItemLock(path).acquire()
    # Written by this job's earlier start (Slurm ended it before requeueing): taken over.
    path.write_text(_lock_text(1, "node-a", job="4242", restart=0))
    lock = ItemLock(path)
    assert lock.acquire() and lock.took_over is not None and lock.took_over.host == "node-a"
    mine = json.loads(path.read_text())
    assert (mine["job"], mine["restart"], mine["pid"]) == ("4242", 1, os.getpid())
    assert "Slurm job 4242" in str(lock.owner())
    lock.release()
    assert not path.exists()


# ------------------------------------------------------------------------------- hipt tile
def _slides(src: Path, folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src, folder / f"{n}.tiff")
    return folder


def _tiled_count(stdout: str) -> int:
    found = re.search(r"tiled (\d+) slide\(s\), skipped (\d+), failed (\d+)", stdout)
    assert found, stdout
    assert found.group(3) == "0", stdout
    return int(found.group(1))


def test_two_tile_runs_started_together_tile_each_slide_once(tiff_050, tmp_path):
    names = ["a", "b", "c", "d"]
    slides = _slides(tiff_050.path, tmp_path / "slides", names)
    out = tmp_path / "out"
    runs = _together(
        _hipt("tile", slides, "--out", out), _hipt("tile", slides, "--out", out, "--workers", "2")
    )
    assert [r[0] for r in runs] == [0, 0], runs
    assert sum(_tiled_count(r[1]) for r in runs) == len(names), runs  # each slide tiled once
    assert "failed:" not in "".join(r[1] + r[2] for r in runs)
    rows = _csv_rows(out / "tiling.csv")
    assert set(rows) == set(names)
    assert all(r["status"] in ("ok", "skipped") and int(r["n_regions"]) >= 1 for r in rows.values())
    for n in names:
        assert len(read_tiles(out / "tiles" / f"{n}.h5")) == int(rows[n]["n_regions"])
    assert sorted(p.name for p in (out / "tiles").iterdir()) == [f"{n}.h5" for n in names]
    assert sorted(p.name for p in (out / "qc").iterdir()) == [f"{n}.png" for n in names]


def test_tile_takes_over_dead_locks_and_leaves_live_ones_alone(tiff_050, tmp_path):
    from preprocessing.tiler import TileResult, TileSettings, tile_slide, write_csv_atomic

    slides = _slides(tiff_050.path, tmp_path / "slides", ["dead", "live", "done"])
    out = tmp_path / "out"
    assert tile_slide(slides / "done.tiff", out, TileSettings()).status == "ok"
    tiles, qc = out / "tiles", out / "qc"
    (tiles / ".dead.lock").write_text(_lock_text(_dead_pid()))
    (qc / ".dead.png.tmp-0000dead").write_bytes(b"left by a killed run")
    (qc / ".done.png.tmp-0000dead").write_bytes(b"left by a killed run of a finished slide")
    # This test process is alive: its lock and the files it "writes" are left alone.
    (tiles / ".live.lock").write_text(_lock_text(os.getpid()))
    (tiles / ".live.h5.tmp-0000live").write_bytes(b"being written")
    (qc / ".live.png.tmp-0000live").write_bytes(b"being written")
    [(code, stdout, stderr)] = _together(_hipt("tile", slides, "--out", out))
    assert code == 0, stderr
    rows = _csv_rows(out / "tiling.csv")
    assert {k: r["status"] for k, r in rows.items()} == {
        "dead": "ok", "live": "locked", "done": "skipped"
    }  # fmt: skip
    assert f"being tiled by {HOST} pid {os.getpid()}" in rows["live"]["error"]
    assert "left to other runs 1" in stdout and "took over the lock" in stderr
    assert sorted(p.name for p in tiles.iterdir()) == [
        ".live.h5.tmp-0000live", ".live.lock", "dead.h5", "done.h5"
    ]  # fmt: skip
    assert sorted(p.name for p in qc.iterdir()) == [
        ".live.png.tmp-0000live",
        "dead.png",
        "done.png",
    ]
    # The live run's own row, once written, is never replaced by another run's "locked".
    write_csv_atomic([TileResult("live", "x.tiff", "ok", n_regions=3)], out / "tiling.csv")
    write_csv_atomic([TileResult("live", "x.tiff", "locked", error="held")], out / "tiling.csv")
    rows = _csv_rows(out / "tiling.csv")
    assert rows["live"]["status"] == "ok" and set(rows) == {"dead", "live", "done"}


# ------------------------------------------------------------------------------- hipt heatmap
FAST = ("--levels", "slide,region", "--top-k", "1", "--set", "thumbnail_px=256")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import h5py

    from heatmaps.planted import make_planted_run
    from hipt.embed import tiles_sha256
    from hipt.h5schema import write_tiles

    run = make_planted_run(tmp_path_factory.mktemp("planted_locks"), grid=(2, 1))
    features = run.root / "many"
    features.mkdir()
    tiles = read_tiles(run.tiles_path)
    attrs = {k: v for k, v in tiles.attrs.items() if k != "schema"}
    with open(run.root / "cohort.csv", "a") as fh:
        for sid in ("h1", "h2"):  # two slides: the planted one under other names
            copy = write_tiles(run.root / "tiles" / f"{sid}.h5", tiles.coords,
                               tiles.tissue_fraction, dict(attrs, slide_id=sid))  # fmt: skip
            shutil.copy(run.features_path, features / f"{sid}.h5")
            with h5py.File(features / f"{sid}.h5", "r+") as f:
                f.attrs["slide_id"] = sid
                f.attrs["tiles_sha256"] = tiles_sha256(read_tiles(copy))
            fh.write(f"{sid},case_{sid},tumour\n")
    return run, features


def _heatmap(run, features: Path, out: Path) -> list[str]:
    weights = ("--vit256", run.vit256_path, "--vit4k", run.vit4k_path)
    return _hipt("heatmap", "--run", run.fold_dir, "--features", features, *weights, *FAST,
                 "--out", out)  # fmt: skip


def test_two_heatmap_runs_started_together_render_each_slide_once(planted, tmp_path):
    run, features = planted
    out = tmp_path / "heatmaps"
    runs = _together(_heatmap(run, features, out), _heatmap(run, features, out))
    assert [r[0] for r in runs] == [0, 0], runs
    counts = [re.search(r"(\d+) rendered, (\d+) skipped, 0 failed", r[2]) for r in runs]
    assert all(counts), runs
    assert sum(int(c.group(1)) for c in counts) == 2, runs  # each slide rendered once
    rows = _csv_rows(out / "heatmaps.csv")
    assert set(rows) == {"h1", "h2"}
    assert all(r["status"] in ("ok", "skipped") for r in rows.values()), rows
    names = sorted(p.name for p in out.iterdir())
    assert names == [".heatmaps.csv.lock", "h1", "h2", "heatmaps.csv"]
    for sid in ("h1", "h2"):
        assert json.loads((out / sid / "heatmap.json").read_text())["slide_id"] == sid


def test_heatmap_takes_over_dead_locks_and_leaves_live_ones_alone(planted, tmp_path, capsys):
    from hipt.cli import main as hipt_main

    run, features = planted
    out = tmp_path / "heatmaps"
    out.mkdir()
    (out / ".h1.lock").write_text(_lock_text(_dead_pid()))
    (out / ".h1.tmp-0000dead").mkdir()  # a killed render's folder
    # A live render of h2: this test's process (in-process, also the run's own PID; alive).
    (out / ".h2.lock").write_text(_lock_text(os.getpid()))
    (out / ".h2.tmp-0000live").mkdir()
    (out / ".h2.tmp-0000live" / "slide.png").write_bytes(b"being written")
    code = hipt_main(_heatmap(run, features, out)[3:])  # in-process: spares importing torch
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    rows = _csv_rows(out / "heatmaps.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"h1": "ok", "h2": "locked"}
    assert f"h2: left alone, being rendered by {HOST} pid {os.getpid()}" in stderr
    assert "1 rendered, 0 skipped, 0 failed, 1 left to other runs" in stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [".h2.lock", ".h2.tmp-0000live", ".heatmaps.csv.lock", "h1", "heatmaps.csv"]
    assert (out / ".h2.tmp-0000live" / "slide.png").read_bytes() == b"being written"


# ------------------------------------------------------------------------------- hipt pretrain
TINY2 = [
    "model.kwargs={depth: 1}", "model.out_dim=256", "model.hidden_dim=64",
    "model.bottleneck_dim=32", "crops.local_crops=2", "crops.global_tokens=8",
    "crops.local_tokens=4", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
    "train.batch_size=8", "train.device=cpu", "train.workers=0", "train.threads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def grids(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from dino_data import write_feature_grids

    return write_feature_grids(tmp_path_factory.mktemp("grids"), n_files=3, regions=8, seed=1)


def _pretrain_args(grids: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.features_dir={grids}", *TINY2, *extra]
    return ["pretrain", "stage2", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]


def test_a_second_pretrain_onto_a_live_runs_folder_is_refused(grids, tmp_path, capsys):
    from hipt.cli import main as hipt_main

    out = tmp_path / "run"
    first = subprocess.Popen(
        _hipt(*_pretrain_args(grids, out, "train.epochs=4", "optim.lr=0.01")),
        cwd=ROOT, env={**ENV, "HIPT_TEST_STEP_SLEEP": "0.3"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while first.poll() is None and time.monotonic() < deadline:
            if (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text():
                break
            time.sleep(0.05)
        # Paused, it is certainly alive (and holds the folder) while the second run starts.
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, first.communicate()[1]
        config_before = (out / "config.yaml").read_text()
        code = hipt_main(_pretrain_args(grids, out, "train.epochs=4", "optim.lr=0.03"))
        err = capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"another hipt pretrain is writing this folder ({HOST} pid {first.pid}" in lines[0]
    assert (out / "config.yaml").read_text() == config_before  # untouched: still the first's
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert json.loads((out / "state.json").read_text())["status"] == "complete"
    assert _steps(out) == list(range(1, 13))  # 24 grids // 8 = 3 steps an epoch; none lost
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert not (out / ".pretrain.lock").exists()


@pytest.mark.parametrize("owner", ["dead pid", "requeued slurm job"])
def test_pretrain_takes_over_the_lock_of_a_dead_or_requeued_run(
    grids, tmp_path, monkeypatch, owner
):
    from train.dino.config import load_stage_config
    from train.dino.engine import pretrain

    out = tmp_path / "run"
    out.mkdir()
    if owner == "dead pid":
        (out / ".pretrain.lock").write_text(_lock_text(_dead_pid()))
    else:  # this job's earlier start, on another node: no PID there can be checked
        monkeypatch.setenv("SLURM_JOB_ID", "31337")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        (out / ".pretrain.lock").write_text(_lock_text(1, "gpu-node-7", job="31337", restart=1))
    cfg = load_stage_config(
        "stage2", overrides=[f"data.features_dir={grids}", f"out={out}", *TINY2, "train.epochs=1"]
    )
    outcome = pretrain(cfg)
    assert outcome.status == "complete" and outcome.step == 3
    assert not (out / ".pretrain.lock").exists()
