"""Case-level k-fold splits with train/val/test per fold, stratified, optionally site-preserving.

Splitting is by **case** (patient), never by slide, so no patient's slides are on both sides. A
split table has one row per (case, fold): ``case_id, fold, role`` with role ``train``, ``val`` or
``test``. Every case of a generated split is in the test set of exactly one fold; a user's split
file may test a case in several folds (Monte-Carlo splits), which :func:`repeated_test_cases`
finds.

Site-preserving folds keep every tissue-source site whole (scikit-learn's
``StratifiedGroupKFold``, sites as groups) and still balance the strata. When sites go with
labels, as TCGA's do, that can be impossible; :func:`make_splits` then refuses before any
training, naming the classes and the sites that hold them.

Examples
--------
>>> cases = [f"c{i}" for i in range(20)]
>>> strata = ["a" if i % 2 else "b" for i in range(20)]
>>> s = make_splits(cases, strata, folds=5, val_fraction=0.2, seed=0)
>>> sorted(s["role"].unique())
['test', 'train', 'val']
>>> int((s["role"] == "test").sum())
20
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from hipt.atomic import atomic_path
from train.rows import format_rows

ROLES = ("train", "val", "test")


class SplitError(ValueError):
    """A split table is inconsistent (a case in two roles of a fold, unknown roles or cases...)."""


def tcga_site(case_id: str) -> str:
    """TCGA tissue-source site: the two characters after ``TCGA-`` (``TCGA-05-4244`` → ``05``).

    Case ids that are not TCGA-style are their own site.
    """
    s = str(case_id)
    return s[5:7] if s.upper().startswith("TCGA-") and len(s) >= 7 else s


def _systematic(n: int, fraction: float) -> np.ndarray:
    """Boolean mask picking ``≈ fraction · n`` evenly spaced items (stratified when items are grouped)."""
    # Centred: the picks fall mid-run, so ≈ round(fraction · n) items and every large enough
    # stratum contributes.
    i = np.arange(n)
    pick = np.floor((i + 1) * fraction + 0.5) > np.floor(i * fraction + 0.5)
    if n and not pick.any():
        pick[n // 2] = True
    return pick


def _ordered_by_stratum(
    idx: np.ndarray, strata: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Indices grouped stratum by stratum (sorted stratum names), shuffled inside each stratum."""
    out = []
    for s in sorted(set(strata[idx].tolist())):
        members = idx[strata[idx] == s]
        out.append(rng.permutation(members))
    return np.concatenate(out) if out else idx


def make_splits(
    case_ids: Sequence[str],
    strata: Sequence[str],
    *,
    folds: int,
    val_fraction: float = 0.15,
    seed: int = 1,
    sites: Sequence[str] | None = None,
    cover: Sequence[str] | None = None,
    cover_values: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Make k-fold train/val/test splits of cases.

    Parameters
    ----------
    case_ids : sequence of str
        Unique case ids.
    strata : sequence of str
        Stratum of each case (label for subtyping; event × time bin for survival). Test folds are
        filled round-robin inside each stratum, so each fold has the cohort's mix.
    folds : int
        Number of folds K; fold k's test set is the k-th part.
    val_fraction : float
        Fraction of each fold's non-test cases used for validation (stratified).
    seed : int
        Seed of the shuffles.
    sites : sequence of str, optional
        Tissue-source site of each case. When given, whole sites go to test folds
        (``StratifiedGroupKFold`` on ``strata`` with sites as groups), so no site is in both train
        and test of a fold (val is drawn from the training sites).
    cover : sequence of str, optional
        With ``sites``: a value per case (the class name; ``event`` / ``censored``) that every
        test fold must hold; folds that cannot are refused with the classes and sites named.
    cover_values : sequence of str, optional
        The values of ``cover`` each test fold needs (default: all of them).

    Returns
    -------
    pandas.DataFrame
        Columns ``case_id, fold, role``, sorted by fold then case.

    Raises
    ------
    SplitError
        Duplicate cases, too few cases or sites, or site-preserving folds that cannot give every
        test fold each ``cover_values`` value.
    """
    case_ids = np.asarray([str(c) for c in case_ids])
    strata = np.asarray([str(s) for s in strata])
    n = len(case_ids)
    if len(set(case_ids.tolist())) != n:
        dup = [c for c, k in Counter(case_ids.tolist()).items() if k > 1]
        raise SplitError(f"duplicate case ids: {dup[:10]}")
    if len(strata) != n:
        raise SplitError("case_ids and strata differ in length")
    if n < folds:
        raise SplitError(f"{n} cases cannot fill {folds} folds")
    rng = np.random.default_rng(seed)
    if sites is None:
        test_fold = np.full(n, -1, dtype=np.int64)
        order = _ordered_by_stratum(np.arange(n), strata, rng)
        test_fold[order] = np.arange(n) % folds
    else:
        sites = np.asarray([str(s) for s in sites])
        cover = None if cover is None else np.asarray([str(v) for v in cover])
        test_fold = _site_test_folds(strata, sites, folds, seed, cover, cover_values)
    rows = []
    for k in range(folds):
        role = np.where(test_fold == k, "test", "train").astype(object)
        rest = _ordered_by_stratum(np.flatnonzero(test_fold != k), strata, rng)
        role[rest[_systematic(len(rest), val_fraction)]] = "val"
        rows.extend(
            {"case_id": c, "fold": k, "role": r} for c, r in zip(case_ids, role, strict=True)
        )
    df = pd.DataFrame(rows).sort_values(["fold", "case_id"], kind="stable").reset_index(drop=True)
    check_splits(
        df,
        case_ids=case_ids.tolist(),
        sites=None if sites is None else dict(zip(case_ids, sites, strict=True)),
    )
    return df


def _sites_of(sites: np.ndarray, mask: np.ndarray) -> str:
    return ", ".join(sorted(set(sites[mask].tolist())))


def _site_test_folds(
    strata: np.ndarray,
    sites: np.ndarray,
    folds: int,
    seed: int,
    cover: np.ndarray | None,
    cover_values: Sequence[str] | None,
) -> np.ndarray:
    """Test fold of each case: whole sites per fold, strata balanced by ``StratifiedGroupKFold``.

    Refuses (before any training) when a value of ``cover`` lives in fewer sites than there are
    folds, or when the folds found leave a test fold without one; the message names the values,
    the folds and the sites.
    """
    uniq = sorted(set(sites.tolist()))
    if len(uniq) < folds:
        raise SplitError(
            f"site-preserving splits need at least {folds} sites, found {len(uniq)}: {uniq}"
        )
    needed: list[str] = []
    if cover is not None:
        needed = sorted(set(cover.tolist()) if cover_values is None else set(cover_values))
    problems = []
    for value in needed:
        held = cover == value
        n_sites = len(set(sites[held].tolist()))
        if n_sites < folds:
            problems.append(
                f"  {value}: {int(held.sum())} case(s) at {n_sites} site(s) ({_sites_of(sites, held)}), "
                f"fewer sites than the {folds} folds"
            )
    if problems:
        raise SplitError(
            "site-preserving splits cannot give every test fold each class, because these "
            "classes come from too few sites:\n" + "\n".join(problems) + "\n  use fewer "
            "folds (splits.folds), or splits.site_preserving: false"
        )
    # StratifiedGroupKFold warns when a stratum has fewer members than folds; the cover check
    # above and the fold-balance table say what matters instead.
    kfold = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    test_fold = np.full(len(strata), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(kfold.split(np.zeros(len(strata)), strata, sites)):
            test_fold[test] = k
    for value in needed:
        for k in range(folds):
            if not ((test_fold == k) & (cover == value)).any():
                problems.append(
                    f"  fold {k}: its test sites ({_sites_of(sites, test_fold == k)}) hold no "
                    f"{value} case ({value} is at sites {_sites_of(sites, cover == value)})"
                )
    if problems:
        raise SplitError(
            "site-preserving splits found no folds where every test fold holds each class:\n"
            + "\n".join(problems)
            + "\n  use fewer folds (splits.folds), another seed, or splits.site_preserving: false"
        )
    return test_fold


def fold_balance(df: pd.DataFrame, value_of: dict[str, str]) -> pd.DataFrame:
    """How far each fold's test mix is from the cohort's: counts and largest share difference.

    Parameters
    ----------
    df : DataFrame
        A split table.
    value_of : dict
        case id → class (subtyping label; ``event`` / ``censored`` for survival).

    Returns
    -------
    pandas.DataFrame
        One row per fold: ``fold, n_test, n_<value>...`` and ``max_share_diff``, the largest
        absolute difference between a value's share of the test set and of the cohort.

    Examples
    --------
    >>> s = pd.DataFrame({"case_id": list("abcd"), "fold": [0, 0, 1, 1], "role": ["test"] * 4})
    >>> fold_balance(s, dict(a="X", b="Y", c="X", d="X"))["max_share_diff"].tolist()
    [0.25, 0.25]
    """
    values = sorted(set(value_of.values()))
    cohort = pd.Series(list(value_of.values())).value_counts(normalize=True)
    rows = []
    for k, part in df[df["role"] == "test"].groupby("fold"):
        got = part["case_id"].astype(str).map(value_of).value_counts()
        n = int(got.sum())
        row: dict[str, float | int] = {"fold": int(k), "n_test": n}
        row.update({f"n_{v}": int(got.get(v, 0)) for v in values})
        diffs = [abs(got.get(v, 0) / max(n, 1) - cohort.get(v, 0.0)) for v in values]
        row["max_share_diff"] = round(float(max(diffs)), 4) if diffs else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def repeated_test_cases(df: pd.DataFrame) -> list[str]:
    """Case ids tested in more than one fold (Monte-Carlo splits); pooling needs none."""
    tested = df.loc[df["role"] == "test", "case_id"].astype(str)
    counts = tested.value_counts()
    return sorted(counts[counts > 1].index)


def check_splits(
    df: pd.DataFrame,
    *,
    case_ids: Sequence[str] | None = None,
    sites: dict[str, str] | None = None,
    source: str = "splits",
) -> None:
    """Refuse an inconsistent split table; the error lists the offending rows.

    Checks: the columns, known roles, no case in two roles (or twice) in a fold, every fold has
    train, val and test cases, cases known to the cohort (when ``case_ids`` is given), and no site in
    both train and test (when ``sites`` is given).
    """
    missing = [c for c in ("case_id", "fold", "role") if c not in df.columns]
    if missing:
        raise SplitError(f"{source}: missing column(s) {missing}; need case_id, fold, role")
    bad_role = df[~df["role"].isin(ROLES)]
    if len(bad_role):
        raise SplitError(f"{source}: unknown role(s) (expected train/val/test):\n{_rows(bad_role)}")
    dup = df[df.duplicated(["fold", "case_id"], keep=False)]
    if len(dup):
        raise SplitError(
            f"{source}: case(s) in more than one role (or listed twice) in a fold:\n{_rows(dup)}"
        )
    for k, part in df.groupby("fold"):
        roles = set(part["role"])
        if "train" not in roles or "test" not in roles:
            raise SplitError(
                f"{source}: fold {k} has no {'train' if 'train' not in roles else 'test'} cases"
            )
    if case_ids is not None:
        unknown = df[~df["case_id"].astype(str).isin(set(map(str, case_ids)))]
        if len(unknown):
            raise SplitError(f"{source}: case(s) not in the cohort:\n{_rows(unknown)}")
    if sites is not None:
        for k, part in df.groupby("fold"):
            train_sites = {sites[c] for c in part.loc[part["role"] != "test", "case_id"]}
            leak = part[(part["role"] == "test") & part["case_id"].map(sites).isin(train_sites)]
            if len(leak):
                raise SplitError(
                    f"{source}: fold {k}: test site(s) also in train/val:\n{_rows(leak)}"
                )
    for k, part in df.groupby("fold"):
        if not (part["role"] == "val").any():
            raise SplitError(
                f"{source}: fold {k} has no val cases; the model of each fold is selected on them"
            )


def _rows(df: pd.DataFrame) -> str:
    return format_rows(df, quote=False, indent="  ")


def write_splits(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a split table as CSV (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df[["case_id", "fold", "role"]].to_csv(tmp, index=False)
    return path


def read_splits(path: str | os.PathLike, *, case_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and check a split CSV (``case_id, fold, role``); a case in two roles of a fold is refused."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"case_id": str, "role": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SplitError(f"{path}: cannot read split file ({exc})") from exc
    if "fold" in df.columns:
        try:
            df["fold"] = df["fold"].astype(int)
        except (ValueError, TypeError) as exc:
            raise SplitError(f"{path}: fold must be an integer ({exc})") from exc
    check_splits(df, case_ids=case_ids, source=str(path))
    return df


def fold_cases(df: pd.DataFrame, fold: int) -> dict[str, list[str]]:
    """``{role: [case ids]}`` of one fold."""
    part = df[df["fold"] == fold]
    if part.empty:
        raise SplitError(
            f"fold {fold} is not in the split table (folds: {sorted(df['fold'].unique())})"
        )
    return {r: sorted(part.loc[part["role"] == r, "case_id"].astype(str)) for r in ROLES}
