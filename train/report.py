"""Collect the finished folds of a run into ``summary.csv`` and a short ``report.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hipt.atomic import write_text_atomic
from train.loops import METRICS_FILE, fold_is_done


def _row(m: dict[str, Any]) -> dict[str, Any]:
    t = m["test"]
    row: dict[str, Any] = {
        "fold": m["fold"],
        "best_epoch": m["best_epoch"],
        "epochs_run": m["epochs_run"],
        "n_test": t.get("n"),
    }
    if m["task"] == "subtype":
        row.update(auc=t["auc"], balanced_accuracy=t["balanced_accuracy"], accuracy=t["accuracy"])
        row.update({f"f1_{k}": v for k, v in t["f1"].items()})
    else:
        row.update(c_index=t["c_index"], logrank_p=t["logrank_p"], n_events=t["n_events"])
        row.update(hr_per_sd=t["cox_per_sd"]["hr"], hr_high_vs_low=t["cox_high_vs_low"]["hr"])
        row.update(
            hr_high_vs_low_lower95=t["cox_high_vs_low"]["hr_lower95"],
            hr_high_vs_low_upper95=t["cox_high_vs_low"]["hr_upper95"],
        )
    row["val_metric"] = m["val"]["metric"]
    return row


def collect(run_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per finished fold (``fold_*/metrics.json``), sorted by fold."""
    rows = []
    for d in sorted(Path(run_dir).glob("fold_*")):
        if fold_is_done(d):
            rows.append(_row(json.loads((d / METRICS_FILE).read_text())))
    return pd.DataFrame(rows).sort_values("fold").reset_index(drop=True) if rows else pd.DataFrame()


def _fmt(x: Any) -> str:
    if isinstance(x, float | np.floating):
        return "nan" if not np.isfinite(x) else f"{x:.3f}"
    return str(x)


def _mean_sd(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    if not len(x):
        return "nan"
    sd = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    return f"{float(np.mean(x)):.3f} ± {sd:.3f}"


def _pooled_confusion(run_dir: Path, folds: list[int]) -> list[str]:
    """Confusion matrix summed over the folds' test sets (each case is tested once)."""
    total, names = None, []
    for k in folds:
        test = json.loads((run_dir / f"fold_{k}" / METRICS_FILE).read_text())["test"]
        cm = np.array(test["confusion_matrix"])
        total = cm if total is None else total + cm
        names = list(test["f1"])  # class names in class-index order
    lines = [
        "",
        "## Confusion matrix (test sets of the finished folds; rows true, columns predicted)",
        "",
    ]
    lines += ["| true \\ pred | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, row in zip(names, total.tolist(), strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def summarize(run_dir: str | os.PathLike, cfg: dict[str, Any]) -> pd.DataFrame:
    """Write ``summary.csv`` (one row per fold) and ``report.md`` (fold table, mean ± sd, plots)."""
    run_dir = Path(run_dir)
    df = collect(run_dir)
    if df.empty:
        return df
    write_text_atomic(run_dir / "summary.csv", df.to_csv(index=False))
    metric_cols = [
        c for c in df.columns if c not in ("fold", "best_epoch", "epochs_run", "n_test", "n_events")
    ]
    # The run's split table, not splits.folds: a user split file sets its own number of folds.
    split_path = run_dir / "splits.csv"
    n_folds = (
        pd.read_csv(split_path)["fold"].nunique()
        if split_path.is_file()
        else cfg["splits"]["folds"]
    )
    lines = [
        f"# {cfg['cohort']}: {cfg['task']} with {cfg['model']['name']}",
        "",
        f"{len(df)} of {n_folds} folds finished. Model selected on validation "
        f"{cfg['train']['select_on']} (best epoch), tested once. Splits by case: `splits.csv`; "
        "resolved config: `config.yaml`.",
        "",
    ]
    head = ["fold", "best_epoch", "n_test", *metric_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in df.to_dict("records"):  # records keep int columns as ints
        lines.append("| " + " | ".join(_fmt(r[c]) for c in head) + " |")
    means = [_mean_sd(df[c].astype(float).to_numpy()) for c in metric_cols]
    lines.append("| **mean ± sd** | | | " + " | ".join(means) + " |")
    if cfg["task"] == "subtype":
        lines += _pooled_confusion(run_dir, df["fold"].tolist())
    lines += ["", "## Plots", ""]
    plot = "roc.png" if cfg["task"] == "subtype" else "km.png"
    for f in df["fold"]:
        lines.append(f"![fold {f}](fold_{f}/{plot})")
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return df
