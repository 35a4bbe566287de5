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
from hipt.config import add_set_argument
from hipt.faults import Terminated, raise_on_sigterm
from hipt.names import check_name
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
    add_set_argument(parser, "train.lr=1e-4")
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


class _Refusal(Exception):
    """Bad input found before training: the message is printed as one ``hipt train:`` line."""


def run(cfg: dict[str, Any], fold: int | None = None) -> int:
    """Run the folds of a resolved config; return 0, 1 (a fold failed) or 2 (bad input).

    Everything that can be checked is checked before the first output is written: the cohort
    name, the cohort and its features, the model's arguments, the splits and an earlier run in
    the same folder.
    """
    from hipt.models.slide import input_key

    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        key = input_key(cfg["model"]["name"])
        run_dir = Path(cfg["out"]) / check_name(str(cfg["cohort"]), "cohort")
        cohort = _load_cohort(cfg, key)
        splits = _splits(cfg, cohort, run_dir)
        _check_earlier_run(cfg, run_dir)
        folds = _folds_to_run(splits, fold)
    except (_Refusal, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"hipt train: {msg}", file=sys.stderr)
        return 2
    _write_run_files(cfg, cohort, splits, run_dir)
    failed = _run_folds(cfg, cohort, key, splits, folds, run_dir)
    from train.report import summarize

    summary = summarize(run_dir, cfg)
    if not summary.empty:
        n_done = int((summary["status"] == "complete").sum())
        print(
            f"{n_done} of {len(summary)} fold(s) finished; summary: {run_dir / 'summary.csv'}, "
            f"report: {run_dir / 'report.md'}"
        )
    if cohort.excluded:
        print(
            f"hipt train: {len(cohort.excluded)} slide(s) left out with their case(s):",
            file=sys.stderr,
        )
        for e in cohort.excluded:
            print(f"  case {e['case_id']}: {e['reason']}", file=sys.stderr)
    if failed:
        print(f"hipt train: {len(failed)} fold(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _load_cohort(cfg: dict[str, Any], key: str) -> Any:
    """The validated cohort, its left-out cases said, and a model built once to check its
    arguments (e.g. ``hipt_lgp`` without ViT-4K weights) before any output is written."""
    from train.data import CohortError, load_cohort
    from train.loops import build_model

    try:
        cohort = load_cohort(
            cfg["csv"],
            cfg["features_dir"],
            task=cfg["task"],
            label_map=cfg.get("label_map"),
            input_key=key,
        )
    except CohortError as exc:
        raise _Refusal(str(exc)) from exc
    for e in cohort.excluded:
        print(f"hipt train: case {e['case_id']} left out: {e['reason']}", file=sys.stderr)
    if not cohort.cases:
        raise _Refusal(f"{cfg['csv']}: no case left to train on")
    if cfg["task"] == "subtype" and not cfg.get("label_map"):
        cfg["label_map"] = dict(cohort.label_map)  # record the derived map in config.yaml
    try:
        build_model(cfg, cohort)
    except (TypeError, ValueError, OSError) as exc:
        name = cfg["model"]["name"]
        raise _Refusal(str(exc) if name in str(exc) else f"model {name}: {exc}") from exc
    return cohort


def _splits(cfg: dict[str, Any], cohort: Any, run_dir: Path) -> Any:
    """The user's split file, or generated folds; the same as an earlier run's ``splits.csv``."""
    from train.data import case_strata
    from train.splits import SplitError, make_splits, read_splits, repeated_test_cases

    sp = cfg["splits"]
    try:
        if sp.get("file"):
            splits = read_splits(sp["file"], case_ids=cohort.case_ids)
            repeated = repeated_test_cases(splits)
            if repeated:
                print(
                    f"hipt train: {sp['file']}: {len(repeated)} case(s) tested in more than one "
                    f"fold (e.g. {repeated[:3]}); per-fold metrics only, no pooled statistics",
                    file=sys.stderr,
                )
        else:
            site_preserving = bool(sp["site_preserving"])
            splits = make_splits(
                cohort.case_ids,
                case_strata(cohort, int(sp["time_bins"])),
                folds=int(sp["folds"]),
                val_fraction=float(sp["val_fraction"]),
                seed=int(cfg["seed"]),
                sites=[c.site for c in cohort.cases] if site_preserving else None,
                cover=_classes(cohort),
                cover_values=None if cohort.task == "subtype" else ["event"],
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
        raise _Refusal(str(exc)) from exc
    return splits


def _classes(cohort: Any) -> list[str]:
    """Per case, what every test fold should hold: its class, or whether its event was seen."""
    if cohort.task == "subtype":
        return [str(c.label_name) for c in cohort.cases]
    return ["event" if c.event else "censored" for c in cohort.cases]


def _check_earlier_run(cfg: dict[str, Any], run_dir: Path) -> None:
    from train.loops import fold_is_done

    finished = any(fold_is_done(d) for d in run_dir.glob("fold_*"))
    changed = _changed_settings(run_dir / "config.yaml", cfg) if finished else []
    if changed:
        raise _Refusal(
            f"{run_dir / 'config.yaml'}: the run was made with other settings "
            f"({', '.join(changed)}); its finished folds would be kept under this config. "
            "Use another --out or remove the run"
        )


def _folds_to_run(splits: Any, fold: int | None) -> list[int]:
    folds = sorted(int(k) for k in splits["fold"].unique())
    if fold is None:
        return folds
    if fold not in folds:
        raise _Refusal(f"fold {fold} not in the splits (folds {folds[0]}..{folds[-1]})")
    return [fold]


def _write_run_files(cfg: dict[str, Any], cohort: Any, splits: Any, run_dir: Path) -> None:
    """``splits.csv``, ``config.yaml``, ``split_balance.csv`` and ``excluded.csv`` of the run."""
    import pandas as pd

    from train.splits import fold_balance, write_splits

    run_dir.mkdir(parents=True, exist_ok=True)
    write_splits(splits, run_dir / "splits.csv")
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    balance = fold_balance(splits, dict(zip(cohort.case_ids, _classes(cohort), strict=True)))
    write_text_atomic(run_dir / "split_balance.csv", balance.to_csv(index=False))
    worst = balance.loc[balance["max_share_diff"].idxmax()] if len(balance) else None
    if worst is not None:
        print(
            f"test folds' class mix: at most {100 * worst['max_share_diff']:.0f} points from the "
            f"cohort's (fold {int(worst['fold'])}); see {run_dir / 'split_balance.csv'}"
        )
    excluded = pd.DataFrame(cohort.excluded, columns=["case_id", "slide_id", "reason"])
    if len(excluded) or (run_dir / "excluded.csv").exists():
        write_text_atomic(run_dir / "excluded.csv", excluded.to_csv(index=False))


def _run_folds(
    cfg: dict[str, Any], cohort: Any, key: str, splits: Any, folds: list[int], run_dir: Path
) -> list[int]:
    """Train and test each fold not finished earlier; return the folds that failed."""
    from train.data import BagStore
    from train.loops import FoldRunner, fold_is_done
    from train.splits import fold_cases

    cache = cfg["train"]["cache"]
    store = BagStore(
        cohort, key, cache=key == "region_features" if cache == "auto" else bool(cache)
    )
    failed: list[int] = []
    finished: list[int] = []
    for k in folds:
        fold_dir = run_dir / f"fold_{k}"
        if fold_is_done(fold_dir):
            print(f"fold {k}: finished earlier, skipped ({fold_dir / 'metrics.json'})")
            continue
        try:
            m = FoldRunner(cfg, cohort, store, fold_cases(splits, k), k, fold_dir).run()
        except Terminated:
            _say_terminated(finished, k, fold_dir)
            raise
        except Exception as exc:  # one failing fold must not stop the others
            failed.append(k)
            print(f"fold {k}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        t = m["test"]
        line = (
            f"auc {_num(t['auc'])}, balanced acc {_num(t['balanced_accuracy'])}"
            if cfg["task"] == "subtype"
            else f"c-index {_num(t['c_index'])}, log-rank p {_num(t['logrank_p'], '.3g')}"
        )
        chosen = "last epoch" if m["selected_on"] == "last" else "best epoch"
        print(f"fold {k}: {chosen} {m['best_epoch']} of {m['epochs_run']}; test {line}")
        finished.append(k)
    return failed


def _say_terminated(finished: list[int], current: int, fold_dir: Path) -> None:
    done = f" ({', '.join(map(str, finished))})" if finished else ""
    resume = (fold_dir / "resume.pt").exists()
    print(
        f"hipt train: terminated: {len(finished)} fold(s) finished this run{done}; fold "
        f"{current} was interrupted and "
        + ("resumes from its last epoch" if resume else "starts again")
        + " when the same command runs again",
        file=sys.stderr,
    )


def _num(x: float | None, spec: str = ".3f") -> str:
    return "nan" if x is None or x != x else format(x, spec)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hipt train``."""
    try:
        cfg = resolve_config(args)
    except ValueError as exc:
        print(f"hipt train: {exc}", file=sys.stderr)
        return 2
    if args.report_only:
        from train.report import summarize

        run_dir = Path(cfg["out"]) / check_name(str(cfg["cohort"]), "cohort")
        summary = summarize(run_dir, cfg)
        if summary.empty:
            print(f"hipt train: no finished fold under {run_dir}", file=sys.stderr)
            return 1
        n_done = int((summary["status"] == "complete").sum())
        print(f"{n_done} of {len(summary)} fold(s) finished; report: {run_dir / 'report.md'}")
        return 0
    # SIGTERM (Slurm's preemption, kill): stop between two steps, the files written so far are
    # complete; hipt.cli turns it into exit 143.
    with raise_on_sigterm():
        return run(cfg, args.fold)
