"""Survival training: known hazards are recovered, the NLL model matches Cox on real data (rossi),
and a survival run writes its metrics and Kaplan–Meier plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.utils import concordance_index

from hipt.h5schema import FeaturesWriter
from hipt.synthetic_cohort import make_survival_cohort
from train.cli import run
from train.config import default_config, merge, validate
from train.data import BagStore, case_strata, load_cohort
from train.loops import FoldRunner
from train.splits import fold_cases, make_splits


def _cfg(csv, features_dir, out, **over):
    base = {
        "cohort": "surv",
        "task": "survival",
        "csv": str(csv),
        "features_dir": str(features_dir),
        "out": str(out),
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 32}},
        "splits": {"folds": 5},
        "train": {"epochs": 10, "lr": 3e-4, "patience": 0, "progress": False},
    }
    if "model" in over:  # another model takes its own kwargs, not abmil's
        base["model"] = over.pop("model")
    return validate(merge(merge(default_config(), base), over))


def test_recovers_known_hazards(tmp_path):
    """Log-hazard carried by 3 regions per bag: test c-index ≥ 0.75 (the true hazards give ≈ 0.83)."""
    torch.set_num_threads(1)
    syn = make_survival_cohort(
        tmp_path / "c", n_cases=240, regions=(8, 16), n_informative=3, seed=0
    )
    cfg = _cfg(syn.csv_path, syn.features_dir, tmp_path / "runs")
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="survival")
    splits = make_splits(cohort.case_ids, case_strata(cohort), folds=5, seed=1)
    cases = fold_cases(splits, 0)
    m = FoldRunner(
        cfg, cohort, BagStore(cohort, "region_features"), cases, 0, tmp_path / "f0"
    ).run()
    oracle = syn.oracle_c_index(cases["test"])  # the true log-hazard on the same cases
    assert oracle > 0.75  # the data carry the signal
    assert m["test"]["c_index"] >= 0.75, (m["test"]["c_index"], oracle)
    assert m["test"]["c_index"] >= oracle - 0.1, (m["test"]["c_index"], oracle)
    assert m["test"]["cox_per_sd"]["hr"] > 1.5  # higher predicted risk → higher observed hazard
    assert m["test"]["logrank_p"] < 0.05


def _rossi_cohort(root):
    df = load_rossi()
    cov = [c for c in df.columns if c not in ("week", "arrest")]
    x = df[cov].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)  # unsupervised scaling; Cox is invariant to it
    rows = []
    for i in range(len(df)):
        sid = f"rossi-{i:03d}"
        attrs = dict(
            slide_id=sid,
            target_mpp=0.5,
            vit256_sha256="-",
            vit4k_sha256="-",
            mean=[0] * 3,
            std=[1] * 3,
            hipt_version="-",
        )
        coords = np.zeros((1, 2), np.int64)
        with FeaturesWriter(
            root / "features" / f"{sid}.h5",
            coords,
            attrs,
            patch_features=False,
            region_dim=len(cov),
        ) as w:
            w.write(0, None, x[i : i + 1])
        rows.append(
            {
                "slide_id": sid,
                "case_id": f"case-{i:03d}",
                "survival_months": df.week[i],
                "event": df.arrest[i],
            }
        )
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return df, cov


def test_nll_model_matches_cox_on_rossi(tmp_path):
    """Rossi covariates as one-region bags: the discrete-time NLL model (4 bins, linear head) reaches
    the c-index of lifelines' CoxPHFitter within 0.03, averaged over the same 5 test folds."""
    torch.set_num_threads(1)
    df, cov = _rossi_cohort(tmp_path)
    cfg = _cfg(
        tmp_path / "cohort.csv",
        tmp_path / "features",
        tmp_path / "runs",
        model={"name": "abmil", "kwargs": {"hidden_dim": 0, "dropout": 0.0}},
        train={"epochs": 8, "lr": 0.03, "accumulate": 8, "weight_decay": 0.0},
    )
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="survival")
    store = BagStore(cohort, "region_features")
    splits = make_splits(cohort.case_ids, case_strata(cohort), folds=5, seed=1)
    row = {c: i for i, c in enumerate(cohort.case_ids)}
    nll, cox = [], []
    for k in range(5):
        cases = fold_cases(splits, k)
        m = FoldRunner(cfg, cohort, store, cases, k, tmp_path / f"fold_{k}").run()
        nll.append(m["test"]["c_index"])
        fit_rows = [row[c] for c in cases["train"] + cases["val"]]  # Cox sees every non-test case
        test_rows = [row[c] for c in cases["test"]]
        cph = CoxPHFitter().fit(df.iloc[fit_rows], "week", "arrest")
        test = df.iloc[test_rows]
        cox.append(
            concordance_index(test["week"], -cph.predict_partial_hazard(test), test["arrest"])
        )
    gap = float(np.mean(nll) - np.mean(cox))
    assert np.mean(cox) > 0.58  # Cox itself finds the signal on these folds
    assert abs(gap) <= 0.03, {"nll": nll, "cox": cox, "gap": gap}


def test_survival_run_writes_metrics_and_plots(tmp_path):
    syn = make_survival_cohort(
        tmp_path / "c", n_cases=30, regions=(3, 6), n_informative=1, slides_per_case=2, seed=2
    )
    cfg = _cfg(
        syn.csv_path,
        syn.features_dir,
        tmp_path / "runs",
        model={"name": "hipt_gp", "kwargs": {}},
        splits={"folds": 3},
        survival={"n_bins": 3, "alpha": 0.2},
        train={"epochs": 2, "select_on": "cindex"},
    )
    cfg["model"]["kwargs"] = {}
    assert run(cfg) == 0
    run_dir = tmp_path / "runs" / "surv"
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["fold"].tolist() == [0, 1, 2]
    assert {"c_index", "logrank_p", "hr_per_sd", "hr_high_vs_low"} <= set(summary.columns)
    report = (run_dir / "report.md").read_text()
    assert "c_index" in report and "fold_0/km.png" in report
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="survival")
    for k in range(3):
        fold = run_dir / f"fold_{k}"
        assert (fold / "km.png").read_bytes()[:4] == b"\x89PNG"
        m = json.loads((fold / "metrics.json").read_text())
        assert len(m["bin_edges"]) == 4 and m["bin_edges"][0] == 0.0
        assert m["selected_on"] == "cindex"
        t = m["test"]
        for key in ("hr", "hr_lower95", "hr_upper95", "p"):
            assert key in t["cox_per_sd"] and key in t["cox_high_vs_low"]
        preds = pd.read_csv(fold / "predictions.csv")
        # Per case: the c-index in metrics.json is lifelines' on -risk of these rows.
        want = concordance_index(preds["survival_months"], -preds["risk"], preds["event"])
        assert t["c_index"] == pytest.approx(want)
        s = preds[[f"survival_bin{j}" for j in range(3)]].to_numpy()
        assert np.all(np.diff(s, axis=1) <= 1e-7)  # survival never increases
        np.testing.assert_allclose(preds["risk"], -s.sum(axis=1), atol=1e-6)
        for _, r in preds.iterrows():
            case = cohort.case(r["case_id"])
            assert r["slide_ids"] == ";".join(case.slide_ids)
            assert r["survival_months"] == pytest.approx(case.time) and r["event"] == case.event


def test_c_index_without_comparable_pairs_is_nan_not_an_error():
    """A small val or test set can hold no comparable pair (one case, or the only event the
    longest time): the c-index is undefined there, and the fold must not crash on it."""
    from train.metrics import concordance, survival_metrics

    assert np.isnan(concordance(np.array([7.0]), np.array([1]), np.array([0.3])))
    times, events, risk = np.array([10.0, 5.0, 3.0]), np.array([1, 0, 0]), np.array([1.0, 2.0, 0.5])
    assert np.isnan(concordance(times, events, risk))
    m = survival_metrics(times, events, risk)
    assert np.isnan(m["c_index"]) and m["n_events"] == 1
    # A comparable pair ordered by risk still scores 1.
    assert concordance(np.array([3.0, 5.0]), np.array([1, 0]), np.array([2.0, 1.0])) == 1.0


def test_selection_on_an_undefined_val_c_index_is_refused(tmp_path):
    """select_on=cindex with val cases that have no comparable pair would keep epoch 0 silently."""
    syn = make_survival_cohort(tmp_path / "c", n_cases=12, regions=(3, 4), n_informative=1, seed=3)
    cohort = load_cohort(syn.csv_path, syn.features_dir, task="survival")
    val = [next(c.case_id for c in cohort.cases if c.event == 1)]  # one case: no pair
    rest = [c for c in cohort.case_ids if c not in val]
    cases = {"train": rest[:8], "val": val, "test": rest[8:]}
    store = BagStore(cohort, "region_features")
    cfg = _cfg(
        syn.csv_path,
        syn.features_dir,
        tmp_path / "runs",
        train={"epochs": 1, "select_on": "cindex"},
    )
    with pytest.raises(ValueError, match="cannot select on val cindex"):
        FoldRunner(cfg, cohort, store, cases, 0, tmp_path / "f").run()
    assert not (tmp_path / "f").exists()
    # Selecting on the val loss needs no pair.
    cfg = _cfg(syn.csv_path, syn.features_dir, tmp_path / "runs", train={"epochs": 1})
    assert FoldRunner(cfg, cohort, store, cases, 0, tmp_path / "g").run()["best_epoch"] == 0
