"""``hipt slurm submit`` plans and ``--dry-run`` output: chain order, dependencies, arrays and
resource lines, without a scheduler (the real-Slurm chain is in test_slurm.py)."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest
import yaml

from hipt.config import ConfigError, load_config
from hipt.slurm import SlurmConfig, plan_jobs, status, submit

ROOT = Path(__file__).resolve().parents[1]


def _cohort_yaml(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"cohort": name, "csv": "c.csv", "features_dir": "f"}))
    return path


def _config(tmp_path: Path, **over) -> SlurmConfig:
    data = {
        "out": "out",
        "slides": "slides",
        "venv": "/opt/venv",
        "defaults": {"partition": "batch", "account": "lab", "time": "01:00:00"},
        "tile": {
            "resources": {"array_tasks": 3, "cpus": 2, "mem": "4G"},
            "args": ["--workers", "2"],
        },
        "embed": {
            "vit256": "w/vit256.pth",
            "vit4k": "w/vit4k.pth",
            "resources": {"array_tasks": 2, "gpus": 1, "cpus": 8, "extra": ["--constraint=h100"]},
        },
        "train": {"configs": ["lung.yaml", "kidney.yaml"], "folds": 4},
        "heatmap": {"fold": 1, "resources": {"array_tasks": 2}},
        **over,
    }
    for name in ("lung", "kidney"):
        _cohort_yaml(tmp_path, name)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(SlurmConfig, path)


def _submit_fake(jobs):
    """Submit with a stand-in for sbatch that hands out increasing job ids."""
    counter = itertools.count(100)
    calls = []

    def run(argv, env):
        calls.append((argv, env))
        return str(next(counter))

    ids = submit(jobs, run=run, echo=lambda _: None)
    return ids, calls


def _option(argv, name):
    found = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    return found[0] if found else None


def test_chain_waits_stage_by_stage_with_the_ids_sbatch_returned(tmp_path):
    cfg = _config(tmp_path)
    ids, calls = _submit_fake(plan_jobs(cfg, ["tile", "embed", "train", "heatmap"]))
    names = list(ids)
    assert names == [
        "tile",
        "embed",
        "train-lung",
        "report-lung",
        "train-kidney",
        "report-kidney",
        "heatmap-lung",
        "heatmap-kidney",
    ]
    argv = {name: call[0] for name, call in zip(names, calls, strict=True)}
    assert _option(argv["tile"], "--dependency") is None
    assert _option(argv["embed"], "--dependency") == f"afterok:{ids['tile']}"
    assert _option(argv["train-lung"], "--dependency") == f"afterok:{ids['embed']}"
    assert _option(argv["train-kidney"], "--dependency") == f"afterok:{ids['embed']}"
    # The report of a cohort runs once its folds have ended, even if one failed.
    assert _option(argv["report-lung"], "--dependency") == f"afterany:{ids['train-lung']}"
    assert _option(argv["heatmap-kidney"], "--dependency") == f"afterok:{ids['train-kidney']}"


def test_arrays_resources_and_variables_come_from_the_config(tmp_path):
    cfg = _config(tmp_path)
    jobs = {j.name: j for j in plan_jobs(cfg, ["tile", "embed", "train", "heatmap"])}
    out = str((tmp_path / "out").resolve())
    tile = jobs["tile"].command({})
    assert _option(tile, "--array") == "0-2" and _option(tile, "--cpus-per-task") == "2"
    assert _option(tile, "--mem") == "4G" and _option(tile, "--partition") == "batch"
    assert _option(tile, "--account") == "lab" and _option(tile, "--time") == "01:00:00"
    assert tile[-1] == str(ROOT / "slurm" / "tile.sbatch")
    assert jobs["tile"].env["SLIDES"] == str((tmp_path / "slides").resolve())
    assert jobs["tile"].env["OUT"] == out and jobs["tile"].env["HIPT_VENV"] == "/opt/venv"
    assert shlex.split(jobs["tile"].env["HIPT_TILE_ARGS"]) == ["--workers", "2"]
    embed = jobs["embed"].command({})
    assert _option(embed, "--gres") == "gpu:1" and "--constraint=h100" in embed
    assert _option(embed, "--array") == "0-1"
    assert jobs["embed"].env["VIT256"] == str((tmp_path / "w" / "vit256.pth").resolve())
    train = jobs["train-lung"].command({})
    assert _option(train, "--array") == "0-3"  # one task per fold
    assert train[-1] == str((tmp_path / "lung.yaml").resolve())
    assert shlex.split(jobs["train-lung"].env["HIPT_TRAIN_ARGS"]) == ["--out", f"{out}/runs"]
    assert "--gres=gpu:1" not in train  # GPUs only where a stage asks for them
    assert jobs["heatmap-lung"].env["RUN"] == f"{out}/runs/lung/fold_1"
    for job in jobs.values():
        log = _option(job.command({}), "--output")
        assert log.startswith(f"{out}/slurm-logs/"), (job.name, log)


def test_dry_run_prints_every_command_and_template_without_submitting(tmp_path):
    cfg = _config(tmp_path)
    printed = []

    def refuse(argv, env):
        raise AssertionError("a dry run must not call sbatch")

    ids = submit(plan_jobs(cfg, ["tile", "embed", "train"]), dry_run=True, run=refuse,
                 echo=printed.append)  # fmt: skip
    text = "\n".join(printed)
    assert ids["embed"] == "<embed>"
    assert "--dependency=afterok:<tile>" in text and "--dependency=afterany:<train-lung>" in text
    assert "#SBATCH --job-name=hipt-tile" in text and "hipt embed --tiles" in text
    commands = [line for line in printed if line.startswith("# ")]
    assert len(commands) == 6 and all(
        "\nenv OUT=" in c and " sbatch --parsable " in c for c in commands
    )


def test_embedding_weights_default_to_the_pretraining_of_the_same_chain(tmp_path):
    cfg = _config(tmp_path, embed={})
    with pytest.raises(ConfigError, match="embed.vit256: required unless the pretrain_stage1"):
        plan_jobs(cfg, ["embed"])


def test_bad_stage_lists_and_missing_inputs_are_refused(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ConfigError, match="unknown stage"):
        plan_jobs(cfg, ["tile", "pretrain"])
    no_slides = _config(tmp_path, slides=None)
    with pytest.raises(ConfigError, match="slides: required for the tile stage"):
        plan_jobs(no_slides, ["tile"])
    with pytest.raises(ConfigError, match="train.configs: required"):
        plan_jobs(_config(tmp_path, train={}), ["train"])


def test_status_reads_progress_from_the_outputs(tmp_path):
    cfg = _config(tmp_path)
    out = Path(cfg.out)
    (tmp_path / "slides").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "slides" / f"{name}.svs").write_bytes(b"x")
    out.mkdir()
    (out / "tiling.shard-0-of-2.csv").write_text("slide_id,status\na,ok\nb,failed\n")
    (out / "tiling.shard-1-of-2.csv").write_text("slide_id,status\nc,ok\n")
    for d, names in (("tiles", "abc"), ("features", "a")):
        (out / d).mkdir()
        for n in names:
            (out / d / f"{n}.h5").write_bytes(b"")
    (out / "features" / ".c.h5.tmp-1234").write_bytes(b"")  # an unfinished write: not counted
    fold = out / "runs" / "lung" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "metrics.json").write_text('{"status": "complete"}')
    rows = {r[0]: r[1:] for r in status(cfg)}
    assert rows["tile"][:2] == (2, 3) and rows["tile"][2] == "1 failed"
    assert rows["embed"][:2] == (1, 3)
    assert rows["train lung"][:2] == (1, 4) and rows["train kidney"][:2] == (0, 4)
    assert rows["pretrain_stage1"][2] == "not started"
