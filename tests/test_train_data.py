"""Cohort validation (every bad-CSV case names its rows) and per-case bags from real HDF5 files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hipt.synthetic_cohort import make_subtyping_cohort, make_survival_cohort
from train.data import BagStore, CohortError, case_strata, load_cohort


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    return make_subtyping_cohort(
        tmp_path_factory.mktemp("sub"),
        n_cases=6,
        regions=(3, 5),
        n_informative=1,
        slides_per_case=2,
        seed=0,
    )


@pytest.fixture(scope="module")
def surv(tmp_path_factory):
    return make_survival_cohort(
        tmp_path_factory.mktemp("surv"), n_cases=6, regions=(3, 5), n_informative=1, seed=0
    )


def _write(tmp_path, text):
    p = tmp_path / "cohort.csv"
    p.write_text(text)
    return p


def _error(csv, features_dir, **kw) -> str:
    with pytest.raises(CohortError) as err:
        load_cohort(csv, features_dir, **kw)
    return str(err.value)


def test_valid_cohort_pools_slides_per_case(sub):
    cohort = load_cohort(sub.csv_path, sub.features_dir, task="subtype")
    assert cohort.label_map == {"A": 0, "B": 1}
    assert len(cohort.cases) == 6
    assert cohort.feature_dim == 192
    multi = [c for c in cohort.cases if len(c.slide_ids) > 1]
    assert multi, "the generator should have made a case with two slides"
    case = multi[0]
    store = BagStore(cohort, "region_features", cache=False)
    bag = store.bag(case.case_id).numpy()
    parts = []
    for sid in case.slide_ids:
        with h5py.File(sub.features_dir / f"{sid}.h5") as f:
            parts.append(f["region_features"][()])
    np.testing.assert_array_equal(bag, np.concatenate(parts))
    assert case.site == case.case_id[5:7]


def test_cache_returns_the_same_bag_without_reading_again(sub, tmp_path):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(sub.features_dir, feats)
    cohort = load_cohort(sub.csv_path, feats, task="subtype")
    store = BagStore(cohort, "region_features", cache=True)
    cid = cohort.cases[0].case_id
    first = store.bag(cid)
    for sid in cohort.case(cid).slide_ids:
        (feats / f"{sid}.h5").unlink()  # a second read would now fail
    assert store.bag(cid) is first
    with pytest.raises(CohortError, match="cannot read region_features"):
        BagStore(cohort, "region_features", cache=False).bag(cid)


def test_missing_column(sub, tmp_path):
    csv = _write(tmp_path, "slide_id,case_id\ns1,c1\n")
    msg = _error(csv, sub.features_dir, task="subtype")
    assert "missing column(s) ['label']" in msg


def test_duplicate_slide_and_unknown_label(sub, tmp_path):
    rows = sub.table
    text = "slide_id,case_id,label\n"
    text += "".join(f"{r['slide_id']},{r['case_id']},{r['label']}\n" for r in rows)
    text += f"{rows[0]['slide_id']},{rows[0]['case_id']},{rows[0]['label']}\n"
    csv = _write(tmp_path, text)
    msg = _error(csv, sub.features_dir, task="subtype")
    n = len(rows)
    assert "duplicate slide_id" in msg
    assert (
        f"row 2: slide_id='{rows[0]['slide_id']}'" in msg
        and f"row {n + 2}: slide_id='{rows[0]['slide_id']}'" in msg
    )
    msg = _error(sub.csv_path, sub.features_dir, task="subtype", label_map={"A": 0})
    assert "unknown label" in msg
    bad = [i for i, r in enumerate(rows) if r["label"] == "B"]
    assert f"row {bad[0] + 2}: slide_id='{rows[bad[0]]['slide_id']}', label='B'" in msg


def test_survival_bad_times_and_events(surv, tmp_path):
    rows = surv.table
    lines = ["slide_id,case_id,survival_months,event"]
    for i, r in enumerate(rows):
        t, e = r["survival_months"], r["event"]
        if i == 0:
            t = -3
        if i == 1:
            t = ""
        if i == 2:
            e = 2
        if i == 3:
            e = "yes"
        lines.append(f"{r['slide_id']},{r['case_id']},{t},{e}")
    csv = _write(tmp_path, "\n".join(lines) + "\n")
    msg = _error(csv, surv.features_dir, task="survival")
    assert "negative survival_months" in msg
    assert f"row 2: slide_id='{rows[0]['slide_id']}', survival_months='-3'" in msg
    assert f"row 3: slide_id='{rows[1]['slide_id']}', survival_months=''" in msg
    assert "event must be 0 (censored) or 1 (observed)" in msg
    assert f"row 4: slide_id='{rows[2]['slide_id']}', event='2'" in msg
    assert f"row 5: slide_id='{rows[3]['slide_id']}', event='yes'" in msg
    assert "row 6" not in msg


def test_missing_and_broken_features_files_named_with_slide_id(sub, tmp_path):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(sub.features_dir, feats)
    rows = sub.table
    (feats / f"{rows[1]['slide_id']}.h5").unlink()
    (feats / f"{rows[2]['slide_id']}.h5").write_bytes(b"not hdf5")
    msg = _error(sub.csv_path, feats, task="subtype")
    assert f"row 3: slide_id='{rows[1]['slide_id']}': no features file" in msg
    assert f"row 4: slide_id='{rows[2]['slide_id']}'" in msg and "not a readable HDF5 file" in msg
    # The model needs patch features but the files have none.
    msg = _error(sub.csv_path, sub.features_dir, task="subtype", input_key="patch_features")
    assert "has no patch_features" in msg


def test_mismatched_feature_size_is_reported(sub, tmp_path):
    import shutil

    from hipt.h5schema import FeaturesWriter
    from hipt.synthetic_cohort import _attrs

    feats = tmp_path / "features"
    shutil.copytree(sub.features_dir, feats)
    sid = sub.table[0]["slide_id"]
    with FeaturesWriter(
        feats / f"{sid}.h5",
        np.zeros((2, 2), np.int64),
        _attrs(sid),
        patch_features=False,
        region_dim=64,
    ) as w:
        w.write(0, None, np.zeros((2, 64)))
    msg = _error(sub.csv_path, feats, task="subtype")
    assert f"row 2: slide_id='{sid}': region_features dim 64 (most files: 192)" in msg


def test_label_map_must_number_classes_from_zero(sub):
    msg = _error(sub.csv_path, sub.features_dir, task="subtype", label_map={"A": 0, "B": 2})
    assert "label_map must give the classes 0..1 once each" in msg


def test_inconsistent_labels_within_a_case(sub, tmp_path):
    r = sub.table
    csv = _write(
        tmp_path, f"slide_id,case_id,label\n{r[0]['slide_id']},X,A\n{r[1]['slide_id']},X,B\n"
    )
    msg = _error(csv, sub.features_dir, task="subtype")
    assert "slides of one case with different labels" in msg


def test_site_column_overrides_tcga_site(sub, tmp_path):
    r = sub.table
    csv = _write(
        tmp_path,
        f"slide_id,case_id,label,site\n{r[0]['slide_id']},{r[0]['case_id']},{r[0]['label']},hospital9\n",
    )
    cohort = load_cohort(csv, sub.features_dir, task="subtype")
    assert cohort.cases[0].site == "hospital9"


def test_case_strata(surv):
    cohort = load_cohort(surv.csv_path, surv.features_dir, task="survival")
    strata = case_strata(cohort, time_bins=2)
    assert len(strata) == 6
    assert all(s.startswith(("e0_", "e1_")) for s in strata)
    assert {s[:2] for s in strata} == {f"e{c.event}" for c in cohort.cases}


def test_slides_of_a_case_compared_by_value_not_spelling(tmp_path):
    """Two slides of one case with 12 / 12.0 months and event 1 / 1.0 agree; 12 / 13 do not."""
    syn = make_survival_cohort(
        tmp_path / "c", n_cases=3, regions=(3, 4), n_informative=1, slides_per_case=1, seed=0
    )
    rows = syn.table
    extra = f"{rows[0]['slide_id']}-b"
    # A second slide of case 0, reusing another features file under a new slide id.
    with h5py.File(syn.features_dir / f"{rows[1]['slide_id']}.h5", "r") as f:
        region = f["region_features"][()]
    from hipt.h5schema import FeaturesWriter
    from hipt.synthetic_cohort import _attrs

    coords = np.zeros((len(region), 2), np.int64)
    coords[:, 0] = np.arange(len(region)) * 8192
    with FeaturesWriter(
        syn.features_dir / f"{extra}.h5",
        coords,
        _attrs(extra),
        patch_features=False,
        region_dim=region.shape[1],
    ) as w:
        w.write(0, None, region)

    def csv(t0, e0, t1, e1):
        lines = ["slide_id,case_id,survival_months,event"]
        lines.append(f"{rows[0]['slide_id']},{rows[0]['case_id']},{t0},{e0}")
        lines.append(f"{extra},{rows[0]['case_id']},{t1},{e1}")
        lines += [
            f"{r['slide_id']},{r['case_id']},{r['survival_months']},{r['event']}" for r in rows[1:]
        ]
        return _write(tmp_path, "\n".join(lines) + "\n")

    cohort = load_cohort(csv("12", "1", "12.0", "1.0"), syn.features_dir, task="survival")
    case = cohort.case(rows[0]["case_id"])
    assert case.slide_ids == [rows[0]["slide_id"], extra]
    assert case.time == 12.0 and case.event == 1
    msg = _error(csv("12", "1", "13", "1"), syn.features_dir, task="survival")
    assert "slides of one case with different survival_months/event" in msg
    assert f"row 3: slide_id='{extra}'" in msg
    msg = _error(csv("12", "1", "12", "0"), syn.features_dir, task="survival")
    assert "slides of one case with different survival_months/event" in msg


def _copy_features(sub, tmp_path):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(sub.features_dir, feats)
    return feats


def test_a_cohort_csv_that_is_not_utf8_is_one_line_naming_file_and_line(sub, tmp_path):
    r = sub.table
    text = "slide_id,case_id,label\n" + "".join(
        f"{x['slide_id']},{x['case_id']},{x['label']}\n" for x in r
    )
    csv = tmp_path / "latin1.csv"
    csv.write_bytes((text + f"{r[0]['slide_id']}-x,Ramón,A\n").encode("latin-1"))
    msg = _error(csv, sub.features_dir, task="subtype")
    assert msg == (
        f"{csv}: not UTF-8 text (byte 0xf3 on line {len(r) + 2}); save the table as UTF-8"
    )


def test_nan_in_one_slide_fails_its_case_not_the_cohort(sub, tmp_path):
    feats = _copy_features(sub, tmp_path)
    sid = sub.table[2]["slide_id"]
    case_id = sub.table[2]["case_id"]
    with h5py.File(feats / f"{sid}.h5", "r+") as f:
        f["region_features"][1, 5] = np.nan
    cohort = load_cohort(sub.csv_path, feats, task="subtype")
    assert case_id not in cohort.case_ids and len(cohort.cases) == 5
    assert cohort.excluded == [
        {
            "case_id": case_id,
            "slide_id": sid,
            "reason": f"{feats / (sid + '.h5')}: region_features holds 1 NaN or infinite value(s)",
        }
    ]
    # The bag reader refuses a file that went bad after the check.
    other = cohort.cases[0]
    with h5py.File(feats / f"{other.slide_ids[0]}.h5", "r+") as f:
        f["region_features"][0, 0] = np.inf
    with pytest.raises(CohortError, match="holds NaN or inf"):
        BagStore(cohort, "region_features").bag(other.case_id)


def test_region_features_as_a_group_names_the_file(sub, tmp_path):
    feats = _copy_features(sub, tmp_path)
    sid = sub.table[0]["slide_id"]
    with h5py.File(feats / f"{sid}.h5", "r+") as f:
        del f["region_features"]
        if "features" in f:
            del f["features"]
        f.create_group("region_features")
    msg = _error(sub.csv_path, feats, task="subtype")
    path = feats / f"{sid}.h5"
    assert (
        f"row 2: slide_id='{sid}': {path}: region_features is an HDF5 group, not a dataset" in msg
    )


@pytest.mark.parametrize("bad", ["../outside", ".hidden", "a/b"])
def test_ids_that_would_escape_the_features_folder_are_refused(sub, tmp_path, bad):
    r = sub.table
    csv = _write(
        tmp_path,
        f"slide_id,case_id,label\n{bad},{r[0]['case_id']},A\n{r[1]['slide_id']},{bad},B\n",
    )
    msg = _error(csv, sub.features_dir, task="subtype")
    assert "unsafe as a file name" in msg
    assert f"row 2: slide_id={bad!r}" in msg and f"case_id={bad!r}" in msg
    assert "no features file" not in msg  # no path was made from the bad id
