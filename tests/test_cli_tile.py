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
    "no_mpp": "--mpp",
    "suspicious": "suspicious",
    "blank": "no tissue found",
}
GOOD = ("svs_025", "tiff_050", "tiny_biopsy", "corrupt_lowres")


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
    assert "tiled 4 slide(s), skipped 1, failed 5" in summary
    # The undecodable level 2 is a warning on stderr (Slurm logs), not a failure.
    assert any(
        ln.startswith("warning:") and "corrupt_lowres" in ln and "cannot be decoded" in ln
        for ln in p.stderr.splitlines()
    )
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


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--target-mpp", "inf", "positive finite"),
        ("--target-mpp", "1e-9", "implausible"),
        ("--mpp", "1e-300", "implausible"),
        ("--mpp", "1000", "implausible"),
        ("--region-px", "1", "multiple of the 256 px patch"),
    ],
)
def test_nonsense_numbers_are_usage_errors(tiff_050, tmp_path, flag, value, words):
    p = hipt_tile(tiff_050.path, "--out", tmp_path / "o", flag, value)
    assert p.returncode == 2, p.stdout + p.stderr
    assert flag in p.stderr and words in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # refused before any output


def test_failures_reach_stderr_without_progress(tiff_050, not_a_slide, tmp_path):
    p = hipt_tile(tiff_050.path, not_a_slide, "--out", tmp_path / "o")  # --no-progress
    assert p.returncode == 1
    failed = [ln for ln in p.stderr.splitlines() if ln.startswith("failed:")]
    assert len(failed) == 1 and "notes.svs" in failed[0] and "not a slide" in failed[0]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) != pid:
            continue
        try:  # forked pool workers carry the parent's command line; a helper like uname does not
            if b"hipt.cli" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
        except OSError:
            continue
    return out


def _many_slides(tmp_path, tiff_pen, n: int) -> Path:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(n):
        shutil.copy(tiff_pen.path, d / f"s{i}.tiff")
    return d


def _start(args, env=None):
    import os

    return subprocess.Popen(
        [sys.executable, "-m", "hipt.cli", "tile", *map(str, args), "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_for_workers(proc, count: int, timeout: float = 60.0) -> list[int]:
    """The pool workers: children seen in two samples 0.3 s apart.

    A short-lived helper the main process forks (a subprocess before its exec) carries the same
    command line for a moment; requiring a child to persist keeps such a process out.
    """
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        first = set(_children(proc.pid))
        time.sleep(0.3)
        lasting = sorted(first & set(_children(proc.pid)))
        if len(lasting) >= count:
            return lasting
    raise AssertionError("workers never started")


@pytest.mark.slow
def test_sigterm_stops_workers_and_records_what_finished(tiff_pen, tmp_path):
    import os
    import signal
    import time

    # Enough slides that the run cannot finish before the signal, however idle the machine.
    d = _many_slides(tmp_path, tiff_pen, 40)
    out = tmp_path / "out"
    proc = _start([d, "--out", out, "--workers", "2"])
    workers = _wait_for_workers(proc, 2)
    end = time.monotonic() + 60
    while not list((out / "tiles").glob("*.h5")) and time.monotonic() < end:
        time.sleep(0.05)  # signal once the first slide is done: some finished, most not
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not list(out.rglob("*.tmp-*"))
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}
    assert all(r["status"] == "ok" for r in rows.values())
    assert {p.stem for p in (out / "tiles").glob("*.h5")} == set(rows)
    os.sync()
    # The same command resumes: every slide ends up tiled.
    again = hipt_tile(d, "--out", out, "--workers", "2")
    assert again.returncode == 0
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}
    assert len(rows) == 40 and all(r["status"] in ("ok", "skipped") for r in rows.values())


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_slide(tiff_pen, tmp_path):
    import os
    import signal
    import time

    d = _many_slides(tmp_path, tiff_pen, 6)
    out = tmp_path / "out"
    proc = _start([d, "--out", out, "--workers", "2"])
    time.sleep(0.5)  # the workers are busy with their first slides
    for _ in range(3):
        try:
            os.kill(_wait_for_workers(proc, 2)[0], signal.SIGKILL)
            break
        except ProcessLookupError:  # it exited between the listing and the kill: pick again
            continue
    else:
        raise AssertionError("no worker could be killed")
    stdout, stderr = proc.communicate(timeout=120)
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}
    assert len(rows) == 6
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) <= 1, failed  # only the slide on the dead worker, if it was busy
    assert all("worker process tiling it died" in r["error"] for r in failed)
    assert sum(r["status"] == "ok" for r in rows.values()) == 6 - len(failed)
    assert proc.returncode == (1 if failed else 0)
    assert "BrokenProcessPool" not in stdout + stderr


def test_huge_claimed_size_fails_that_slide_only(tiff_050, tmp_path):
    """A header claiming 300,000² px: refused in one line, in bounded memory; the batch goes on."""
    import resource

    from hipt import synthetic

    d = tmp_path / "in"
    d.mkdir()
    huge = synthetic.write_huge_claim_tiff(d / "huge.tiff", 300_000, 300_000)
    assert huge.stat().st_size < 4 << 20
    shutil.copy(tiff_050.path, d / "good.tiff")

    def limit_memory() -> None:  # a 3 GiB address space: one full-width strip would not fit
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    def run(*extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        out = tmp_path / f"o{len(extra)}"
        p = subprocess.run(
            [sys.executable, "-m", "hipt.cli", "tile", str(d), "--out", str(out), "--mpp", "0.5"]
            + ["--no-progress", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=limit_memory,
        )
        return p, {r["slide_id"]: r for r in csv.DictReader(open(out / "tiling.csv"))}

    p, rows = run()
    assert p.returncode == 1, p.stderr
    assert rows["good"]["status"] == "ok" and rows["huge"]["status"] == "failed"
    assert "300000x300000 px" in rows["huge"]["error"] and "--max-slide-px" in rows["huge"]["error"]
    assert "Traceback" not in p.stderr
    # Under a higher limit, the claim is still impossible for a file of under 4 MB.
    p, rows = run("--max-slide-px", str(10**12))
    assert p.returncode == 1 and rows["good"]["status"] == "ok"
    assert "cannot be this small" in rows["huge"]["error"]
