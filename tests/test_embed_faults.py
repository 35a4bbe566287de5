"""``hipt embed`` against bad inputs, overlapping runs, SIGTERM and a full disk, as real processes.

Tiles files are written directly (one 4096 px region of a generated 0.5 µm/px slide each), so
these tests do not depend on the tiler; the encoders are random and one block deep.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from h5_inputs import tiles_for as _tiles

from hipt.inspect import inspect_file
from hipt.synthetic import write_generic_tiff

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
FAST = ["--random-weights", "--random-depth", "1,1", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    return write_generic_tiff(root / "a.tiff", 4096, 4096, mpp=0.5, seed=2).path


def _copies(slide: Path, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(slide, folder / f"{n}.tiff")) for n in names]


def _embed_cmd(tiles: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hipt.cli", "embed", "--tiles", str(tiles), "--out", str(out),
            *FAST, *extra]  # fmt: skip


def _embed(
    tiles: Path, out: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    cmd = _embed_cmd(tiles, out, *extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "embedding.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["slide_id"] for r in rows}), rows  # one row per slide
    return {r["slide_id"]: r for r in rows}


def test_bad_tiles_and_changed_slides_fail_alone_with_one_line(slide: Path, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    _tiles(tiles, "good", slide)
    bad = _tiles(tiles, "typed", slide)
    with h5py.File(bad, "a") as f:
        f.attrs["target_mpp"] = "half"
    _tiles(tiles, "outside", slide, coords=[(0, 0), (8192, 0)])
    other = write_generic_tiff(tmp_path / "other.tiff", 1024, 1024, mpp=0.5, seed=5).path
    _tiles(tiles, "replaced", other, slide_file_bytes=slide.stat().st_size)
    run = _embed(tiles, tmp_path / "out", "--no-progress")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    rows = _rows(tmp_path / "out")
    assert {k: r["status"] for k, r in rows.items()} == {
        "good": "ok", "typed": "failed", "outside": "failed", "replaced": "failed",
    }  # fmt: skip
    assert (
        rows["typed"]["error"] == f"{bad}: attr target_mpp is 'half'; expected a finite number > 0"
    )
    assert "region 1 at [8192, 0] lies outside the 4096x4096 px slide" in rows["outside"]["error"]
    assert (
        "the tiled slide was" in rows["replaced"]["error"]
        and str(other) in rows["replaced"]["error"]
    )
    for sid in ("typed", "outside", "replaced"):  # failures reach stderr despite --no-progress
        assert f"{sid}: FAILED: " in run.stderr
    # hipt inspect agrees with the embedder on the badly typed file.
    assert inspect_file(bad).problem == rows["typed"]["error"]


def test_tiles_root_is_accepted_and_no_tiles_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tiler_out" / "tiles").mkdir(parents=True)
    _tiles(tmp_path / "tiler_out" / "tiles", "gone", tmp_path / "gone.tiff")
    run = _embed(tmp_path / "tiler_out", tmp_path / "out", "--no-progress")
    assert run.returncode == 1 and "gone: FAILED:" in run.stderr and "not found" in run.stderr
    assert _rows(tmp_path / "out")["gone"]["status"] == "failed"  # the tiles/ inside was used

    (tmp_path / "empty").mkdir()
    run = _embed(tmp_path / "empty", tmp_path / "out2")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no tiles files (*.h5)" in run.stderr and "run 'hipt tile' first" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_out_that_is_a_file_and_weights_that_are_not_weights(slide: Path, tmp_path: Path) -> None:
    _tiles(tmp_path / "tiles", "a", slide)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "features").write_text("x")
    text = tmp_path / "vit256.pth"
    text.write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    other = str(tmp_path / "o")
    cases = [
        ([str(tmp_path / "afile"), "--random-weights"], "is a file; pass a folder"),
        ([str(tmp_path / "out"), "--random-weights"], "is a file, not the features folder"),
        ([other, "--vit256", str(text), "--vit4k", str(text)], "not a torch checkpoint (a text"),
        ([other, "--vit256", str(empty), "--vit4k", str(empty)], "an empty file (0 bytes)"),
    ]
    for args, message in cases:
        cmd = [sys.executable, "-m", "hipt.cli", "embed", "--tiles", str(tmp_path / "tiles"),
               "--device", "cpu", "--out", *args]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_locks_of_dead_runs_are_taken_over_and_live_ones_left_alone(
    slide: Path, tmp_path: Path
) -> None:
    slides = _copies(slide, tmp_path / "slides", ["dead", "live"])
    for s in slides:
        _tiles(tmp_path / "tiles", s.stem, s)
    features = tmp_path / "out" / "features"
    features.mkdir(parents=True)
    host = os.uname().nodename
    (features / ".dead.lock").write_text(f'{{"host": "{host}", "pid": {_dead_pid()}}}')
    (features / ".dead.h5.tmp-0000dead").write_bytes(b"left by the killed run")
    # This test process is alive: its lock and its temporary file must be left alone.
    (features / ".live.lock").write_text(f'{{"host": "{host}", "pid": {os.getpid()}}}')
    (features / ".live.h5.tmp-0000live").write_bytes(b"being written")
    run = _embed(tmp_path / "tiles", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    rows = _rows(tmp_path / "out")
    assert rows["dead"]["status"] == "ok" and rows["live"]["status"] == "locked"
    assert f"being embedded by {host} pid {os.getpid()}" in rows["live"]["error"]
    assert "took over the lock" in run.stderr
    assert sorted(p.name for p in features.iterdir()) == [
        ".live.h5.tmp-0000live", ".live.lock", "dead.h5",
    ]  # fmt: skip


def test_two_runs_started_together_share_the_work(slide: Path, tmp_path: Path) -> None:
    names = ["p1", "p2", "p3"]
    for s in _copies(slide, tmp_path / "slides", names):
        _tiles(tmp_path / "tiles", s.stem, s)
    out = tmp_path / "out"
    cmd = _embed_cmd(tmp_path / "tiles", out)
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    rows = _rows(out)
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(names, "ok")
    both = "".join(errs)
    for sid in names:  # each slide embedded by exactly one of the two processes
        assert both.count(f"{sid}: 1 region(s) in") == 1, errs
        assert inspect_file(out / "features" / f"{sid}.h5").valid
    assert "FAILED" not in both
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"{s}.h5" for s in names]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_stops_workers_drops_temporaries_and_exits_143(slide: Path, tmp_path: Path) -> None:
    names = ["t1", "t2", "t3"]
    for s in _copies(slide, tmp_path / "slides", names):
        _tiles(tmp_path / "tiles", s.stem, s)
    out = tmp_path / "out"
    # One worker process, one region per batch: the worker is still alive once t1 is written.
    cmd = _embed_cmd(tmp_path / "tiles", out, "--workers", "1", "--batch-regions", "1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not (out / "features" / "t1.h5").exists():  # t1 finished, t2 under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers, "the loader's worker process should be running"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "hipt embed: terminated: 1 slide(s) finished this run (t1), 2 not finished" in err
    assert not any(Path(f"/proc/{w}").exists() for w in workers)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["t1.h5"]  # no temp, no lock
    assert _rows(out)["t1"]["status"] == "ok"
    rerun = _embed(tmp_path / "tiles", out, "--no-progress")  # resumes: t1 skipped
    assert rerun.returncode == 0 and "embedded 2 slide(s)" in rerun.stderr
    assert "skipped 1" in rerun.stderr


def _mount_tmpfs(mnt: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 320 KiB tmpfs: room for one features file with patch features (~200 KB), not two."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "320k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_every_command_reports_a_full_disk_in_one_line(slide: Path, tmp_path: Path) -> None:
    # hipt export does not handle a full disk itself: hipt's entry point does, for every command.
    mnt = tmp_path / "tiny"
    _mount_tmpfs(mnt, "64k")
    try:
        (mnt / "filler").write_bytes(b"x" * (60 << 10))
        for i in range(20):
            _tiles(tmp_path / "tiles", f"s{i}", slide)
        cmd = [sys.executable, "-m", "hipt.cli", "export", "trident", "--tiles",
               str(tmp_path / "tiles"), "--out", str(mnt / "trident")]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hipt export: no space left on device: ")
        assert str(mnt / "trident" / "patches") in lines[0]
        assert (mnt / "filler").stat().st_size == 60 << 10
        assert not list((mnt / "trident").rglob(".*.tmp-*"))  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_says_which_file_exits_1_and_keeps_earlier_files(
    slide: Path, tmp_path: Path, small_fs: Path
) -> None:
    slides = _copies(slide, tmp_path / "slides", ["f1", "f2"])
    _tiles(tmp_path / "tiles", "f1", slides[0])
    first = _embed(tmp_path / "tiles", small_fs, "--no-progress")
    assert first.returncode == 0, first.stderr
    kept = {p.name: p.read_bytes() for p in (small_fs / "features").iterdir()}
    _tiles(tmp_path / "tiles", "f2", slides[1])
    run = _embed(tmp_path / "tiles", small_fs, "--no-progress")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == f"hipt embed: no space left on device: {small_fs / 'features' / 'f2.h5'}"
    assert {p.name: p.read_bytes() for p in (small_fs / "features").iterdir()} == kept
    assert inspect_file(small_fs / "features" / "f1.h5").valid
    rows = _rows(small_fs)  # the record still parses and keeps f1
    assert rows["f1"]["features_path"] == "features/f1.h5" and rows["f2"]["status"] == "failed"
