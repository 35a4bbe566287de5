"""Case-level splits: no case in two roles, stratification, site preservation, CSV round trip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from train.data import survival_strata
from train.splits import (
    SplitError,
    check_splits,
    fold_cases,
    make_splits,
    read_splits,
    tcga_site,
    write_splits,
)


def _assert_valid(df: pd.DataFrame, case_ids: list[str], folds: int) -> None:
    """Every fold lists every case once; every case is tested exactly once over the folds."""
    assert sorted(df["fold"].unique().tolist()) == list(range(folds))
    for _, part in df.groupby("fold"):
        assert sorted(part["case_id"]) == sorted(case_ids)  # once per fold → one role per fold
        assert not part["case_id"].duplicated().any()
        assert {"train", "val", "test"} <= set(part["role"])
    tested = df.loc[df["role"] == "test", "case_id"]
    assert sorted(tested) == sorted(case_ids)


def _cases(n: int, n_sites: int = 8) -> list[str]:
    return [f"TCGA-{chr(65 + i % n_sites)}{i % n_sites}-{i:04d}" for i in range(n)]


@pytest.mark.parametrize("folds", [2, 5, 10])
def test_stratified_kfold_by_case(folds):
    cases = _cases(103)
    labels = [str(i % 3 if i < 90 else 0) for i in range(103)]  # unbalanced classes
    df = make_splits(cases, labels, folds=folds, val_fraction=0.15, seed=3)
    _assert_valid(df, cases, folds)
    lab = dict(zip(cases, labels, strict=True))
    total = Counter(labels)
    for k in range(folds):
        test = fold_cases(df, k)["test"]
        counts = Counter(lab[c] for c in test)
        for label, n in total.items():
            # Round-robin inside each stratum: each fold holds its share ± 1.
            assert abs(counts[label] - n / folds) <= 1
        val = fold_cases(df, k)["val"]
        assert abs(len(val) - 0.15 * (103 - len(test))) <= 2
        assert {lab[c] for c in val} == set(total)


def test_same_seed_same_splits_other_seed_differs():
    cases = _cases(50)
    labels = [str(i % 2) for i in range(50)]
    a = make_splits(cases, labels, folds=5, seed=7)
    b = make_splits(cases, labels, folds=5, seed=7)
    c = make_splits(cases, labels, folds=5, seed=8)
    assert a.equals(b)
    assert not a.equals(c)


def test_survival_strata_combine_event_and_time():
    times = np.arange(40, dtype=float)
    events = np.array([i % 2 for i in range(40)])
    strata = survival_strata(times, events, n_bins=4)
    assert len(set(strata)) == 8
    cases = _cases(40)
    df = make_splits(cases, strata, folds=4, seed=0)
    _assert_valid(df, cases, 4)
    for k in range(4):
        test = fold_cases(df, k)["test"]
        ev = [events[cases.index(c)] for c in test]
        assert sum(ev) == 5  # 20 events spread evenly over 4 folds


def test_tcga_site():
    assert tcga_site("TCGA-05-4244") == "05"
    assert tcga_site("tcga-A2-0001") == "A2"
    assert tcga_site("patient-7") == "patient-7"


def test_site_preserving_keeps_each_site_out_of_train_when_tested():
    cases = _cases(120, n_sites=8)
    sites = [tcga_site(c) for c in cases]
    labels = [str(i % 2) for i in range(120)]
    df = make_splits(cases, labels, folds=4, seed=1, sites=sites)
    _assert_valid(df, cases, 4)
    site_of = dict(zip(cases, sites, strict=True))
    for k in range(4):
        roles = fold_cases(df, k)
        test_sites = {site_of[c] for c in roles["test"]}
        other = {site_of[c] for c in roles["train"] + roles["val"]}
        assert test_sites and not test_sites & other
    check_splits(df, sites=site_of)  # the checker agrees


def test_site_preserving_needs_enough_sites():
    cases = _cases(30, n_sites=3)
    with pytest.raises(SplitError, match="at least 5 sites"):
        make_splits(cases, ["0"] * 30, folds=5, sites=[tcga_site(c) for c in cases])


def test_checker_catches_a_site_leak():
    df = pd.DataFrame(
        {"case_id": ["a", "b", "c"], "fold": [0, 0, 0], "role": ["train", "test", "val"]}
    )
    with pytest.raises(SplitError, match="test site"):
        check_splits(df, sites={"a": "S1", "b": "S1", "c": "S2"})


def test_write_read_round_trip(tmp_path):
    cases = _cases(30)
    df = make_splits(cases, [str(i % 2) for i in range(30)], folds=3, seed=0)
    path = write_splits(df, tmp_path / "splits.csv")
    back = read_splits(path, case_ids=cases)
    assert back.equals(df)
    assert list(pd.read_csv(path).columns) == ["case_id", "fold", "role"]


def test_user_split_with_a_case_in_two_roles_is_refused(tmp_path):
    path = tmp_path / "user.csv"
    path.write_text(
        "case_id,fold,role\nA,0,train\nB,0,test\nC,0,val\nA,0,test\nA,1,test\nB,1,train\nC,1,val\n"
    )
    with pytest.raises(SplitError) as err:
        read_splits(path)
    msg = str(err.value)
    assert "more than one role" in msg
    assert "row 2: case_id=A, fold=0, role=train" in msg
    assert "row 5: case_id=A, fold=0, role=test" in msg
    assert "row 6" not in msg


def test_user_split_other_problems(tmp_path):
    bad_role = tmp_path / "r.csv"
    bad_role.write_text("case_id,fold,role\nA,0,train\nB,0,holdout\n")
    with pytest.raises(SplitError, match="row 3: case_id=B, fold=0, role=holdout"):
        read_splits(bad_role)
    no_col = tmp_path / "c.csv"
    no_col.write_text("case_id,fold\nA,0\n")
    with pytest.raises(SplitError, match="missing column"):
        read_splits(no_col)
    unknown = tmp_path / "u.csv"
    unknown.write_text("case_id,fold,role\nA,0,train\nZ,0,test\n")
    with pytest.raises(SplitError, match="not in the cohort"):
        read_splits(unknown, case_ids=["A", "B"])
    no_test = tmp_path / "t.csv"
    no_test.write_text("case_id,fold,role\nA,0,train\nB,0,val\n")
    with pytest.raises(SplitError, match="fold 0 has no test"):
        read_splits(no_test)


def test_too_few_cases_or_duplicates_are_refused():
    with pytest.raises(SplitError, match="cannot fill"):
        make_splits(["a", "b"], ["0", "1"], folds=3)
    with pytest.raises(SplitError, match="duplicate"):
        make_splits(["a", "a", "b"], ["0", "0", "1"], folds=2)


def test_user_split_without_val_cases_is_refused(tmp_path):
    """Model selection needs val cases: without them the first epoch would be tested silently."""
    no_val = tmp_path / "v.csv"
    no_val.write_text("case_id,fold,role\nA,0,train\nB,0,test\nC,0,val\nA,1,test\nB,1,train\n")
    with pytest.raises(SplitError, match="fold 1 has no val cases"):
        read_splits(no_val)


def _kidney_like(sizes_per_class: dict[str, list[int]]):
    """Cases whose tissue-source sites go with their labels, as TCGA's do."""
    cases, labels, sites = [], [], []
    for label, sizes in sizes_per_class.items():
        for s, size in enumerate(sizes):
            site = f"{label}{s}"
            for _ in range(size):
                cases.append(f"TCGA-{site}-{len(cases):04d}")
                labels.append(label)
                sites.append(site)
    return cases, labels, sites


def test_site_preserving_folds_balance_labels_when_sites_go_with_labels():
    """Two classes, five equal sites each, none shared: size-only site assignment gave
    single-class test folds; the stratified grouped folds put both classes in every fold."""
    cases, labels, sites = _kidney_like({"CCRCC": [10] * 5, "PRCC": [10] * 5})
    for seed in (1, 2, 3):
        df = make_splits(cases, labels, folds=5, seed=seed, sites=sites, cover=labels)
        _assert_valid(df, cases, 5)
        lab = dict(zip(cases, labels, strict=True))
        for k in range(5):
            test = fold_cases(df, k)["test"]
            assert Counter(lab[c] for c in test) == {"CCRCC": 10, "PRCC": 10}, (seed, k)
        check_splits(df, sites=dict(zip(cases, sites, strict=True)))
    from train.splits import fold_balance

    balance = fold_balance(df, lab)
    assert balance["n_CCRCC"].tolist() == [10] * 5 and balance["max_share_diff"].max() == 0.0


def test_site_preserving_refuses_a_class_from_too_few_sites_before_training():
    cases, labels, sites = _kidney_like({"CCRCC": [8] * 5, "PRCC": [8] * 5, "CHRCC": [6, 6]})
    with pytest.raises(SplitError) as err:
        make_splits(cases, labels, folds=5, seed=1, sites=sites, cover=labels)
    msg = str(err.value)
    assert "CHRCC: 12 case(s) at 2 site(s) (CHRCC0, CHRCC1), fewer sites than the 5 folds" in msg
    assert "CCRCC:" not in msg and "PRCC:" not in msg
    # Two folds can hold every class.
    df = make_splits(cases, labels, folds=2, seed=1, sites=sites, cover=labels)
    lab = dict(zip(cases, labels, strict=True))
    for k in range(2):
        assert {lab[c] for c in fold_cases(df, k)["test"]} == {"CCRCC", "PRCC", "CHRCC"}


def test_site_preserving_survival_folds_need_an_event_in_every_test_fold():
    cases, labels, sites = _kidney_like({"e": [3, 3], "c": [5] * 6})
    events = ["event" if lab == "e" else "censored" for lab in labels]
    with pytest.raises(SplitError, match=r"event: 6 case\(s\) at 2 site\(s\) \(e0, e1\)"):
        make_splits(cases, labels, folds=3, sites=sites, cover=events, cover_values=["event"])


def test_repeated_test_cases_of_monte_carlo_splits():
    from train.splits import repeated_test_cases

    df = pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "a", "b", "c"],
            "fold": [0, 0, 0, 1, 1, 1],
            "role": ["test", "train", "val", "test", "val", "train"],
        }
    )
    assert repeated_test_cases(df) == ["a"]
    assert repeated_test_cases(make_splits(_cases(20), ["0", "1"] * 10, folds=4)) == []
