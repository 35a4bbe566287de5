"""The Slurm templates on a real Slurm (Debian's slurm-wlm) started privately on localhost.

Each array task runs the ``hipt`` command on its own share of the work; the tests check that the
tasks together did all of it, once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
    from hipt.synthetic_cohort import make_subtyping_cohort

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


@pytest.mark.slow
def test_pretrain_requeued_after_usr1_resumes_to_the_same_weights(slurm):
    """A 2-process torchrun job gets SIGUSR1 mid-run, saves, requeues itself and finishes with
    exactly the weights of an uninterrupted job."""
    import time

    import torch
    from dino_data import write_feature_grids
    from test_dino_train import TINY2

    work = slurm.root / "pretrain"
    features = write_feature_grids(work / "features", n_files=3, regions=8, seed=4)
    cfg = {"data": {"features_dir": str(features)}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    sets = [a for o in [*TINY2, "train.epochs=6"] for a in ("--set", o)]
    env = {**job_env(), "CONFIG": str(work / "tiny.yaml"), "NPROC_PER_NODE": "2",
           "OMP_NUM_THREADS": "1", "HIPT_TEST_STEP_SLEEP": "0.2"}  # fmt: skip
    script = str(ROOT / "slurm" / "pretrain_stage2.sbatch")

    def submit(name: str) -> str:
        return slurm.sbatch(
            "--nodes=1", "--cpus-per-task=2", "--mem=3000", f"--chdir={work}",
            f"--output={work}/{name}.out", script, *sets,
            env={**env, "OUT": str(work / name)},
        )  # fmt: skip

    t0 = time.time()
    ref = submit("straight")
    slurm.wait(ref, timeout_s=300)
    print(f"straight job: {time.time() - t0:.0f} s")
    ref_state = json.loads((work / "straight" / "state.json").read_text())
    assert ref_state["status"] == "complete", (work / "straight.out").read_text()

    job = submit("requeued")
    log = work / "requeued" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    print(f"requeued job at step 4: {time.time() - t0:.0f} s")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=slurm.env)
    deadline = time.time() + 300
    state_file = work / "requeued" / "state.json"
    while time.time() < deadline:
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("status") == "complete":
            break
        time.sleep(0.5)
    print(f"requeued job complete: {time.time() - t0:.0f} s")
    slurm.wait(job, timeout_s=120)
    out = (work / "requeued.out").read_text()
    assert "preempted" in out and "restart 1" in out, out
    assert json.loads(state_file.read_text())["status"] == "complete", out
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 19)), out
    a = torch.load(work / "straight" / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(work / "requeued" / "checkpoint.pth", map_location="cpu", weights_only=True)
    for part in ("student", "teacher_native"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
