"""The run's summary and report: no fold disappears, pooled statistics match lifelines and
scikit-learn on the same predictions, Monte-Carlo split files, the last-epoch protocol, and bad
input that fails one case or refuses the run in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from hipt.synthetic_cohort import make_subtyping_cohort, make_survival_cohort
from train.cli import run
from train.config import default_config, merge, validate
from train.data import BagStore, load_cohort
from train.loops import load_checkpoint
from train.splits import fold_cases, read_splits


def _cfg(syn, out, task="subtype", **over):
    base = {
        "cohort": "rep",
        "task": task,
        "csv": str(syn.csv_path),
        "features_dir": str(syn.features_dir),
        "out": str(out),
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 8}},
        "splits": {"folds": 3},
        "train": {"epochs": 2, "lr": 1e-3, "progress": False},
    }
    return validate(merge(merge(default_config(), base), over))


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    return make_subtyping_cohort(
        tmp_path_factory.mktemp("sub"), n_cases=16, regions=(3, 5), n_informative=1, seed=5
    )


@pytest.fixture(scope="module")
def surv(tmp_path_factory):
    return make_survival_cohort(
        tmp_path_factory.mktemp("surv"), n_cases=30, regions=(3, 5), n_informative=1, seed=6
    )


def _split_file(path, folds_of_test, ids, n_folds):
    """``folds_of_test``: case → list of folds where it is tested; two val cases per fold."""
    rows = ["case_id,fold,role"]
    for k in range(n_folds):
        rest = [c for c in ids if k not in folds_of_test[c]]
        for c in ids:
            role = "test" if k in folds_of_test[c] else ("val" if c in rest[:2] else "train")
            rows.append(f"{c},{k},{role}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_single_class_fold_stays_in_the_summary_as_nan_and_is_flagged(sub, tmp_path):
    cohort = load_cohort(sub.csv_path, sub.features_dir, task="subtype")
    a = [c.case_id for c in cohort.cases if c.label_name == "A"]
    b = [c.case_id for c in cohort.cases if c.label_name == "B"]
    # Fold 1 tests only A cases: its AUC and balanced accuracy are undefined.
    tested = {c: [0] for c in a[:4] + b} | {c: [1] for c in a[4:]}
    split = _split_file(tmp_path / "s.csv", tested, cohort.case_ids, 2)
    cfg = _cfg(sub, tmp_path / "runs", splits={"file": str(split)})
    assert run(cfg) == 0
    run_dir = tmp_path / "runs" / "rep"
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["fold"].tolist() == [0, 1] and (summary["status"] == "complete").all()
    assert np.isfinite(summary.loc[0, "auc"]) and np.isnan(summary.loc[1, "auc"])
    assert np.isnan(summary.loc[1, "balanced_accuracy"])
    report = (run_dir / "report.md").read_text()
    head = report.split("| fold |")[0]
    assert "auc is undefined (NaN) in 1 of 2 folds [1]" in head
    assert f"{summary.loc[0, 'auc']:.3f} (no sd) over 1 of 2 folds" in report
    fold1 = next(line for line in report.splitlines() if line.startswith("| 1 | complete"))
    assert "| nan |" in fold1
    # Pooled over both folds' test predictions, as scikit-learn computes them.
    preds = pd.concat(pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv") for k in (0, 1))
    pooled = json.loads((run_dir / "pooled.json").read_text())
    assert pooled["n"] == 16
    assert pooled["auc"] == pytest.approx(roc_auc_score(preds["label_index"], preds["prob_B"]))
    pred = preds[["prob_A", "prob_B"]].to_numpy().argmax(1)
    assert pooled["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(preds["label_index"], pred)
    )
    assert (run_dir / "roc_pooled.png").read_bytes()[:4] == b"\x89PNG"


def test_unfinished_folds_are_rows_of_the_summary(sub, tmp_path):
    cfg = _cfg(sub, tmp_path / "runs")
    assert run(cfg, fold=1) == 0
    run_dir = tmp_path / "runs" / "rep"
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["status"].tolist() == ["not finished", "complete", "not finished"]
    report = (run_dir / "report.md").read_text()
    assert "2 of 3 folds not finished: [0, 2]" in report
    assert "over 1 of 3 folds" in report


def test_pooled_survival_statistics_match_lifelines(surv, tmp_path):
    cfg = _cfg(surv, tmp_path / "runs", task="survival")
    assert run(cfg) == 0
    run_dir = tmp_path / "runs" / "rep"
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="survival")
    splits = read_splits(run_dir / "splits.csv")
    store = BagStore(cohort, "region_features")
    parts = []
    for k in range(3):
        fold = run_dir / f"fold_{k}"
        m = json.loads((fold / "metrics.json").read_text())
        p = pd.read_csv(fold / "predictions.csv")
        # The groups split at the median risk of the fold's training cases.
        model = load_checkpoint(cfg, cohort, fold / "best.pt")
        from hipt.survival import risk_from_logits

        with torch.no_grad():
            train_risk = [
                float(risk_from_logits(model(store.bag(c)).logits))
                for c in fold_cases(splits, k)["train"]
            ]
        assert m["risk_threshold"] == pytest.approx(np.median(train_risk), abs=1e-6)
        assert (p["high_risk"] == (p["risk"] > m["risk_threshold"])).all()
        parts.append(p)
    preds = pd.concat(parts, ignore_index=True)
    assert sorted(preds["case_id"]) == sorted(cohort.case_ids)  # each case once
    pooled = json.loads((run_dir / "pooled.json").read_text())
    t, e, high = preds["survival_months"], preds["event"], preds["high_risk"]
    assert pooled["c_index"] == pytest.approx(concordance_index(t, -preds["risk"], e))
    lr = logrank_test(t[high == 1], t[high == 0], e[high == 1], e[high == 0])
    assert pooled["logrank_p"] == pytest.approx(lr.p_value)
    cph = CoxPHFitter().fit(pd.DataFrame({"t": t, "e": e, "x": high.astype(float)}), "t", "e")
    s = cph.summary.loc["x"]
    assert pooled["hr_high_vs_low"] == pytest.approx(s["exp(coef)"], rel=1e-6)
    assert pooled["hr_high_vs_low_lower95"] == pytest.approx(s["exp(coef) lower 95%"], rel=1e-6)
    assert (run_dir / "km_pooled.png").read_bytes()[:4] == b"\x89PNG"
    report = (run_dir / "report.md").read_text()
    assert f"log-rank p = {lr.p_value:.3g}" in report
    # p-values and hazard-ratio bounds are never averaged over folds.
    head = next(line for line in report.splitlines() if line.startswith("| fold |")).split("|")
    mean = next(line for line in report.splitlines() if line.startswith("| **mean")).split("|")
    cells = dict(zip([h.strip() for h in head], [m.strip() for m in mean], strict=True))
    assert cells["logrank_p"] == "—" and cells["hr_high_vs_low_lower95"] == "—"
    assert "over 3 of 3 folds" in cells["c_index"]


def test_a_split_file_that_tests_a_case_twice_is_reported_and_not_pooled(sub, tmp_path, capsys):
    cohort = load_cohort(sub.csv_path, sub.features_dir, task="subtype")
    ids = cohort.case_ids
    tested = {c: [i % 2] for i, c in enumerate(ids)}
    tested[ids[0]] = [0, 1]  # Monte-Carlo style: tested in both folds
    split = _split_file(tmp_path / "mc.csv", tested, ids, 2)
    cfg = _cfg(sub, tmp_path / "runs", splits={"file": str(split)})
    assert run(cfg) == 0
    assert "1 case(s) tested in more than one fold" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "rep"
    report = (run_dir / "report.md").read_text()
    assert "tests 1 case(s) in more than one fold" in report.split("| fold |")[0]
    assert "## Pooled" not in report and not (run_dir / "pooled.json").exists()


def test_select_on_last_tests_the_last_epoch_and_says_so(sub, tmp_path):
    over = {"epochs": 4, "patience": 1, "lr": 5e-2, "select_on": "last"}
    cfg = _cfg(sub, tmp_path / "runs", train=over)
    assert run(cfg, fold=0) == 0
    fold = tmp_path / "runs" / "rep" / "fold_0"
    m = json.loads((fold / "metrics.json").read_text())
    hist = pd.read_csv(fold / "history.csv")
    assert m["selected_on"] == "last" and m["epochs_run"] == 4 and m["best_epoch"] == 3
    assert int(hist["val_loss"].idxmin()) != 3  # a validation-selected run would differ
    report = (tmp_path / "runs" / "rep" / "report.md").read_text()
    assert "`train.select_on: last`, the model of the last epoch is tested" in report


def test_nan_features_fail_one_case_which_is_listed(sub, tmp_path, capsys):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(sub.features_dir, feats)
    bad = sub.table[3]
    with h5py.File(feats / f"{bad['slide_id']}.h5", "r+") as f:
        f["region_features"][0, :] = np.nan
    cfg = _cfg(sub, tmp_path / "runs", features_dir=str(feats))
    assert run(cfg, fold=0) == 0
    err = capsys.readouterr().err
    assert f"case {bad['case_id']} left out: {feats / (bad['slide_id'] + '.h5')}" in err
    run_dir = tmp_path / "runs" / "rep"
    excluded = pd.read_csv(run_dir / "excluded.csv")
    assert excluded["case_id"].tolist() == [bad["case_id"]]
    assert bad["case_id"] not in set(pd.read_csv(run_dir / "splits.csv")["case_id"])
    assert f"- {bad['case_id']} (slide {bad['slide_id']})" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("name", ["../escaped", "/abs", ".hidden"])
def test_a_cohort_name_that_escapes_out_is_refused(sub, tmp_path, capsys, name):
    with pytest.raises(ValueError, match="must not contain"):
        _cfg(sub, tmp_path / "runs", cohort=name)
    cfg = dict(_cfg(sub, tmp_path / "runs"), cohort=name)  # run() checks a dict config too
    assert run(cfg) == 2
    assert f"cohort {name!r}" in capsys.readouterr().err
    assert not any(tmp_path.rglob("splits.csv"))


def test_cli_non_utf8_cohort_is_one_line_without_traceback(sub, tmp_path):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("slide_id,case_id,label\nx,Jos\xe9,A\n".encode("latin-1"))
    cmd = [sys.executable, "-m", "hipt.cli", "train", "--csv", str(csv)]
    cmd += ["--features-dir", str(sub.features_dir), "--out", str(tmp_path / "runs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"hipt train: {csv}: not UTF-8 text (byte 0xe9 on line 2); save the table as UTF-8"
    ]
    assert not (tmp_path / "runs").exists()


def test_site_preserving_run_where_sites_go_with_labels(sub, tmp_path, capsys):
    """Each class comes from its own two sites: three site-preserving folds cannot all test both
    classes (refused before any output, classes and sites named); two folds can."""
    rows = ["slide_id,case_id,label,site"]
    for i, r in enumerate(sub.table):
        rows.append(f"{r['slide_id']},{r['case_id']},{r['label']},{r['label']}{i % 2}")
    csv = tmp_path / "sited.csv"
    csv.write_text("\n".join(rows) + "\n")
    cfg = _cfg(sub, tmp_path / "runs", csv=str(csv), splits={"folds": 3, "site_preserving": True})
    assert run(cfg) == 2
    err = capsys.readouterr().err
    assert "A: 8 case(s) at 2 site(s) (A0, A1), fewer sites than the 3 folds" in err
    assert "B: 8 case(s) at 2 site(s) (B0, B1)" in err
    assert not (tmp_path / "runs").exists()
    cfg = _cfg(sub, tmp_path / "runs", csv=str(csv), splits={"folds": 2, "site_preserving": True})
    assert run(cfg) == 0
    run_dir = tmp_path / "runs" / "rep"
    balance = pd.read_csv(run_dir / "split_balance.csv")
    assert balance["n_test"].sum() == 16 and (balance[["n_A", "n_B"]] > 0).all().all()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["auc"].notna().all()
    assert "Test-fold mix against the cohort's" in (run_dir / "report.md").read_text()


def test_hazard_ratio_of_a_group_without_events_is_undefined_not_huge():
    from train.metrics import cox_hazard_ratio

    times = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    events = np.array([1, 1, 1, 0, 0, 0])
    high = np.array([1, 1, 1, 0, 0, 0])  # every event in the high group: separation
    assert all(np.isnan(v) for v in cox_hazard_ratio(times, events, high).values())
    mixed = np.array([1, 1, 0, 0, 1, 0])
    hr = cox_hazard_ratio(times, events, mixed)
    assert np.isfinite(hr["hr"]) and hr["hr_lower95"] < hr["hr"] < hr["hr_upper95"]
