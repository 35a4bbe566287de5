"""``hipt train``: slide-level subtyping or survival over case-level k folds.

Examples
--------
Run every fold of a cohort, then one fold (as a Slurm array task would)::

    hipt train --config train/configs/tcga_lung_subtype.yaml
    hipt train --config cohort.yaml --fold 3 --set train.lr=1e-4 --set model.name=abmil
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from hipt.atomic import write_text_atomic
from train.config import resolve, to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt train``."""
    parser.add_argument(
        "--config", help="cohort YAML (see train/configs/); defaults apply for what it leaves out"
    )
    parser.add_argument(
        "--fold", type=int, default=None, help="run only this fold (e.g. $SLURM_ARRAY_TASK_ID)"
    )
    parser.add_argument(
        "--out", default=None, help="runs folder (default: runs); outputs go to OUT/<cohort>/"
    )
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs per fold")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    parser.add_argument("--csv", default=None, help="cohort CSV (overrides the config)")
    parser.add_argument(
        "--features-dir", default=None, help="features folder (overrides the config)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. train.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild summary.csv and report.md from the finished folds (e.g. after a Slurm array)",
    )


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML file, then the named flags, then ``--set`` overrides; validated."""
    named: dict[str, Any] = {}
    if args.out is not None:
        named["out"] = args.out
    if args.device is not None:
        named["device"] = args.device
    if args.csv is not None:
        named["csv"] = str(Path(args.csv).resolve())
    if args.features_dir is not None:
        named["features_dir"] = str(Path(args.features_dir).resolve())
    if args.epochs is not None:
        named["train"] = {"epochs": args.epochs}
    if args.no_progress:
        named.setdefault("train", {})["progress"] = False
    return resolve(args.config, args.overrides, named)


# Settings that do not change a fold's result: a run may go on with other values of these.
_RUN_LOCAL = {("out",), ("device",), ("threads",), ("train", "progress"), ("train", "cache")}


def _changed_settings(saved_path: Path, cfg: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between a run's saved ``config.yaml`` and ``cfg``."""
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []  # unreadable: rewritten below

    def flat(d: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
        if isinstance(d, dict) and prefix != ("label_map",) and d:
            out: dict[tuple[str, ...], Any] = {}
            for k, v in d.items():
                out.update(flat(v, (*prefix, str(k))))
            return out
        return {prefix: d}

    a, b = flat(saved), flat(yaml.safe_load(to_yaml(cfg)))
    keys = sorted(k for k in a.keys() | b.keys() if k not in _RUN_LOCAL and a.get(k) != b.get(k))
    return [".".join(k) for k in keys]


def run(cfg: dict[str, Any], fold: int | None = None) -> int:
    """Run the folds of a resolved config; return 0, 1 (a fold failed) or 2 (bad input)."""
    from hipt.models.slide import input_key
    from train.data import BagStore, CohortError, case_strata, load_cohort
    from train.loops import FoldRunner, fold_is_done
    from train.report import summarize
    from train.splits import SplitError, fold_cases, make_splits, read_splits, write_splits

    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        key = input_key(cfg["model"]["name"])
    except KeyError as exc:
        print(f"hipt train: {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        cohort = load_cohort(
            cfg["csv"],
            cfg["features_dir"],
            task=cfg["task"],
            label_map=cfg.get("label_map"),
            input_key=key,
        )
    except CohortError as exc:
        print(f"hipt train: {exc}", file=sys.stderr)
        return 2
    if cfg["task"] == "subtype" and not cfg.get("label_map"):
        cfg["label_map"] = dict(cohort.label_map)  # record the derived map in config.yaml
    run_dir = Path(cfg["out"]) / str(cfg["cohort"])
    sp = cfg["splits"]
    try:
        if sp.get("file"):
            splits = read_splits(sp["file"], case_ids=cohort.case_ids)
        else:
            sites = [c.site for c in cohort.cases] if sp["site_preserving"] else None
            splits = make_splits(
                cohort.case_ids,
                case_strata(cohort, int(sp["time_bins"])),
                folds=int(sp["folds"]),
                val_fraction=float(sp["val_fraction"]),
                seed=int(cfg["seed"]),
                sites=sites,
            )
        existing = run_dir / "splits.csv"
        if existing.exists():
            old = read_splits(existing)
            if not old.reset_index(drop=True).equals(
                splits[["case_id", "fold", "role"]].reset_index(drop=True)
            ):
                raise SplitError(
                    f"{existing}: differs from the splits of this config; use another --out or remove the run"
                )
    except SplitError as exc:
        print(f"hipt train: {exc}", file=sys.stderr)
        return 2
    finished = any(fold_is_done(d) for d in run_dir.glob("fold_*"))
    changed = _changed_settings(run_dir / "config.yaml", cfg) if finished else []
    if changed:
        print(
            f"hipt train: {run_dir / 'config.yaml'}: the run was made with other settings "
            f"({', '.join(changed)}); its finished folds would be kept under this config. "
            "Use another --out or remove the run",
            file=sys.stderr,
        )
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    write_splits(splits, run_dir / "splits.csv")
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    folds = sorted(int(k) for k in splits["fold"].unique())
    if fold is not None:
        if fold not in folds:
            print(
                f"hipt train: fold {fold} not in the splits (folds {folds[0]}..{folds[-1]})",
                file=sys.stderr,
            )
            return 2
        folds = [fold]
    cache = cfg["train"]["cache"]
    store = BagStore(
        cohort, key, cache=key == "region_features" if cache == "auto" else bool(cache)
    )
    failed = []
    for k in folds:
        fold_dir = run_dir / f"fold_{k}"
        if fold_is_done(fold_dir):
            print(f"fold {k}: finished earlier, skipped ({fold_dir / 'metrics.json'})")
            continue
        try:
            m = FoldRunner(cfg, cohort, store, fold_cases(splits, k), k, fold_dir).run()
        except Exception as exc:  # one failing fold must not stop the others
            failed.append(k)
            print(f"fold {k}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        t = m["test"]
        line = (
            f"auc {t['auc']:.3f}, balanced acc {t['balanced_accuracy']:.3f}"
            if cfg["task"] == "subtype"
            else f"c-index {t['c_index']:.3f}, log-rank p {t['logrank_p']:.3g}"
        )
        print(f"fold {k}: best epoch {m['best_epoch']} of {m['epochs_run']}; test {line}")
    summary = summarize(run_dir, cfg)
    if not summary.empty:
        print(
            f"{len(summary)} fold(s) finished; summary: {run_dir / 'summary.csv'}, report: {run_dir / 'report.md'}"
        )
    if failed:
        print(f"hipt train: {len(failed)} fold(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hipt train``."""
    try:
        cfg = resolve_config(args)
    except ValueError as exc:
        print(f"hipt train: {exc}", file=sys.stderr)
        return 2
    if args.report_only:
        from train.report import summarize

        run_dir = Path(cfg["out"]) / str(cfg["cohort"])
        summary = summarize(run_dir, cfg)
        if summary.empty:
            print(f"hipt train: no finished fold under {run_dir}", file=sys.stderr)
            return 1
        print(f"{len(summary)} fold(s) finished; report: {run_dir / 'report.md'}")
        return 0
    return run(cfg, args.fold)
