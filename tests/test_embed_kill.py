"""A real ``kill -9`` of ``hipt embed`` mid-slide leaves nothing a rerun trusts; the rerun matches.

A one-region and a two-region slide are embedded by a ``hipt embed`` subprocess with random
weights (real widths, one block deep, so a region takes seconds). It is killed with SIGKILL once the first
slide's file is in place and the second slide's temporary file exists, i.e. while the second
slide is being encoded. The rerun must skip the first slide, redo the second, and produce
exactly what an uninterrupted run produces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hipt.embed import read_embedding_csv
from hipt.h5schema import read_features
from hipt.inspect import inspect_file
from hipt.synthetic import write_generic_tiff
from preprocessing.tiler import TileSettings, tile_slide


def _embed_cmd(tiles: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "hipt.cli", "embed", "--tiles", str(tiles), "--out", str(out),
        "--random-weights", "--random-depth", "1,1", "--device", "cpu", "--workers", "1",
        "--batch-regions", "1", "--no-progress",
    ]  # fmt: skip


def test_kill_9_mid_slide_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    # q has two regions: its temporary file is created when its first region is written and
    # lives while the second is encoded (seconds), a window the kill below can hit every time.
    for sid, seed, side, regions in (("p", 1, 2048, 1), ("q", 4, 4096, 2)):
        slide = write_generic_tiff(
            tmp_path / "slides" / f"{sid}.tiff", side, side, mpp=1.0, seed=seed
        )
        result = tile_slide(
            slide.path, tmp_path, TileSettings(min_tissue=0.05, allow_upsampling=True)
        )
        assert (result.status, result.n_regions) == ("ok", regions), result.error
    tiles, out = tmp_path / "tiles", tmp_path / "killed"
    features = out / "features"

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        _embed_cmd(tiles, out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if (features / "p.h5").exists() and list(features.glob(".q.h5.tmp-*")):
                os.killpg(proc.pid, signal.SIGSTOP)  # frozen: the files stay as just seen
                if list(features.glob(".q.h5.tmp-*")) and not (features / "q.h5").exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            if proc.poll() is not None:
                raise AssertionError(
                    f"hipt embed ended (rc {proc.returncode}) before it could be killed: "
                    + (tmp_path / "killed.log").read_text()
                )
            if time.monotonic() > deadline:
                raise AssertionError("q never started within 300 s")
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        # The DataLoader worker is a child in the same session; do not leave it behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    # Killed mid-slide: q has only a temporary file, which no reader or rerun takes as done.
    assert not (features / "q.h5").exists()
    assert len(list(features.glob(".q.h5.tmp-*"))) == 1
    assert inspect_file(features / "p.h5").valid
    assert {r.slide_id: r.status for r in read_embedding_csv(out / "embedding.csv")} == {"p": "ok"}

    rerun = subprocess.run(_embed_cmd(tiles, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = {r.slide_id: r.status for r in read_embedding_csv(out / "embedding.csv")}
    assert rows == {"p": "skipped", "q": "ok"}
    assert sorted(p.name for p in features.iterdir()) == ["p.h5", "q.h5"]  # temp file gone

    ref_out = tmp_path / "uninterrupted"
    ref = subprocess.run(_embed_cmd(tiles, ref_out), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    for sid in ("p", "q"):
        got = read_features(features / f"{sid}.h5", patch_features=True)
        want = read_features(ref_out / "features" / f"{sid}.h5", patch_features=True)
        for key in ("coords", "patch_features", "region_features"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{sid} {key}")
    # The two slides really differ, so the equality above is not trivially true.
    p = read_features(features / "p.h5")["region_features"]
    q = read_features(features / "q.h5")["region_features"]
    assert np.abs(p - q).max() > 1e-3
