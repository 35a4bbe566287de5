"""Evaluation metrics: scikit-learn for subtyping, lifelines for survival.

Examples
--------
>>> import numpy as np
>>> m = classification_metrics(np.array([0, 1, 1, 0]), np.array([[.9, .1], [.2, .8], [.4, .6], [.3, .7]]))
>>> m["auc"], m["balanced_accuracy"]
(0.75, 0.75)
>>> round(concordance(np.array([1., 2., 3.]), np.array([1, 1, 1]), np.array([3., 2., 1.])), 2)
1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score


def macro_ovr_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC (binary: AUC of the positive class).

    Classes absent from ``y`` (or present in every row) are left out of the mean; NaN when no class
    can be scored.
    """
    y = np.asarray(y)
    n_classes = probs.shape[1]
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1])) if len(set(y.tolist())) == 2 else float("nan")
    aucs = [
        roc_auc_score(y == k, probs[:, k]) for k in range(n_classes) if 0 < (y == k).sum() < len(y)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Macro OvR AUC, balanced accuracy, accuracy, per-class F1 and the confusion matrix.

    The AUC and the balanced accuracy are NaN where the test set cannot define them (one class
    only; balanced accuracy also when any class is missing).

    Parameters
    ----------
    y : int array [N]
        True class indices.
    probs : float array [N, K]
        Predicted class probabilities.
    class_names : sequence of str, optional
        Names for the per-class entries (default ``"0"``, ``"1"``, ...).
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    pred = probs.argmax(axis=1)
    labels = list(range(k))
    # Balanced accuracy is the mean recall over the classes: a test set without some class
    # (a single-class fold) has no recall for it, so no number is reported.
    bacc = float("nan")
    if len(y) and set(y.tolist()) == set(labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warns when a class has no prediction
            bacc = float(balanced_accuracy_score(y, pred))
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    return {
        "auc": macro_ovr_auc(y, probs),
        "balanced_accuracy": bacc,
        "accuracy": float((pred == y).mean()),
        "f1": {names[i]: float(f1[i]) for i in labels},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "n": int(len(y)),
    }


def concordance(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index with lifelines (higher risk should mean shorter time).

    lifelines' ``concordance_index`` expects scores that grow with survival time, so it gets
    ``-risk``. NaN when no pair of cases can be compared (no event, or every event at or after
    the other times, as in a one-case validation set).
    """
    from lifelines.utils import concordance_index

    events = np.asarray(events).astype(bool)
    if not events.any():
        return float("nan")
    try:
        return float(concordance_index(np.asarray(times, float), -np.asarray(risk, float), events))
    except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
        return float("nan")


def cox_hazard_ratio(times: np.ndarray, events: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Hazard ratio (95% CI, p) of a one-covariate Cox model; NaNs when it cannot be fitted.

    For a group indicator (0/1), a group without events makes the likelihood grow without
    bound (separation): the ratio is then undefined, NaN, not a huge number.
    """
    import pandas as pd
    from lifelines import CoxPHFitter

    nan = {
        "hr": float("nan"),
        "hr_lower95": float("nan"),
        "hr_upper95": float("nan"),
        "p": float("nan"),
    }
    x, events = np.asarray(x, dtype=float), np.asarray(events).astype(bool)
    if np.std(x) == 0 or not events.any():
        return nan
    if set(np.unique(x).tolist()) <= {0.0, 1.0} and not (
        events[x == 1].any() and events[x == 0].any()
    ):
        return nan
    df = pd.DataFrame({"t": times, "e": events, "x": x})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter().fit(df, "t", "e")
    except Exception:  # lifelines raises several types on separation / no convergence
        return nan
    s = cph.summary.loc["x"]
    out = {
        "hr": float(s["exp(coef)"]),
        "hr_lower95": float(s["exp(coef) lower 95%"]),
        "hr_upper95": float(s["exp(coef) upper 95%"]),
        "p": float(s["p"]),
    }
    return out if all(np.isfinite(v) for v in out.values()) else nan


def risk_groups(risk: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """1 for cases above ``threshold`` (high-risk group), else 0.

    The threshold is the median risk of the fold's training cases, fixed before the test set is
    seen; without one, the median of ``risk`` itself.
    """
    risk = np.asarray(risk, dtype=float)
    cut = float(np.median(risk)) if threshold is None else float(threshold)
    return (risk > cut).astype(np.int64)


def logrank_p(times: np.ndarray, events: np.ndarray, high: np.ndarray) -> float:
    """Log-rank p-value of the high- against the low-risk group; NaN with an empty group."""
    from lifelines.statistics import logrank_test

    times, events, high = np.asarray(times, float), np.asarray(events, int), np.asarray(high)
    if not (high.any() and (1 - high).any() and events.any()):
        return float("nan")
    res = logrank_test(times[high == 1], times[high == 0], events[high == 1], events[high == 0])
    return float(res.p_value)


def survival_metrics(
    times: np.ndarray, events: np.ndarray, risk: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """c-index, log-rank p of the risk groups, and Cox hazard ratios of the risk score.

    Groups split the risk at ``threshold`` (:func:`risk_groups`). ``cox_per_sd`` is the hazard
    ratio per standard deviation of the risk score; ``cox_high_vs_low`` that of the high-risk
    group against the low-risk group.
    """
    times = np.asarray(times, dtype=float)
    events = np.asarray(events, dtype=np.int64)
    risk = np.asarray(risk, dtype=float)
    high = risk_groups(risk, threshold)
    sd = np.std(risk)
    return {
        "c_index": concordance(times, events, risk),
        "logrank_p": logrank_p(times, events, high),
        "cox_per_sd": cox_hazard_ratio(
            times, events, (risk - risk.mean()) / sd if sd > 0 else risk
        ),
        "cox_high_vs_low": cox_hazard_ratio(times, events, high.astype(float)),
        "n": int(len(times)),
        "n_events": int(events.sum()),
        "n_high_risk": int(high.sum()),
    }
