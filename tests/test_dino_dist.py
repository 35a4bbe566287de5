"""Two processes under a real ``torchrun`` (gloo on CPU) against one process with the same batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from dino_data import write_feature_grids
from test_dino_train import SINGLE, TINY2, stage2

from train.dino.engine import pretrain

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    features = write_feature_grids(tmp_path / "features", n_files=2, regions=8, seed=2)
    extra = ["train.epochs=3", "model.drop_path=0.0"]  # drop-path masks differ per process
    out = tmp_path / "two"
    sets = [a for o in [f"data.features_dir={features}", *TINY2, *extra] for a in ("--set", o)]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [
        torchrun, "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "hipt.cli", "pretrain", "stage2", "--out", str(out), *sets,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert two["world_size"] == 2 and two["step"] == 6  # 16 grids // batch 8, 3 epochs
    digests = two["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same weights
    losses = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(0 < v < 20 for v in losses)

    one = pretrain(stage2(features, tmp_path / "one", *extra), SINGLE)
    assert one.step == 6
    ref = torch.load(tmp_path / "one" / "checkpoint.pth", map_location="cpu", weights_only=True)
    for part in ("student", "teacher_native"):
        for k, v in ref[part].items():
            torch.testing.assert_close(two[part][k], v, atol=2e-5, rtol=1e-4, msg=f"{part} {k}")
    torch.testing.assert_close(two["center"], ref["center"], atol=1e-5, rtol=1e-4)
