"""Cohort tables and bags: validate the cohort CSV and features files, then serve one bag per case.

A case's bag is the concatenation of the region (or patch) features of all its slides, so
predictions are per case. Features files are opened only when a bag is read; an optional in-memory
cache keeps bags after the first read (small cohorts, many epochs).

Examples
--------
>>> import tempfile
>>> from hipt.synthetic_cohort import make_subtyping_cohort
>>> c = make_subtyping_cohort(tempfile.mkdtemp(), n_cases=4, regions=(3, 5), seed=0)
>>> cohort = load_cohort(c.csv_path, c.features_dir, task="subtype")
>>> store = BagStore(cohort, "region_features")
>>> store.bag(cohort.cases[0].case_id).shape[1]
192
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from hipt.h5schema import SchemaError, read_features_info
from hipt.names import is_safe_name
from train.rows import format_rows
from train.splits import tcga_site

REQUIRED = {
    "subtype": ("slide_id", "case_id", "label"),
    "survival": ("slide_id", "case_id", "survival_months", "event"),
}


class CohortError(ValueError):
    """The cohort CSV or its features files are not usable; the message lists every offending row."""


@dataclass
class Case:
    """One patient: its slides and its target."""

    case_id: str
    slide_ids: list[str]
    site: str
    label: int | None = None
    label_name: str | None = None
    time: float | None = None
    event: int | None = None


@dataclass
class Cohort:
    """A validated cohort: cases in CSV order, the features folder and the label map.

    ``excluded`` lists the cases left out, one entry per offending slide (``case_id``,
    ``slide_id``, ``reason``): a slide whose features hold NaN or inf fails its case, not the run.
    """

    task: str
    cases: list[Case]
    features_dir: Path
    label_map: dict[str, int] = field(default_factory=dict)
    feature_dim: int | None = None
    excluded: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {c.case_id: c for c in self.cases}

    def case(self, case_id: str) -> Case:
        return self._by_id[case_id]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]

    def features_path(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.h5"


def load_cohort(
    csv_path: str | os.PathLike,
    features_dir: str | os.PathLike,
    *,
    task: str,
    label_map: dict[str, int] | None = None,
    input_key: str = "region_features",
    check_features: bool = True,
) -> Cohort:
    """Read and validate a cohort CSV and its features files.

    Parameters
    ----------
    csv_path : path
        Subtyping ``slide_id, case_id, label [, site]`` or survival
        ``slide_id, case_id, survival_months, event [, site]``, UTF-8.
    features_dir : path
        Folder holding ``<slide_id>.h5`` for every slide.
    task : {"subtype", "survival"}
    label_map : dict, optional
        label → class index; labels outside it are errors. Default: sorted labels → 0..K-1.
    input_key : {"region_features", "patch_features"}
        Dataset the model reads; files lacking it are errors.
    check_features : bool
        Open every features file before training: schema, shapes, and NaN/inf in the
        ``input_key`` dataset. A case with a slide holding NaN or inf is left out of the cohort
        and listed in :attr:`Cohort.excluded`; every other problem is an error.

    Raises
    ------
    CohortError
        Listing every problem found, each with the offending CSV rows and values.
    """
    csv_path, features_dir = Path(csv_path), Path(features_dir)
    df = _read_table(csv_path, task)
    problems: list[str] = []

    def report(mask: pd.Series, what: str, cols: Sequence[str]) -> None:
        if mask.any():
            problems.append(f"  {what}:\n{format_rows(df[mask], cols)}")

    _check_ids(df, report)
    if task == "subtype":
        label_map = _check_labels(df, csv_path, label_map, report)
    else:
        label_map = {}
        _check_follow_up(df, report)
    feature_dim, nonfinite = None, {}
    if check_features:
        feature_dim, nonfinite, feature_problems = _check_features(df, features_dir, input_key)
        problems += feature_problems
    if problems:
        raise CohortError(f"{csv_path}: {len(problems)} problem(s):\n" + "\n".join(problems))
    cases = _build_cases(df, task, label_map)
    excluded = [
        {"case_id": df.at[i, "case_id"], "slide_id": df.at[i, "slide_id"], "reason": why}
        for i, why in nonfinite.items()
    ]
    for entry in excluded:
        cases.pop(entry["case_id"], None)
    return Cohort(task, list(cases.values()), features_dir, label_map, feature_dim, excluded)


def _read_table(csv_path: Path, task: str) -> pd.DataFrame:
    """The cohort CSV as stripped strings, with its required columns; one line per refusal."""
    try:
        raw = csv_path.read_bytes()
    except OSError as exc:
        raise CohortError(f"{csv_path}: cannot read cohort CSV ({exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CohortError(
            f"{csv_path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "save the table as UTF-8"
        ) from exc
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{csv_path}: cannot read cohort CSV ({exc})") from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED[task] if c not in df.columns]
    if missing:
        raise CohortError(
            f"{csv_path}: missing column(s) {missing}; a {task} cohort needs {list(REQUIRED[task])}"
        )
    for c in df.columns:
        df[c] = df[c].str.strip()
    return df


def _check_ids(df: pd.DataFrame, report: Callable[[pd.Series, str, Sequence[str]], None]) -> None:
    """Slide and case ids: present, slide ids unique, both safe as file names."""
    report(
        (df["slide_id"] == "") | (df["case_id"] == ""),
        "empty slide_id or case_id",
        ["slide_id", "case_id"],
    )
    report(df["slide_id"].duplicated(keep=False), "duplicate slide_id", ["slide_id", "case_id"])
    unsafe = ~(df["slide_id"].map(is_safe_name) & df["case_id"].map(is_safe_name))
    report(
        unsafe & (df["slide_id"] != "") & (df["case_id"] != ""),
        "slide_id or case_id unsafe as a file name (no '/', '\\', '..', leading dot or "
        "surrounding blanks)",
        ["slide_id", "case_id"],
    )


def _check_labels(
    df: pd.DataFrame,
    csv_path: Path,
    label_map: dict[str, int] | None,
    report: Callable[[pd.Series, str, Sequence[str]], None],
) -> dict[str, int]:
    """Subtyping labels: known to the label map (derived when not given), one per case."""
    if label_map is None:
        names = sorted(set(df["label"]) - {""})
        label_map = {n: i for i, n in enumerate(names)}
    label_map = {str(k): int(v) for k, v in label_map.items()}
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise CohortError(
            f"{csv_path}: label_map must give the classes 0..{len(label_map) - 1} once each, got {label_map}"
        )
    report(
        ~df["label"].isin(label_map),
        f"unknown label (label map: {sorted(label_map)})",
        ["slide_id", "label"],
    )
    by_case = df.groupby("case_id")["label"].nunique()
    report(
        df["case_id"].isin(by_case[by_case > 1].index),
        "slides of one case with different labels",
        ["slide_id", "case_id", "label"],
    )
    return label_map


def _check_follow_up(
    df: pd.DataFrame, report: Callable[[pd.Series, str, Sequence[str]], None]
) -> None:
    """Survival columns: a finite non-negative time, event 0/1, one follow-up per case."""
    t = pd.to_numeric(df["survival_months"], errors="coerce")
    report(
        t.isna() | (t < 0) | ~np.isfinite(t.fillna(0)),
        "missing, non-numeric or negative survival_months",
        ["slide_id", "survival_months"],
    )
    report(
        ~df["event"].isin(["0", "1", "0.0", "1.0"]),
        "event must be 0 (censored) or 1 (observed)",
        ["slide_id", "event"],
    )
    # Compared as numbers: "12" and "12.0", or "1" and "1.0", are the same follow-up.
    values = pd.DataFrame({"t": t, "e": pd.to_numeric(df["event"], errors="coerce")})
    per_case = values.groupby(df["case_id"]).nunique(dropna=False)
    by_case = per_case.max(axis=1)
    report(
        df["case_id"].isin(by_case[by_case > 1].index),
        "slides of one case with different survival_months/event",
        ["slide_id", "case_id", "survival_months", "event"],
    )


def _check_features(
    df: pd.DataFrame, features_dir: Path, input_key: str
) -> tuple[int | None, dict[int, str], list[str]]:
    """Open every slide's features file: (feature size, rows with NaN/inf → reason, problems)."""
    bad: dict[int, str] = {}
    nonfinite: dict[int, str] = {}
    dims: dict[int, int] = {}
    for i, r in df.iterrows():
        if r["slide_id"] == "" or not is_safe_name(r["slide_id"]):
            continue  # reported with the ids
        path = features_dir / f"{r['slide_id']}.h5"
        try:
            dims[i], nonfinite_why = _check_features_file(path, r["slide_id"], input_key)
        except _FeaturesProblem as exc:
            bad[i] = str(exc)
            continue
        if nonfinite_why:
            nonfinite[i] = nonfinite_why
    problems = []
    if bad:
        rows = df.loc[list(bad)]
        problems.append(
            "  slide(s) with a missing or unreadable features file:\n"
            + format_rows(rows, ["slide_id"], notes=list(bad.values()))
        )
    if len(set(dims.values())) > 1:
        common = max(set(dims.values()), key=list(dims.values()).count)
        odd = [i for i, d in dims.items() if d != common]
        notes = [f"{input_key} dim {dims[i]} (most files: {common})" for i in odd]
        problems.append(
            "  features files with a mismatched feature size:\n"
            + format_rows(df.loc[odd], ["slide_id"], notes=notes)
        )
    return next(iter(dims.values()), None), nonfinite, problems


class _FeaturesProblem(Exception):
    """A features file that cannot be used (its message names the file and the problem)."""


def _check_features_file(path: Path, slide_id: str, input_key: str) -> tuple[int, str]:
    """(size of ``input_key``'s last axis, a NaN/inf description or ""); raises _FeaturesProblem."""
    if not path.is_file():
        raise _FeaturesProblem(f"no features file {path}")
    try:
        with h5py.File(path, "r") as f:
            for key in {"region_features", input_key}:
                if key in f and not isinstance(f[key], h5py.Dataset):
                    raise _FeaturesProblem(f"{path}: {key} is an HDF5 group, not a dataset")
    except OSError as exc:
        raise _FeaturesProblem(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        info = read_features_info(path)
    except SchemaError as exc:
        raise _FeaturesProblem(str(exc)) from exc
    if info.slide_id != slide_id:
        raise _FeaturesProblem(f"{path}: its slide_id attr is {info.slide_id!r}")
    if info.n_regions == 0:
        raise _FeaturesProblem(f"{path}: has no regions")
    if input_key == "patch_features" and not info.has_patch_features:
        raise _FeaturesProblem(f"{path}: has no patch_features (the model needs them)")
    try:
        with h5py.File(path, "r") as f:
            dset = f[input_key]
            n_bad = _count_nonfinite(dset)
            dim = int(dset.shape[-1])
    except OSError as exc:  # e.g. a checksum (fletcher32) failure in the data
        raise _FeaturesProblem(f"{path}: cannot read {input_key} ({exc})") from exc
    why = f"{path}: {input_key} holds {n_bad} NaN or infinite value(s)" if n_bad else ""
    return dim, why


def _count_nonfinite(dset: h5py.Dataset, max_bytes: int = 64 << 20) -> int:
    """Non-finite values in a dataset, read a block of regions at a time (bounded memory)."""
    per_row = max(int(np.prod(dset.shape[1:])) * dset.dtype.itemsize, 1)
    step = max(1, max_bytes // per_row)
    return sum(int((~np.isfinite(dset[i : i + step])).sum()) for i in range(0, dset.shape[0], step))


def _build_cases(df: pd.DataFrame, task: str, label_map: dict[str, int]) -> dict[str, Case]:
    """Cases in CSV order, each with its slides; the site from the ``site`` column or the TCGA id."""
    cases: dict[str, Case] = {}
    has_site = "site" in df.columns
    for _, r in df.iterrows():
        cid = r["case_id"]
        if cid not in cases:
            site = r["site"] if has_site and r["site"] else tcga_site(cid)
            if task == "subtype":
                cases[cid] = Case(cid, [], site, label=label_map[r["label"]], label_name=r["label"])
            else:
                cases[cid] = Case(
                    cid, [], site, time=float(r["survival_months"]), event=int(float(r["event"]))
                )
        cases[cid].slide_ids.append(r["slide_id"])
    return cases


class BagStore:
    """One bag per case, read lazily from the features files; optionally cached in memory.

    Parameters
    ----------
    cohort : Cohort
    key : {"region_features", "patch_features"}
        Dataset to read; a case's slides are concatenated along the region axis.
    cache : bool
        Keep each bag after its first read, in the file's dtype (patch features stay float16,
        half the memory); :meth:`bag` returns float32.
    """

    def __init__(self, cohort: Cohort, key: str = "region_features", *, cache: bool = True) -> None:
        self.cohort, self.key, self.cache = cohort, key, cache
        self._cache: dict[str, torch.Tensor] = {}

    def _read(self, case_id: str) -> torch.Tensor:
        parts = []
        for slide_id in self.cohort.case(case_id).slide_ids:
            path = self.cohort.features_path(slide_id)
            try:
                with h5py.File(path, "r") as f:
                    parts.append(np.asarray(f[self.key][()]))
            except (OSError, KeyError) as exc:
                raise CohortError(
                    f"{path}: cannot read {self.key} of slide {slide_id!r} ({exc})"
                ) from exc
            if not np.isfinite(parts[-1]).all():  # a file changed since load_cohort checked it
                raise CohortError(f"{path}: {self.key} of slide {slide_id!r} holds NaN or inf")
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def bag(self, case_id: str) -> torch.Tensor:
        """The case's bag, [M, D] (region features) or [M, 256, 384] (patch features)."""
        if self.cache:
            if case_id not in self._cache:
                self._cache[case_id] = self._read(case_id)
            return self._cache[case_id].float()  # no copy when already float32
        return self._read(case_id).float()


def survival_strata(times: Sequence[float], events: Sequence[int], n_bins: int = 4) -> list[str]:
    """Stratum of each case for splitting: ``e<event>_t<time quantile bin>``."""
    t = np.asarray(times, dtype=float)
    if n_bins <= 1 or len(t) < n_bins:
        bins = np.zeros(len(t), dtype=int)
    else:
        q = np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])
        bins = np.searchsorted(q, t, side="right")
    return [f"e{int(e)}_t{int(b)}" for e, b in zip(events, bins, strict=True)]


def case_strata(cohort: Cohort, time_bins: int = 4) -> list[str]:
    """Stratification key of each case, in cohort order: label (subtyping), event × time bin (survival)."""
    if cohort.task == "subtype":
        return [str(c.label) for c in cohort.cases]
    return survival_strata(
        [c.time for c in cohort.cases], [c.event for c in cohort.cases], time_bins
    )
