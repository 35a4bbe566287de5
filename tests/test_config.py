"""The shared config mechanism (hipt.config), its use by hipt train, and safe path names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from hipt.config import (
    ConfigError,
    ConfigModel,
    RelPath,
    config_dict,
    load_config,
    parse_overrides,
    save_config,
)
from hipt.names import check_name, is_safe_name


class Optim(ConfigModel):
    lr: float = Field(1e-3, gt=0)
    schedule: str = "cosine"


class Data(ConfigModel):
    root: RelPath | None = None
    crops: list[int] = Field(default_factory=lambda: [224, 96])


class Run(ConfigModel):
    name: str = "demo"
    epochs: int = Field(10, ge=1)
    weights: RelPath | None = None
    optim: Optim = Field(default_factory=Optim)
    data: Data = Field(default_factory=Data)
    extra: dict[str, object] = Field(default_factory=dict)


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_layers_apply_in_order_and_relative_paths_follow_the_file(tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    path = _write(
        cfg_dir / "run.yaml",
        {
            "epochs": 5,
            "weights": "../ckpt/w.pth",
            "optim": {"lr": 0.5},
            "data": {"root": "data"},
            "extra": {"w": "x.pth"},
        },
    )
    cfg = load_config(
        Run,
        path,
        overrides=["optim.lr=0.25", "data.crops=[64, 32]"],
        flags={"epochs": 7, "optim": {"schedule": "flat"}},
        relative_keys=["extra.w"],
    )
    assert cfg.epochs == 7  # flag over file
    assert cfg.optim.lr == 0.25  # --set over file
    assert cfg.optim.schedule == "flat"  # flag over default
    assert cfg.data.crops == [64, 32]
    assert cfg.name == "demo"  # default kept
    assert cfg.weights == str((tmp_path / "ckpt" / "w.pth").resolve())
    assert cfg.data.root == str((cfg_dir / "data").resolve())
    assert cfg.extra["w"] == str((cfg_dir / "x.pth").resolve())
    # Paths given as flags or --set are the user's own (relative to the working directory).
    assert load_config(Run, path, overrides=["weights=rel.pth"]).weights == "rel.pth"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=fast"], "optim.lr = 'fast': Input should be a valid number"),
        (["optim.lr=-1"], "optim.lr = -1: Input should be greater than 0"),
        (["epochs=0"], "epochs = 0: Input should be greater than or equal to 1"),
        (["optim.lrr=1"], "optim.lrr: unknown key (allowed: lr, schedule)"),
        (
            ["optimm.lr=1"],
            "optimm: unknown key (allowed: name, epochs, weights, optim, data, extra)",
        ),
        (["optim=adam"], "optim = 'adam': must be a mapping of keys (a section)"),
        (["data.crops=big"], "data.crops = 'big': Input should be a valid list"),
    ],
)
def test_every_error_names_the_key_the_value_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Run, overrides=overrides)
    assert str(info.value) == f"invalid config: {expected}" or expected in str(info.value)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_several_problems_are_listed_one_per_line():
    with pytest.raises(ConfigError) as info:
        load_config(Run, overrides=["epochs=0", "optim.lr=x", "nope=1"])
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:"
    assert sorted(line.strip().split(":")[0].split(" ")[0] for line in lines[1:]) == [
        "epochs",
        "nope",
        "optim.lr",
    ]


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    not_mapping = _write(tmp_path / "list.yaml", [1, 2])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\nb: 3\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    for path, words in (
        (not_mapping, "a config must be a mapping of keys, got list"),
        (bad_yaml, "not valid YAML at line"),
        (latin1, "not UTF-8"),
        (tmp_path / "missing.yaml", "cannot read config"),
    ):
        with pytest.raises(ConfigError, match=words) as info:
            load_config(Run, path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_malformed_set_items_are_refused():
    for item in ("lr", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--set expects key=value"):
            parse_overrides([item])
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=", "e=null"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": "",
        "e": None,
    }


def test_saved_config_loads_back_to_the_same_values(tmp_path):
    cfg = load_config(Run, overrides=["optim.lr=0.125", "data.root=/data"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text()) == config_dict(cfg)
    assert load_config(Run, path) == cfg
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written atomically


# --------------------------------------------------------------------------- hipt train
def _train_yaml(tmp_path: Path, **extra: object) -> Path:
    data = {"cohort": "c", "csv": "cohort.csv", "features_dir": "features", **extra}
    return _write(tmp_path / "train.yaml", data)


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["train.lr=fast"], "train.lr = 'fast': Input should be a valid number"),
        (["model=hipt_gp"], "model = 'hipt_gp': must be a mapping of keys (a section)"),
        (
            ["model.kwargs.dropuot=0.1"],
            "model.kwargs.dropuot: unknown argument (allowed: dropout, n_layers, n_heads)",
        ),
        (["model.kwargs.dropout=high"], "model.kwargs.dropout = 'high': Input should be a valid"),
        (["model.name=abmil", "model.kwargs.hidden_dim=1.5"], "model.kwargs.hidden_dim = 1.5"),
        (["model.kwargs.n_classes=3"], "model.kwargs.n_classes: set by hipt train"),
        (["model.name=resnet"], "model.name 'resnet': not a slide model (known: abmil,"),
        (["task=survival", "train.select_on=auc"], "train.select_on = 'auc': for task survival"),
        (["splits.val_fraction=1.5"], "splits.val_fraction = 1.5: Input should be less than 1"),
        (["train.cache=sometimes"], "train.cache = 'sometimes'"),
        (["cohort=../../x"], "cohort '../../x': a name that becomes a file or folder name"),
    ],
)
def test_hipt_train_refuses_bad_settings_before_writing_anything(tmp_path, capsys, sets, expected):
    """Exit 2, one message naming the key, and no run folder made."""
    from hipt.cli import main

    argv = ["train", "--config", str(_train_yaml(tmp_path)), "--out", str(tmp_path / "runs")]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_hipt_train_config_error_through_the_real_command(tmp_path):
    config = _train_yaml(tmp_path, model="hipt_gp")
    argv = [sys.executable, "-m", "hipt.cli", "train", "--config", str(config)]
    res = subprocess.run(argv + ["--out", str(tmp_path / "runs")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "hipt train: invalid config: model = 'hipt_gp': must be a mapping of keys (a section)"
    )
    assert not (tmp_path / "runs").exists()


def test_train_config_fills_task_defaults_and_keeps_the_paper_protocol(tmp_path):
    from train.config import resolve

    cfg = resolve(_train_yaml(tmp_path, task="survival"), ["train.select_on=last"])
    assert cfg["splits"]["folds"] == 5 and cfg["train"]["select_on"] == "last"
    assert cfg["csv"] == str((tmp_path / "cohort.csv").resolve())
    cfg = resolve(_train_yaml(tmp_path, cohort=None, csv="my_cohort.csv"))
    assert cfg["cohort"] == "my_cohort" and cfg["splits"]["folds"] == 10
    assert cfg["train"]["select_on"] == "loss"


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "bad", ["../outside", "a/b", "a\\b", ".hidden", "..", "x..y", "", " pad", "nul\x00"]
)
def test_unsafe_names_are_refused_naming_the_value(bad):
    assert not is_safe_name(bad)
    with pytest.raises(ValueError) as info:
        check_name(bad, "slide id")
    assert str(info.value).startswith(f"slide id {bad!r}:")


def test_ordinary_slide_and_case_ids_pass():
    for good in ("TCGA-05-4244-01Z-00-DX1", "case_01", "slide 3", "Ü-1.svs"):
        assert check_name(good, "slide id") == good


def test_example_pretraining_configs_load_with_their_stage_schema():
    from train.dino.config import load_stage_config

    folder = Path(__file__).resolve().parents[1] / "train" / "configs"
    configs = sorted(folder.glob("dino_*.yaml"))
    assert len(configs) == 4
    for path in configs:
        stage = "stage1" if "stage1" in path.name else "stage2"
        cfg = load_stage_config(stage, path)
        assert config_dict(cfg), path
        with pytest.raises(ConfigError):  # the other stage's schema refuses it
            load_stage_config("stage2" if stage == "stage1" else "stage1", path)
