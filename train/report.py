"""Collect a run's folds into ``summary.csv``, ``pooled.json`` and a short ``report.md``.

Every fold of the split table has a row, finished or not, and a metric a fold cannot define
(a single-class test set, no comparable pair) is shown as NaN, never dropped: means say over how
many folds they are taken, and the report flags such folds at the top. Log-rank p-values and
hazard-ratio bounds are not averaged over folds; they are computed once on the pooled test
predictions (each case is tested in one fold), beside the pooled c-index, ROC and AUC.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hipt.atomic import write_text_atomic
from train.loops import METRICS_FILE, fold_is_done, json_safe
from train.metrics import classification_metrics, concordance, cox_hazard_ratio, logrank_p
from train.plots import km_png, roc_png
from train.splits import repeated_test_cases

# Averaged over folds in the report; the other metric columns are shown per fold only.
MEANS = {
    "subtype": ("auc", "balanced_accuracy", "accuracy"),
    "survival": ("c_index",),
}
# The metric that says whether a fold could be scored at all.
MAIN = {"subtype": "auc", "survival": "c_index"}
PROTOCOLS = {
    "last": "the model of the last epoch is tested (the original HIPT protocol; validation "
    "cases play no part)",
    "loss": "the model of the epoch with the lowest validation loss is tested once",
    "auc": "the model of the epoch with the highest validation AUC is tested once",
    "cindex": "the model of the epoch with the highest validation c-index is tested once",
}


def _row(m: dict[str, Any]) -> dict[str, Any]:
    t = m["test"]
    row: dict[str, Any] = {
        "fold": m["fold"],
        "status": "complete",
        "best_epoch": m["best_epoch"],
        "epochs_run": m["epochs_run"],
        "n_test": t.get("n"),
    }
    nan = float("nan")
    if m["task"] == "subtype":
        row.update(
            auc=_num(t["auc"]),
            balanced_accuracy=_num(t["balanced_accuracy"]),
            accuracy=_num(t["accuracy"]),
        )
        row.update({f"f1_{k}": _num(v) for k, v in t["f1"].items()})
    else:
        hl = t["cox_high_vs_low"]
        row.update(c_index=_num(t["c_index"]), logrank_p=_num(t["logrank_p"]))
        row.update(n_events=t["n_events"], hr_per_sd=_num(t["cox_per_sd"]["hr"]))
        row.update(
            hr_high_vs_low=_num(hl["hr"]),
            hr_high_vs_low_lower95=_num(hl.get("hr_lower95", nan)),
            hr_high_vs_low_upper95=_num(hl.get("hr_upper95", nan)),
        )
    row["val_metric"] = _num(m["val"]["metric"])
    return row


def _num(x: Any) -> float:
    """JSON ``null`` (how metrics.json stores NaN) back to NaN."""
    return float("nan") if x is None else float(x)


def _split_folds(run_dir: Path) -> list[int]:
    path = run_dir / "splits.csv"
    return sorted(int(k) for k in pd.read_csv(path)["fold"].unique()) if path.is_file() else []


def collect(run_dir: str | os.PathLike, folds: list[int] | None = None) -> pd.DataFrame:
    """One row per fold of the split table (or ``folds``), sorted by fold.

    A finished fold gives its test metrics (NaN where undefined); a fold without a complete
    ``metrics.json`` is a row with ``status`` ``not finished`` and no metrics.
    """
    run_dir = Path(run_dir)
    done = {}
    for d in run_dir.glob("fold_*"):
        if fold_is_done(d):
            m = json.loads((d / METRICS_FILE).read_text())
            done[int(m["fold"])] = _row(m)
    folds = sorted(set(done) | set(_split_folds(run_dir) if folds is None else folds))
    rows = [done.get(k, {"fold": k, "status": "not finished"}) for k in folds]
    df = pd.DataFrame(rows)
    for col in ("best_epoch", "epochs_run", "n_test", "n_events"):
        if col in df:  # counts stay integers beside the empty cells of unfinished folds
            df[col] = df[col].astype("Int64")
    return df


def _fmt(x: Any) -> str:
    if x is None or x is pd.NA or (isinstance(x, float | np.floating) and not np.isfinite(x)):
        return "nan"
    if isinstance(x, float | np.floating):
        return f"{x:.3f}"
    return str(x)


def mean_sd(x: np.ndarray, n_folds: int) -> str:
    """``mean ± sd over n of k folds`` of the finite values (sd with ddof 1).

    Examples
    --------
    >>> mean_sd(np.array([0.5, 0.7, np.nan]), 3)
    '0.600 ± 0.141 over 2 of 3 folds'
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return f"nan (0 of {n_folds} folds)"
    if len(x) == 1:  # one fold has no spread to speak of: no "± 0.000"
        return f"{float(x[0]):.3f} (no sd) over 1 of {n_folds} folds"
    sd = float(np.std(x, ddof=1))
    return f"{float(np.mean(x)):.3f} ± {sd:.3f} over {len(x)} of {n_folds} folds"


def pooled_predictions(run_dir: Path, folds: list[int]) -> pd.DataFrame:
    """The test predictions of the given folds, one row per case, with a ``fold`` column."""
    parts = []
    for k in folds:
        p = pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv", dtype={"case_id": str})
        parts.append(p.assign(fold=k))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def pooled_subtype(preds: pd.DataFrame, names: list[str], run_dir: Path) -> dict[str, Any]:
    """AUC, balanced accuracy and ROC over every test prediction (``roc_pooled.png``)."""
    y = preds["label_index"].to_numpy(dtype=np.int64)
    probs = preds[[f"prob_{n}" for n in names]].to_numpy(dtype=float)
    m = classification_metrics(y, probs, names)
    roc_png(y, probs, names, run_dir / "roc_pooled.png", title="pooled test predictions")
    return {k: m[k] for k in ("auc", "balanced_accuracy", "accuracy", "confusion_matrix", "n")}


def pooled_survival(preds: pd.DataFrame, run_dir: Path) -> dict[str, Any]:
    """c-index, log-rank and high/low hazard ratio over every test prediction (``km_pooled.png``).

    Each case's group comes from its own fold (risk above that fold's training median), so the
    groups are comparable although the folds' risk scales differ.
    """
    t = preds["survival_months"].to_numpy(dtype=float)
    e = preds["event"].to_numpy(dtype=np.int64)
    high = preds["high_risk"].to_numpy(dtype=np.int64)
    p = logrank_p(t, e, high)
    km_png(t, e, high, run_dir / "km_pooled.png", title="pooled test predictions", p=p)
    hr = cox_hazard_ratio(t, e, high.astype(float))
    return {
        "c_index": concordance(t, e, preds["risk"].to_numpy(dtype=float)),
        "logrank_p": p,
        "hr_high_vs_low": hr["hr"],
        "hr_high_vs_low_lower95": hr["hr_lower95"],
        "hr_high_vs_low_upper95": hr["hr_upper95"],
        "hr_high_vs_low_p": hr["p"],
        "n": len(preds),
        "n_events": int(e.sum()),
        "n_high_risk": int(high.sum()),
    }


def _warnings(df: pd.DataFrame, cfg: dict[str, Any], repeated: list[str]) -> list[str]:
    """Flags for the top of the report: unfinished folds, undefined metrics, repeated tests."""
    lines = []
    n = len(df)
    missing = df.loc[df["status"] != "complete", "fold"].tolist()
    if missing:
        lines.append(f"> **Warning:** {len(missing)} of {n} folds not finished: {missing}.")
    done = df[df["status"] == "complete"]
    for col in (MAIN[cfg["task"]], "balanced_accuracy"):
        if col in done and done[col].isna().any():
            bad = done.loc[done[col].isna(), "fold"].tolist()
            why = (
                "test sets with one class only"
                if col == "auc"
                else "test sets missing a class"
                if col == "balanced_accuracy"
                else "test sets without a comparable pair"
            )
            lines.append(
                f"> **Warning:** {col} is undefined (NaN) in {len(bad)} of {n} folds {bad} "
                f"({why}); means are over the other folds only."
            )
    if repeated:
        lines.append(
            f"> **Note:** the split file tests {len(repeated)} case(s) in more than one fold "
            f"(e.g. {repeated[:3]}; Monte-Carlo splits): folds are not independent and pooled "
            "statistics are not computed."
        )
    return lines


def _fold_table(df: pd.DataFrame, cfg: dict[str, Any]) -> list[str]:
    skip = ("fold", "status", "best_epoch", "epochs_run", "n_test", "n_events")
    metric_cols = [c for c in df.columns if c not in skip]
    head = ["fold", "status", "best_epoch", "n_test", *metric_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in df.to_dict("records"):  # records keep int columns as ints
        if r["status"] != "complete":
            cells = [str(r["fold"]), r["status"]] + ["—"] * (len(head) - 2)
        else:
            cells = [_fmt(r.get(c)) for c in head]
        lines.append("| " + " | ".join(cells) + " |")
    means = [
        mean_sd(df[c].to_numpy(dtype=float), len(df))
        if c in MEANS[cfg["task"]] or c.startswith("f1_")
        else "—"
        for c in metric_cols
    ]
    lines.append("| **mean ± sd** | | | | " + " | ".join(means) + " |")
    if cfg["task"] == "survival":
        lines += [
            "",
            "Log-rank p-values and hazard ratios are per fold; they are not averaged (see the "
            "pooled statistics).",
        ]
    return lines


def _pooled_section(
    run_dir: Path, cfg: dict[str, Any], folds: list[int], repeated: list[str]
) -> tuple[list[str], dict[str, Any] | None]:
    if repeated or not folds:
        return [], None
    preds = pooled_predictions(run_dir, folds)
    head = f"## Pooled over the {len(preds)} test cases of {len(folds)} finished fold(s)"
    if cfg["task"] == "subtype":
        first = json.loads((run_dir / f"fold_{folds[0]}" / METRICS_FILE).read_text())
        names = list(first["test"]["f1"])  # class names in class-index order
        pooled = pooled_subtype(preds, names, run_dir)
        lines = ["", head, "", f"AUC {_fmt(pooled['auc'])}, balanced accuracy "]
        lines[-1] += f"{_fmt(pooled['balanced_accuracy'])}, accuracy {_fmt(pooled['accuracy'])}."
        lines += ["", "Confusion matrix (rows true, columns predicted):", ""]
        lines += ["| true \\ pred | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for name, row in zip(names, pooled["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines += ["", "![pooled ROC](roc_pooled.png)"]
    elif "high_risk" not in preds:  # predictions written before risk groups were recorded
        return [
            "",
            head,
            "",
            "Not computed: the folds' predictions.csv have no high_risk "
            "column (written by an older hipt); rerun the folds.",
        ], None
    else:
        pooled = pooled_survival(preds, run_dir)
        lines = [
            "",
            head,
            "",
            f"c-index {_fmt(pooled['c_index'])}; high- vs low-risk group (risk above each "
            f"fold's training median; {pooled['n_high_risk']} of {pooled['n']} cases high): "
            f"log-rank p = {pooled['logrank_p']:.3g}, hazard ratio "
            f"{_fmt(pooled['hr_high_vs_low'])} (95% CI {_fmt(pooled['hr_high_vs_low_lower95'])}"
            f"–{_fmt(pooled['hr_high_vs_low_upper95'])}); {pooled['n_events']} events.",
            "",
            "![pooled Kaplan–Meier](km_pooled.png)",
        ]
    return lines, pooled


def _context(run_dir: Path) -> list[str]:
    """Fold balance and left-out cases, from the files ``hipt train`` wrote beside the run."""
    lines = []
    balance = run_dir / "split_balance.csv"
    if balance.is_file():
        b = pd.read_csv(balance)
        lines += ["", "## Test-fold mix against the cohort's (`split_balance.csv`)", ""]
        lines += ["| " + " | ".join(b.columns) + " |", "|" + "---|" * len(b.columns)]
        lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in b.to_dict("split")["data"]]
    excluded = run_dir / "excluded.csv"
    if excluded.is_file():
        ex = pd.read_csv(excluded, dtype=str)
        if len(ex):
            lines += ["", f"## {ex['case_id'].nunique()} case(s) left out (`excluded.csv`)", ""]
            lines += [f"- {r.case_id} (slide {r.slide_id}): {r.reason}" for r in ex.itertuples()]
    return lines


def summarize(run_dir: str | os.PathLike, cfg: dict[str, Any]) -> pd.DataFrame:
    """Write ``summary.csv`` (one row per fold), ``pooled.json`` and ``report.md``; return the rows.

    Returns an empty frame when no fold has finished (nothing is written then).
    """
    run_dir = Path(run_dir)
    df = collect(run_dir)
    if df.empty or not (df["status"] == "complete").any():
        return pd.DataFrame()
    write_text_atomic(run_dir / "summary.csv", df.to_csv(index=False))
    split_path = run_dir / "splits.csv"
    repeated = repeated_test_cases(pd.read_csv(split_path)) if split_path.is_file() else []
    finished = df.loc[df["status"] == "complete", "fold"].tolist()
    select_on = cfg["train"]["select_on"]
    lines = [f"# {cfg['cohort']}: {cfg['task']} with {cfg['model']['name']}", ""]
    flags = _warnings(df, cfg, repeated)
    lines += [*flags, ""] if flags else []
    lines += [
        f"{len(finished)} of {len(df)} folds finished. Protocol: `train.select_on: {select_on}`, "
        f"{PROTOCOLS.get(select_on, select_on)}. Splits by case: `splits.csv`; resolved "
        "config: `config.yaml`.",
        "",
    ]
    lines += _fold_table(df, cfg)
    pooled_lines, pooled = _pooled_section(run_dir, cfg, finished, repeated)
    lines += pooled_lines
    if pooled is not None:
        write_text_atomic(run_dir / "pooled.json", json.dumps(json_safe(pooled), indent=2))
    else:
        (run_dir / "pooled.json").unlink(missing_ok=True)
    lines += _context(run_dir)
    lines += ["", "## Plots per fold", ""]
    plot = "roc.png" if cfg["task"] == "subtype" else "km.png"
    lines += [f"![fold {f}](fold_{f}/{plot})" for f in finished]
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    return df
