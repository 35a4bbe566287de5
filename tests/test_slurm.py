"""The Slurm templates on a real Slurm (Debian's slurm-wlm) started privately on localhost.

Each array task runs the ``hipt`` command on its own share of the work; the tests check that the
tasks together did all of it, once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from slurm_cluster import LocalSlurm, slurm_available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not slurm_available(), reason="slurmctld/slurmd/munge not installed (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp_path: its parents are private to root, and munged runs as 'munge'.
    root = Path(tempfile.mkdtemp(prefix="hipt-slurm-"))
    cluster = LocalSlurm(root)
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def job_env() -> dict[str, str]:
    # Array tasks run the same 'hipt' as the tests.
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "HIPT_VENV": ""}


def test_train_array_runs_one_fold_per_task(slurm, tmp_path):
    from hipt.synthetic.cohorts import make_subtyping_cohort

    work = slurm.root / "train"
    cohort = make_subtyping_cohort(work / "cohort", n_cases=24, regions=(4, 8), seed=3)
    cfg = {
        "cohort": "slurmtest",
        "task": "subtype",
        "csv": str(cohort.csv_path),
        "features_dir": str(cohort.features_dir),
        "out": str(work / "runs"),
        "model": {"name": "abmil"},
        "splits": {"folds": 3},
        "train": {"epochs": 2, "progress": False},
    }
    cfg_path = work / "cohort.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    job = slurm.sbatch(
        "--array=0-2", "--cpus-per-task=1", "--mem=1500", f"--chdir={work}",
        f"--output={work}/task-%a.out", str(ROOT / "slurm" / "train.sbatch"), str(cfg_path),
        env=job_env(),
    )  # fmt: skip
    slurm.wait(job, timeout_s=600)
    logs = "\n".join(p.read_text() for p in sorted(work.glob("task-*.out")))
    run = work / "runs" / "slurmtest"
    folds = []
    for k in range(3):
        metrics = run / f"fold_{k}" / "metrics.json"
        assert metrics.exists(), f"fold {k} not written; task logs:\n{logs}"
        folds.append(json.loads(metrics.read_text()))
        assert folds[-1]["status"] == "complete" and folds[-1]["fold"] == k
    assert sorted(p.name for p in run.glob("fold_*")) == ["fold_0", "fold_1", "fold_2"]
    # Each task tested its own fold's cases: together they test every case exactly once.
    tested = [
        pd.read_csv(run / f"fold_{k}" / "predictions.csv")["case_id"].tolist() for k in range(3)
    ]
    all_tested = [c for t in tested for c in t]
    assert sorted(all_tested) == sorted({r["case_id"] for r in cohort.table})
    # The dependent report job the template describes sees every fold.
    report = slurm.sbatch(
        f"--dependency=afterany:{job}", f"--chdir={work}", f"--output={work}/report.out",
        "--wrap", f"hipt train --config {cfg_path} --report-only", env=job_env(),
    )  # fmt: skip
    slurm.wait(report, timeout_s=300)
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary["fold"].astype(str)) >= {"0", "1", "2"}, (work / "report.out").read_text()


def test_tile_array_tiles_every_slide_once(slurm):
    from hipt.h5schema import read_tiles
    from hipt.synthetic import write_generic_tiff

    work = slurm.root / "tile"
    (work / "slides").mkdir(parents=True)
    slides = [
        write_generic_tiff(work / "slides" / f"s{i}.tiff", 4096, 3072, mpp=0.5, seed=i).path
        for i in range(5)
    ]
    out = work / "out"
    job = slurm.sbatch(
        "--array=0-2", "--cpus-per-task=1", "--mem=1500", f"--chdir={work}",
        f"--output={work}/task-%a.out", str(ROOT / "slurm" / "tile.sbatch"),
        env={**job_env(), "SLIDES": str(work / "slides"), "OUT": str(out),
             "HIPT_TILE_ARGS": "--no-progress"},
    )  # fmt: skip
    slurm.wait(job, timeout_s=300)
    logs = "\n".join(p.read_text() for p in sorted(work.glob("task-*.out")))
    records = sorted(out.glob("tiling.shard-*-of-3.csv"))
    assert len(records) == 3, logs  # one record per task, none shared
    rows = pd.concat([pd.read_csv(r) for r in records])
    assert sorted(rows["slide_id"]) == sorted(p.stem for p in slides), logs
    assert set(rows["status"]) == {"ok"}, logs
    for p in slides:
        assert len(read_tiles(out / "tiles" / f"{p.stem}.h5")) >= 1
