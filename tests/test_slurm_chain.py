"""``hipt slurm submit all`` on a real Slurm (Debian's slurm-wlm, started privately on localhost).

The whole chain (tile → pretrain stage 1 → embed → pretrain stage 2 → embed again → train and its
report → heatmaps) runs as chained jobs on a small generated cohort with tiny models; every output
is checked, then the same submission again must redo nothing. A pretraining job's requeue after
``scancel --signal=USR1`` is covered by ``test_slurm.py::test_pretrain_requeued_after_usr1_*``,
on the same template the chain submits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
import yaml
from slurm_cluster import LocalSlurm, slurm_available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        not slurm_available(), reason="slurmctld/slurmd/munge not installed (.ci/run installs them)"
    ),
    pytest.mark.slow,
]

N_SLIDES = 4
STAGE1 = {
    "data": {"tissue": {"min_fraction": 0.3}},
    "model": {"arch": "vit256_s16", "kwargs": {"depth": 1}, "drop_path": 0.0, "out_dim": 128,
              "hidden_dim": 64, "bottleneck_dim": 32},
    "crops": {"global_px": 32, "local_px": 16, "local_crops": 1},
    "optim": {"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
    "train": {"epochs": 1, "batch_size": 256, "device": "cpu", "workers": 0},
}  # fmt: skip
STAGE2 = {
    "model": {"arch": "vit4k_xs", "kwargs": {"depth": 1}, "drop_path": 0.0, "out_dim": 128,
              "hidden_dim": 64, "bottleneck_dim": 32},
    "crops": {"local_crops": 1, "global_tokens": 8, "local_tokens": 4},
    "optim": {"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
    "train": {"epochs": 2, "batch_size": 2, "device": "cpu", "workers": 0},
}  # fmt: skip


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp_path: its parents are private to root, and munged runs as 'munge'.
    root = Path(tempfile.mkdtemp(prefix="hipt-chain-"))
    cluster = LocalSlurm(root)
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def _write_inputs(work: Path) -> Path:
    """Slides, cohort CSV, pretraining and training configs, and the cluster config."""
    from hipt.synthetic import write_generic_tiff

    slides = work / "slides"
    slides.mkdir(parents=True)
    rows = ["slide_id,case_id,label"]
    for i in range(N_SLIDES):
        write_generic_tiff(slides / f"s{i}.tiff", 4096, 4096, mpp=0.5, seed=i, n_blobs=4)
        rows.append(f"s{i},c{i},{'AB'[i % 2]}")
    (work / "cohort.csv").write_text("\n".join(rows) + "\n")
    stage1 = {**STAGE1, "data": {**STAGE1["data"], "tiles_dir": str(work / "out" / "tiles")}}
    stage2 = {**STAGE2, "data": {"features_dir": str(work / "out" / "features")}}
    (work / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    (work / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    (work / "chaintest.yaml").write_text(yaml.safe_dump({
        "cohort": "chaintest", "task": "subtype", "csv": "cohort.csv",
        "features_dir": "out/features", "model": {"name": "abmil", "kwargs": {"hidden_dim": 0}},
        "splits": {"folds": 2, "val_fraction": 0.3}, "train": {"epochs": 2, "progress": False},
    }))  # fmt: skip
    cluster = {
        "out": "out",
        "slides": "slides",
        "defaults": {"cpus": 1, "mem": "1500M", "time": "00:30:00"},
        "tile": {"resources": {"array_tasks": 2}},
        "pretrain_stage1": {"config": "stage1.yaml"},
        "embed": {"resources": {"array_tasks": 2}, "args": ["--batch-regions", "1"]},
        "pretrain_stage2": {"config": "stage2.yaml"},
        "train": {"configs": ["chaintest.yaml"], "folds": 2},
        "heatmap": {"fold": 0, "resources": {"array_tasks": 2},
                    "args": ["--top-k", "1", "--set", "region_png_px=256",
                             "--set", "thumbnail_px=256"]},
    }  # fmt: skip
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


def _env(slurm: LocalSlurm, work: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **slurm.env,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "HIPT_VENV": "",
        "DEVICE": "cpu",  # embed.sbatch defaults to cuda
        "NPROC_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _submit(slurm: LocalSlurm, work: Path, config: Path, first: bool = True) -> dict[str, str]:
    res = subprocess.run(
        [sys.executable, "-m", "hipt.cli", "slurm", "submit", "all", "--config", str(config)],
        cwd=work, env=_env(slurm, work), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ids = dict(re.findall(r"^(\S+): job (\d+)$", res.stdout, flags=re.M))
    # Once stage 2 is complete, the first embedding (random ViT-4K) is not submitted again.
    assert set(ids) == {
        "tile", "pretrain_stage1", *(["embed-patches"] if first else []), "pretrain_stage2",
        "embed", "train-chaintest", "report-chaintest", "heatmap-chaintest",
    }, res.stdout  # fmt: skip
    return ids


def _wait_all(slurm: LocalSlurm, ids: dict[str, str], work: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    for job in ids.values():
        try:
            slurm.wait(job, timeout_s=max(1.0, deadline - time.time()))
        except TimeoutError:
            raise AssertionError(f"chain not finished in {timeout_s} s:\n{_logs(work)}") from None


def _logs(work: Path) -> str:
    logs = sorted((work / "out" / "slurm-logs").glob("*.out"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in logs)


def _outputs(out: Path) -> dict[str, float]:
    """Modification times of every output a stage writes (what must not be written again)."""
    files = [
        *out.glob("tiles/*.h5"), *out.glob("features/*.h5"), *out.glob("runs/*/fold_*/metrics.json"),
        *out.glob("runs/*/fold_*/model.pt"), *out.glob("heatmaps/*/heatmap.json"),
        *out.glob("heatmaps/*/slide.png"),
    ]  # fmt: skip
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_whole_chain_runs_then_resubmitting_redoes_nothing(slurm):
    from hipt.models.checkpoint import file_sha256

    work = slurm.root / "chain"
    config = _write_inputs(work)
    out = work / "out"
    t0 = time.time()
    _wait_all(slurm, _submit(slurm, work, config), work, timeout_s=1500)
    print(f"whole chain: {time.time() - t0:.0f} s")
    logs = _logs(work)

    # tile: every slide once, ok
    tiling = "\n".join(p.read_text() for p in out.glob("tiling*.csv"))
    for i in range(N_SLIDES):
        assert (out / "tiles" / f"s{i}.h5").is_file(), logs
        assert re.search(rf"^s{i},.*\bok\b", tiling, flags=re.M), tiling
    # pretraining: both stages complete, each teacher exported in the released layout
    for stage in ("stage1", "stage2"):
        state = json.loads((out / "pretrain" / stage / "state.json").read_text())
        assert state["status"] == "complete" and state["step"] == state["total_steps"], logs
    vit256 = file_sha256(out / "pretrain" / "stage1" / "teacher.pth")
    vit4k = file_sha256(out / "pretrain" / "stage2" / "teacher.pth")
    # embed again: every slide's features come from both self-pretrained encoders
    for i in range(N_SLIDES):
        with h5py.File(out / "features" / f"s{i}.h5", "r") as f:
            assert f.attrs["vit256_sha256"] == vit256, logs
            assert f.attrs["vit4k_sha256"] == vit4k, logs
            assert f["patch_features"].shape[1:] == (256, 384)
    # train: both folds and the report job's summary
    run = out / "runs" / "chaintest"
    for k in range(2):
        metrics = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["fold"] == k, logs
    assert (run / "report.md").is_file() and (run / "summary.csv").is_file(), logs
    # heatmaps: every slide, split over the two array tasks
    for i in range(N_SLIDES):
        assert (out / "heatmaps" / f"s{i}" / "heatmap.json").is_file(), logs
        record = json.loads((out / "heatmaps" / f"s{i}" / "heatmap.json").read_text())
        assert record["run"]["fold"] == 0 and record["run"]["cohort"] == "chaintest", record
        assert record["weights"]["vit256_sha256"] == vit256, record
        assert (out / "heatmaps" / f"s{i}" / "slide.png").stat().st_size > 0
    status = subprocess.run(
        [sys.executable, "-m", "hipt.cli", "slurm", "status", "--config", str(config)],
        cwd=work, env=_env(slurm, work), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert re.search(rf"^embed\s+{N_SLIDES} / {N_SLIDES}", status, flags=re.M), status
    assert re.search(r"^train chaintest\s+2 / 2\s+report written", status, flags=re.M), status
    assert re.search(rf"^heatmap\s+{N_SLIDES} / {N_SLIDES}", status, flags=re.M), status

    # The same submission again: every job runs, finds its work done and writes nothing new.
    before = _outputs(out)
    steps = {s: (out / "pretrain" / s / "log.jsonl").read_text() for s in ("stage1", "stage2")}
    _wait_all(slurm, _submit(slurm, work, config, first=False), work, timeout_s=900)
    assert _outputs(out) == before, _logs(work)
    for s in ("stage1", "stage2"):
        assert (out / "pretrain" / s / "log.jsonl").read_text() == steps[s], f"{s} trained again"
    assert file_sha256(out / "pretrain" / "stage1" / "teacher.pth") == vit256
