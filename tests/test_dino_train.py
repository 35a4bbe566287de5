"""DINO pretraining end to end on tiny encoders: learning, exact resume, export, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dino_data import write_feature_grids

from hipt.cli import main as hipt_main
from hipt.distributed import DistEnv
from hipt.models import create_model
from hipt.models.checkpoint import CheckpointError, load_encoder_weights
from train.dino.config import load_stage_config
from train.dino.engine import pretrain

ROOT = Path(__file__).resolve().parents[1]
SINGLE = DistEnv("single")
TINY2 = [
    "model.kwargs={depth: 1}",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "crops.local_crops=2",
    "crops.global_tokens=8",
    "crops.local_tokens=4",
    "dino.center_momentum=0.99",
    "optim.lr=0.01",
    "optim.warmup_epochs=1",
    "optim.freeze_last_layer_epochs=0",
    "train.batch_size=8",
    "train.device=cpu",
    "train.workers=0",
    "train.threads=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_feature_grids(tmp_path_factory.mktemp("features"), n_files=3, regions=8, seed=1)


def stage2(features: Path, out: Path, *extra: str):
    return load_stage_config(
        "stage2", overrides=[f"data.features_dir={features}", f"out={out}", *TINY2, *extra]
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {**{"s." + k: v for k, v in state["student"].items()}, **state["teacher"]}


def test_stage2_loss_decreases_and_outputs_are_written(features, tmp_path):
    outcome = pretrain(stage2(features, tmp_path / "run", "train.epochs=12"), SINGLE)
    assert outcome.status == "complete" and outcome.step == 36  # 24 grids // 8 = 3 steps/epoch
    first, last = sum(outcome.losses[:6]) / 6, sum(outcome.losses[-6:]) / 6
    assert last < first - 0.5, outcome.losses
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 37))
    assert {"loss", "lr", "teacher_temp", "images_per_s", "eta_s"} <= set(log[0])
    assert json.loads((tmp_path / "run" / "state.json").read_text())["status"] == "complete"
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "depth: 1" in saved and "batch_size: 8" in saved


def test_killed_and_resumed_run_is_bit_identical_to_a_straight_run(features, tmp_path):
    extra = [
        "train.epochs=4",
        "model.drop_path=0.2",  # random per step: the resumed run must restore the RNG
        "optim.freeze_last_layer_epochs=1",
        "train.checkpoint_every_steps=100",
    ]
    straight = pretrain(stage2(features, tmp_path / "straight", *extra), SINGLE)
    assert straight.status == "complete" and straight.step == 12
    # A real process, SIGTERM'd mid-run: it saves the step it reached and exits 3 (requeue me).
    out = tmp_path / "killed"
    sets = [a for o in [f"data.features_dir={features}", *TINY2, *extra] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "hipt.cli", "pretrain", "stage2", "--out", str(out), *sets]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Slow each step a little (a sleep between steps) so the signal lands mid-run.
    proc = subprocess.Popen(
        cmd, env={**env, "HIPT_TEST_STEP_SLEEP": "0.3"}, stderr=subprocess.PIPE, text=True
    )
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "preempted" and 3 <= state["step"] < 12, err
    resumed = pretrain(stage2(features, out, *extra), SINGLE)  # same folder: resumes
    assert resumed.status == "complete" and resumed.step == 12
    a, b = weights(tmp_path / "straight" / "checkpoint.pth"), weights(out / "checkpoint.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # no step logged twice across the kill


def test_exported_teacher_loads_strictly_in_hipt_lgp_and_as_vit4k(features, tmp_path):
    out = tmp_path / "run"
    pretrain(stage2(features, out, "train.epochs=1"), SINGLE)
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    native = {
        k[len("backbone.") :]: v
        for k, v in ckpt["teacher_native"].items()
        if k.startswith("backbone.")
    }
    export = torch.load(out / "teacher.pth", map_location="cpu", weights_only=True)
    assert export["arch"] == {"name": "vit4k_xs", "kwargs": {"depth": 1}}
    assert "backbone.phi.0.weight" in export["teacher"] and "head.mlp.0.weight" in export["teacher"]
    vit4k = create_model("vit4k_xs", depth=1)
    load_encoder_weights(vit4k, out / "teacher.pth")  # strict, weights_only
    assert all(torch.equal(vit4k.state_dict()[k], v) for k, v in native.items())
    # hipt train's model.kwargs.vit4k_weights: the builder reads the depth from the file.
    lgp = create_model("hipt_lgp", n_classes=2, vit4k_weights=str(out / "teacher.pth"))
    assert len(lgp.local_vit.blocks) == 1
    torch.testing.assert_close(lgp.local_vit.pos_embed, native["pos_embed"])
    grid = torch.randn(2, 384, 16, 16)
    torch.testing.assert_close(lgp.local_vit.eval()(grid), vit4k.eval()(grid))


def test_bad_inputs_fail_before_any_step_with_one_line(features, tmp_path, capsys):
    def run(*args: str) -> str:
        code = hipt_main(["pretrain", "stage2", "--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.count("\n") <= 1 and err.startswith("hipt pretrain: error"), err
        return err

    (tmp_path / "empty").mkdir()
    base = [a for o in TINY2 for a in ("--set", o)]
    assert "no features/*.h5" in run("--set", f"data.features_dir={tmp_path / 'empty'}", *base)
    assert "no such folder" in run("--set", f"data.features_dir={tmp_path / 'nope'}", *base)
    feat = ["--set", f"data.features_dir={features}", *base]
    assert "larger than the data" in run(*feat, "--set", "train.batch_size=64")
    # A checkpoint of another architecture, then a corrupted one, given to --resume.
    good = tmp_path / "good"
    pretrain(stage2(features, good, "train.epochs=1"), SINGLE)
    other = run(*feat, "--set", "model.kwargs={depth: 2}", "--resume", str(good / "checkpoint.pth"))
    assert "architecture" in other and "'depth': 1" in other
    broken = tmp_path / "broken.pth"
    broken.write_bytes((good / "checkpoint.pth").read_bytes()[:5000])
    assert "broken.pth" in run(*feat, "--resume", str(broken), "--out", str(tmp_path / "o"))
    assert "not a hipt pretraining checkpoint" in run(
        *feat, "--resume", str(good / "teacher.pth"), "--out", str(tmp_path / "o2")
    )
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_a_corrupted_checkpoint_is_refused_not_half_loaded(features, tmp_path):
    out = tmp_path / "run"
    pretrain(stage2(features, out, "train.epochs=1"), SINGLE)
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        pretrain(stage2(features, tmp_path / "x", f"resume={tmp_path / 'partial.pth'}"), SINGLE)


def test_koleo_loss_is_minus_log_nearest_neighbour_distance():
    from train.dino.model import koleo_loss

    # Unit vectors at 0°, 90° and 180°: every nearest neighbour lies sqrt(2) away.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-0.5 * torch.log(torch.tensor(2.0)).item())
    # Scale does not matter (rows are normalised); a close pair costs more than a spread set.
    assert koleo_loss(3 * x).item() == pytest.approx(koleo_loss(x).item())
    pair = torch.tensor([[1.0, 0.0], [0.99, 0.141], [-1.0, 0.0]])
    assert koleo_loss(pair) > koleo_loss(x) + 1.0
    assert koleo_loss(x[:1]).item() == 0.0  # no neighbour: nothing to spread


def _near_identical_grids(features: Path, out: Path) -> Path:
    """The fixture's grids squeezed to a tenth of their spread around the mean grid.

    Like the patch features of a barely trained ViT-256: regions differ only a little, the
    situation in which a short DINO run collapses towards one embedding.
    """
    import shutil

    import h5py
    import numpy as np

    shutil.copytree(features, out)
    for path in sorted(out.glob("*.h5")):
        with h5py.File(path, "r+") as f:
            grids = f["patch_features"][:].astype(np.float32)
            mean = grids.mean(axis=(0, 1), keepdims=True)
            f["patch_features"][:] = (mean + 0.1 * (grids - mean)).astype(np.float16)
    return out


def _teacher_embeddings(run: Path, features: Path) -> torch.Tensor:
    import h5py

    from hipt.models.slide import patch_grid_to_vit4k_input

    vit4k = create_model("vit4k_xs", depth=1)
    load_encoder_weights(vit4k, run / "teacher.pth")
    grids = []
    for path in sorted(features.glob("*.h5")):
        with h5py.File(path) as f:
            grids.append(torch.from_numpy(f["patch_features"][:].astype("float32")))
    with torch.no_grad():
        return vit4k.eval()(patch_grid_to_vit4k_input(torch.cat(grids)))


def test_koleo_weight_spreads_the_embeddings_of_a_short_run(features, tmp_path):
    from train.dino.model import koleo_loss

    squeezed = _near_identical_grids(features, tmp_path / "features")
    short = ["train.epochs=6", "dino.momentum_teacher=0.9", "optim.lr=0.002"]
    plain = pretrain(stage2(squeezed, tmp_path / "plain", *short), SINGLE)
    spread = pretrain(stage2(squeezed, tmp_path / "koleo", *short, "dino.koleo_weight=0.5"), SINGLE)
    assert plain.step == spread.step == 18
    # Same seed, data and steps: only the spreading term differs, and the exported teacher's
    # embeddings of the training regions end up further from their nearest neighbours.
    before = _teacher_embeddings(tmp_path / "plain", squeezed)
    after = _teacher_embeddings(tmp_path / "koleo", squeezed)
    assert koleo_loss(after) < koleo_loss(before) - 0.05
    assert after.std(dim=0).mean() > 1.1 * before.std(dim=0).mean()
