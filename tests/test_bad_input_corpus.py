"""The bad-input corpus: every kind of bad input, through the real ``hipt`` command in subprocesses.

Each case is one row of the tables in ``corpus_batch.py`` and ``corpus_usage.py``: an id, the
command it goes to, how to make the bad input, the expected exit code and a regex of the one line
that names the file or value (``{subject}``) and the problem. Per case the test asserts that exit code, that line, no traceback and, for the
batch commands, that the good inputs beside it finished and the earlier outputs are unchanged.

Cheap by design: the bad slides sit in one folder with good slides and one ``hipt tile`` run
covers them all; one ``hipt embed`` run covers the bad tiles files and one ``hipt inspect`` run
the bad HDF5 files. Usage errors and ``hipt train`` refusals each run as their own subprocess,
two at a time, against output folders that earlier good runs filled (hashed before and after).
The encoders are random and one block deep (``--random-weights --random-depth 1,1``).

Faults that need more than a bad input are tested where their concern lives:

- full disk (a small tmpfs, when the tests run as root): ``test_embed_faults.py``
  ``::test_disk_full_says_which_file_exits_1_and_keeps_earlier_files`` and
  ``::test_every_command_reports_a_full_disk_in_one_line``;
- SIGTERM: ``test_cli_tile.py::test_sigterm_stops_workers_and_records_what_finished``,
  ``test_embed_faults.py::test_sigterm_stops_workers_drops_temporaries_and_exits_143``,
  ``test_train_signals.py``, ``test_dino_train.py``;
- a killed worker or run: ``test_cli_tile.py::test_a_killed_worker_fails_only_its_slide``,
  ``test_embed_kill.py``,
  ``test_dino_train.py::test_killed_and_resumed_run_is_bit_identical_to_a_straight_run``;
- two runs on one output folder: ``test_embed_faults.py::test_two_runs_started_together_share_the_work``
  and ``::test_locks_of_dead_runs_are_taken_over_and_live_ones_left_alone``;
- the huge claimed size under a memory limit: ``test_cli_tile.py``
  ``::test_huge_claimed_size_fails_that_slide_only``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from corpus_batch import EMBED_BATCH, FAST, INSPECT_BATCH, SMALL, TILE_BATCH, Case
from corpus_usage import USAGE, train_run
from h5_inputs import tiles_for

from hipt.runlock import locked_file
from hipt.synthetic.cohorts import make_subtyping_cohort

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def hipt(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hipt.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (minus names in ``skip``), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name not in skip
    }


def matching(text: str, pattern: re.Pattern[str]) -> list[str]:
    return [ln for ln in text.splitlines() if pattern.search(ln)]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


CASES = TILE_BATCH + EMBED_BATCH + INSPECT_BATCH + USAGE


def test_every_case_has_its_own_id_and_every_command_a_case() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.command for c in CASES} == {"tile", "embed", "inspect", "train"}
    assert all(c.batch for c in TILE_BATCH + EMBED_BATCH + INSPECT_BATCH)
    assert not any(c.batch for c in USAGE)


# --------------------------------------------------------------------------------- the runs
def _said(case: Case, run: subprocess.CompletedProcess, subject: object) -> None:
    """The exit code, exactly one line naming the subject and the problem, no traceback."""
    both = run.stdout + "\n" + run.stderr
    assert run.returncode == case.code, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    assert "weights_only=False" not in both  # never advice to load pickles
    lines = matching(both, case.pattern(subject))
    assert len(lines) == 1, (case.line, subject, both[-3000:])


def _unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    assert {k: after.get(k) for k in before} == before


def once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(folder)`` once per test session, also when pytest-xdist spreads the cases over
    workers: the first builds and keeps the result, the others wait for it and read it (the runs
    cost a minute of CPU; doing them per worker would double it)."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of one session
    kept = base / f"{name}.pickle"
    with locked_file(kept, timeout_s=1800):
        if kept.exists():
            return pickle.loads(kept.read_bytes())
        folder = base / name
        folder.mkdir()
        value = build(folder)
        kept.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture(scope="module")
def tile_batch(
    tmp_path_factory, tiff_050, tiny_biopsy, not_a_slide, truncated_tiff, no_mpp_tiff,
    suspicious_svs, blank_slide, corrupt_lowres_slide,
) -> SimpleNamespace:  # fmt: skip
    """Good slides tiled once; then the bad ones added to their folder and the folder tiled again."""
    fixtures = SimpleNamespace(
        not_a_slide=not_a_slide, truncated_tiff=truncated_tiff, no_mpp_tiff=no_mpp_tiff.path,
        suspicious_svs=suspicious_svs.path, blank_slide=blank_slide.path,
        corrupt_lowres_slide=corrupt_lowres_slide.path, tiny_biopsy=tiny_biopsy.path,
    )  # fmt: skip
    build = partial(_run_tile_batch, good=tiff_050.path, fixtures=fixtures)
    return once(tmp_path_factory, "tile_batch", build)


def _run_tile_batch(root: Path, good: Path, fixtures: SimpleNamespace) -> SimpleNamespace:
    b = SimpleNamespace(root=root, slides=root / "slides", out=root / "out", fixtures=fixtures)
    b.extra = []
    b.slides.mkdir()
    shutil.copy(good, b.slides / "good_a.tiff")
    first = hipt("tile", b.slides, "--out", b.out, "--no-progress")
    assert first.returncode == 0, first.stderr
    b.earlier = snapshot(b.out, skip=("tiling.csv",))
    shutil.copy(fixtures.tiny_biopsy, b.slides / "good_b.tiff")
    b.subjects = {c.id: c.make(b) for c in TILE_BATCH}
    b.run = hipt("tile", b.slides, *b.extra, "--out", b.out, "--no-progress")
    b.rows = read_rows(b.out / "tiling.csv")
    b.after = snapshot(b.out, skip=("tiling.csv",))
    return b


@pytest.mark.parametrize("case", TILE_BATCH, ids=lambda c: c.id)
def test_tile_batch(case: Case, tile_batch: SimpleNamespace) -> None:
    b = tile_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    rows = [r for r in b.rows if r["slide_path"] == str(subject)]
    if case.status is None:
        assert len(rows) == 1  # reported, but no second row beside the slide's own
    else:
        assert [r["status"] for r in rows] == [case.status], rows
        assert str(subject) in rows[0]["error"]
        tiled = (b.out / "tiles" / f"{rows[0]['slide_id']}.h5").exists()
        assert tiled == (case.status == "ok") or case.id == "tile-id-taken"  # good_b's own file
    status = {r["slide_path"]: r["status"] for r in b.rows}
    assert status[str(b.slides / "good_a.tiff")] == "skipped"  # tiled by the first run
    assert status[str(b.slides / "good_b.tiff")] == "ok"  # the batch went on
    assert (b.out / "tiles" / "good_b.h5").is_file() and (b.out / "qc" / "good_b.png").is_file()
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def embed_batch(tmp_path_factory, tiff_050) -> SimpleNamespace:
    """Two slides embedded once; then bad tiles files added and one features file damaged."""
    return once(tmp_path_factory, "embed_batch", partial(_run_embed_batch, good=tiff_050.path))


def _run_embed_batch(root: Path, good: Path) -> SimpleNamespace:
    b = SimpleNamespace(root=root, tiles=root / "tiles", out=root / "out")
    b.tiles.mkdir()
    b.slide = Path(shutil.copy(good, root / "slide.tiff"))
    for sid in ("e_good", "e_flip"):
        tiles_for(b.tiles, sid, b.slide, **SMALL)
    first = hipt("embed", "--tiles", b.tiles, "--out", b.out, *FAST, "--no-progress")
    assert first.returncode == 0, first.stderr
    b.earlier = snapshot(b.out / "features", skip=("e_flip.h5",))
    b.subjects = {c.id: c.make(b) for c in EMBED_BATCH}
    b.run = hipt("embed", "--tiles", b.tiles, "--out", b.out, *FAST)  # progress: says 'redoing'
    b.rows = {r["slide_id"]: r for r in read_rows(b.out / "embedding.csv")}
    b.after = snapshot(b.out / "features")
    return b


@pytest.mark.parametrize("case", EMBED_BATCH, ids=lambda c: c.id)
def test_embed_batch(case: Case, embed_batch: SimpleNamespace) -> None:
    b = embed_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    row = b.rows[subject.stem]
    assert row["status"] == case.status, row
    if case.status == "failed":
        assert str(subject) in row["error"]
        assert not (b.out / "features" / f"{subject.stem}.h5").exists()
    # The batch went on: the damaged e_flip was embedded again (each region costs seconds of
    # CPU, so it is the one good slide this run embeds), e_good was reused as it was.
    assert b.rows["e_flip"]["status"] == "ok" and b.rows["e_good"]["status"] == "skipped"
    assert "e_flip.h5" in b.after
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def inspect_batch(tmp_path_factory, embed_batch) -> SimpleNamespace:
    """A good tiles and a good features file of the embed batch, and the bad files beside them."""
    build = partial(_run_inspect_batch, embed_batch=embed_batch)
    return once(tmp_path_factory, "inspect_batch", build)


def _run_inspect_batch(folder: Path, embed_batch: SimpleNamespace) -> SimpleNamespace:
    b = SimpleNamespace(folder=folder)
    b.good_tiles = Path(shutil.copy(embed_batch.tiles / "e_good.h5", folder / "tiles.h5"))
    features = embed_batch.out / "features" / "e_good.h5"
    b.good_features = Path(shutil.copy(features, folder / "features.h5"))
    b.subjects = {c.id: c.make(b) for c in INSPECT_BATCH}
    b.earlier = snapshot(folder)
    files = [b.good_tiles, b.good_features, *b.subjects.values()]
    b.run = hipt("inspect", "--check-values", *files)
    b.after = snapshot(folder)
    return b


@pytest.mark.parametrize("case", INSPECT_BATCH, ids=lambda c: c.id)
def test_inspect_batch(case: Case, inspect_batch: SimpleNamespace) -> None:
    b = inspect_batch
    subject = b.subjects[case.id]
    _said(case, b.run, subject)
    reports = b.run.stdout.split("\n\n")
    mine = [r for r in reports if r.startswith(f"file:     {subject}\n")]
    assert len(mine) == 1 and "valid:    NO: " in mine[0]
    for good in (b.good_tiles, b.good_features):  # the other files were described too
        ok = [r for r in reports if r.startswith(f"file:     {good}\n")]
        assert len(ok) == 1 and ok[0].rstrip().endswith("valid:    yes")
    _unchanged(b.earlier, b.after)


@pytest.fixture(scope="module")
def usage_runs(tmp_path_factory, tile_batch, embed_batch) -> SimpleNamespace:
    """Every usage case as its own run, two at a time, against folders earlier runs filled."""
    build = partial(_run_usage, tile_batch=tile_batch, embed_batch=embed_batch)
    return once(tmp_path_factory, "usage", build)


def _run_usage(
    root: Path, tile_batch: SimpleNamespace, embed_batch: SimpleNamespace
) -> SimpleNamespace:
    root, train_root = root / "scratch", root / "train"
    root.mkdir()
    train_root.mkdir()
    u = SimpleNamespace(root=root, slide=tile_batch.slides / "good_a.tiff", tile_out=tile_batch.out)
    u.a_file = root / "a_file"
    u.a_file.write_text("a file, not a folder\n")
    u.good_tiles = root / "good_tiles"
    u.good_tiles.mkdir()
    shutil.copy(embed_batch.tiles / "e_good.h5", u.good_tiles)
    u.embed_out = embed_batch.out
    _train_good_run(u, train_root)
    made = {c.id: c.make(u) for c in USAGE}
    watched = (u.tile_out, u.embed_out, u.train_root, u.a_file.parent)
    u.before = [snapshot(w) for w in watched]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: import time is most of each run
        runs = pool.map(lambda c: hipt(c.command, *made[c.id][0]), USAGE)
        u.runs_by_id = {c.id: (run, made[c.id][1]) for c, run in zip(USAGE, runs, strict=True)}
    u.after = [snapshot(w) for w in watched]
    return u


def _train_good_run(u: Any, train_root: Path) -> None:
    """A finished tiny ``hipt train`` run in ``u.runs``: the earlier output the refusals must keep."""
    u.train_root = train_root / "deep" / "er"  # so '../../../x' from runs/ stays inside
    u.cohort = make_subtyping_cohort(u.train_root / "cohort", n_cases=8, regions=(2, 3), seed=0)
    u.runs = u.train_root / "runs"
    u.train_config = {
        "cohort": "good",
        "csv": str(u.cohort.csv_path),
        "features_dir": str(u.cohort.features_dir),
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 8}},
        "splits": {"folds": 2},
        "train": {"epochs": 1, "progress": False},
    }
    args, _ = train_run("good")(u)
    good = hipt("train", *args)
    assert good.returncode == 0, good.stderr
    assert (u.runs / "good" / "fold_1" / "metrics.json").is_file()
    u.train_root = train_root  # watched as a whole: nothing may appear anywhere in it


@pytest.mark.parametrize("case", USAGE, ids=lambda c: c.id)
def test_usage(case: Case, usage_runs: SimpleNamespace) -> None:
    run, subject = usage_runs.runs_by_id[case.id]
    _said(case, run, subject)
    for before, after in zip(usage_runs.before, usage_runs.after, strict=True):
        assert after == before  # no output written, no earlier output changed
