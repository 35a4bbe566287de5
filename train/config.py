"""Configuration of ``hipt train``: defaults, then the cohort YAML, then command-line overrides.

The merged config is a plain nested dict; :func:`validate` checks it and fills the task-dependent
defaults (number of folds, metric used for model selection). The resolved config is written as
``config.yaml`` next to the run outputs.

Examples
--------
>>> cfg = merge(default_config(), {"cohort": "lung", "task": "subtype"})
>>> cfg = apply_dotlist(cfg, ["train.lr=0.001", "model.kwargs.dropout=0.1"])
>>> cfg["train"]["lr"], cfg["model"]["kwargs"]["dropout"]
(0.001, 0.1)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

TASKS = ("subtype", "survival")


def default_config() -> dict[str, Any]:
    """The default configuration (a fresh copy each call)."""
    return {
        "cohort": None,  # name; runs go to <out>/<cohort>/
        "task": "subtype",  # subtype | survival
        "csv": None,  # cohort CSV (relative paths resolve against the YAML's folder)
        "features_dir": None,  # folder of features/<slide_id>.h5
        "label_map": None,  # subtyping: {label: class index}; default: sorted labels
        "out": "runs",
        "seed": 1,
        "device": "cpu",
        # CPU threads for torch. Bags are small, so one thread per process is fastest and avoids
        # oversubscribing shared nodes; 0 keeps torch's default (e.g. hipt_lgp on a big node).
        "threads": 1,
        "model": {"name": "hipt_gp", "kwargs": {}},
        "splits": {
            "folds": None,  # default 10 (subtype) / 5 (survival)
            "val_fraction": 0.15,  # of the non-test cases, stratified
            "site_preserving": False,  # no tissue-source site in both train and test
            "file": None,  # a user split CSV (case_id, fold, role) instead of generating one
            "time_bins": 4,  # survival stratification: event × this many time quantiles
        },
        "train": {
            "epochs": 20,
            "lr": 2.0e-4,
            "weight_decay": 1.0e-5,
            "accumulate": 1,  # bags per optimiser step (real accumulation)
            "balanced_sampling": True,  # subtyping: class-balanced sampling
            "select_on": None,  # loss | auc (subtype) | cindex (survival); default loss
            "patience": 5,  # epochs without improvement before stopping (0 = never stop early)
            "min_epochs": 1,
            # Keep bags in memory after the first read: true, false, or auto (region features
            # only; patch features are ~500x larger).
            "cache": "auto",
            "max_regions": None,  # sample at most this many regions per bag while training
            "progress": True,
        },
        "survival": {"n_bins": 4, "alpha": 0.0},
    }


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Recursive merge: dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "label_map":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_dotlist(cfg: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (numbers, lists, null...)."""
    out = copy.deepcopy(cfg)
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a cohort YAML; relative paths (``csv``, ``features_dir``, ``splits.file``,
    ``model.kwargs.vit4k_weights``) resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    for key in ("csv", "features_dir"):
        if data.get(key):
            data[key] = (
                str((path.parent / data[key]).resolve())
                if not os.path.isabs(data[key])
                else data[key]
            )
    split_file = (data.get("splits") or {}).get("file")
    if split_file and not os.path.isabs(split_file):
        data["splits"]["file"] = str((path.parent / split_file).resolve())
    kwargs = (data.get("model") or {}).get("kwargs") or {}
    weights = kwargs.get("vit4k_weights")
    if weights and not os.path.isabs(weights):
        kwargs["vit4k_weights"] = str((path.parent / weights).resolve())
    return data


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a merged config and fill task-dependent defaults; raise ``ValueError`` listing problems."""
    cfg = copy.deepcopy(cfg)
    problems = []
    defaults = default_config()
    # A misspelt key would otherwise be ignored silently; free-form sections are not checked.
    unknown = [k for k in cfg if k not in defaults]
    for section in ("model", "splits", "train", "survival"):
        if isinstance(cfg.get(section), dict):
            unknown += [f"{section}.{k}" for k in cfg[section] if k not in defaults[section]]
    if unknown:
        raise ValueError(f"invalid config:\n  unknown key(s): {', '.join(sorted(unknown))}")
    if cfg["task"] not in TASKS:
        problems.append(f"task must be one of {TASKS}, got {cfg['task']!r}")
    for key in ("csv", "features_dir"):
        if not cfg.get(key):
            problems.append(f"{key} is required")
    if not cfg.get("cohort"):
        cfg["cohort"] = Path(cfg["csv"]).stem if cfg.get("csv") else None
        if not cfg["cohort"]:
            problems.append("cohort (a name for the runs folder) is required")
    tr, sp = cfg["train"], cfg["splits"]
    if sp["folds"] is None:
        sp["folds"] = 10 if cfg["task"] == "subtype" else 5
    if int(sp["folds"]) < 2:
        problems.append(f"splits.folds must be >= 2, got {sp['folds']}")
    if not 0 < float(sp["val_fraction"]) < 1:
        problems.append(f"splits.val_fraction must be in (0, 1), got {sp['val_fraction']}")
    if tr["select_on"] is None:
        tr["select_on"] = "loss"
    allowed = ("loss", "auc") if cfg["task"] == "subtype" else ("loss", "cindex")
    if tr["select_on"] not in allowed:
        problems.append(
            f"train.select_on for {cfg['task']} must be one of {allowed}, got {tr['select_on']!r}"
        )
    if int(tr["epochs"]) < 1 or int(tr["accumulate"]) < 1:
        problems.append("train.epochs and train.accumulate must be >= 1")
    if tr["cache"] not in (True, False, "auto"):
        problems.append(f"train.cache must be true, false or auto, got {tr['cache']!r}")
    if int(cfg["survival"]["n_bins"]) < 1:
        problems.append("survival.n_bins must be >= 1")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def to_yaml(cfg: dict[str, Any]) -> str:
    """The config as YAML text (key order kept)."""
    return yaml.safe_dump(cfg, sort_keys=False)
