"""``hipt train`` under SIGTERM (Slurm's preemption): exit 143, says what finished, keeps its
epoch checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from hipt.synthetic.cohorts import make_subtyping_cohort

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sigterm_exits_143_says_what_finished_and_keeps_the_epoch_checkpoint(
    tmp_path: Path,
) -> None:
    cohort = make_subtyping_cohort(tmp_path / "c", n_cases=12, regions=(2, 4), seed=5)
    config = tmp_path / "cohort.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cohort": "sig",
                "csv": str(cohort.csv_path),
                "features_dir": str(cohort.features_dir),
                "model": {"name": "abmil", "kwargs": {"hidden_dim": 8}},
                "splits": {"folds": 2},
                "train": {"epochs": 400, "patience": 0, "progress": False},
            }
        )
    )
    cmd = [sys.executable, "-m", "hipt.cli", "train", "--config", str(config)]
    cmd += ["--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    resume = tmp_path / "runs" / "sig" / "fold_0" / "resume.pt"
    deadline = time.time() + 180
    while not resume.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert resume.exists(), "the fold never saved an epoch"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "hipt train: terminated: 0 fold(s) finished this run; fold 0 was interrupted" in err
    assert "resumes from its last epoch" in err
    run = tmp_path / "runs" / "sig"
    assert not list(run.rglob(".*.tmp-*"))  # no temporary file left behind
    assert not (run / "fold_0" / "metrics.json").exists()
    # What the rerun resumes from is whole (resuming itself is checked in test_train_subtype).
    state = torch.load(resume, map_location="cpu", weights_only=True)
    assert "model" in state and "optimizer" in state
