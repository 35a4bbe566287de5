"""PNG plots of a fold: ROC curves (subtyping) and Kaplan–Meier curves of risk groups (survival)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from hipt.atomic import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_png(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curve per class (binary: the positive class) with its AUC in the legend."""
    y = np.asarray(y)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for k in classes:
        pos = y == k
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        ax.plot(fpr, tpr, label=f"{class_names[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title or "ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if ax.get_legend_handles_labels()[0]:  # no curve when the test set has one class
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(path))


def km_png(
    times: np.ndarray,
    events: np.ndarray,
    high: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    p: float | None = None,
) -> Path:
    """Kaplan–Meier curves of the predicted low- and high-risk groups (``high`` 1 / 0 per case,
    :func:`train.metrics.risk_groups`)."""
    from lifelines import KaplanMeierFitter

    times, events, high = np.asarray(times, float), np.asarray(events, int), np.asarray(high)
    fig, ax = plt.subplots(figsize=(5, 4))
    for g, name in ((0, "low risk"), (1, "high risk")):
        m = high == g
        if m.any():
            KaplanMeierFitter().fit(
                times[m], events[m], label=f"{name} (n={int(m.sum())})"
            ).plot_survival_function(ax=ax, ci_show=True)
    if p is not None and np.isfinite(p):
        ax.text(0.02, 0.04, f"log-rank p = {p:.3g}", transform=ax.transAxes)
    ax.set(
        xlabel="months",
        ylabel="survival probability",
        title=title or "Kaplan–Meier",
        ylim=(0, 1.02),
    )
    return _save(fig, Path(path))
