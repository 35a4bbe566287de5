"""Generated cohorts with a known signal: features files plus a cohort CSV, for tests and the demo.

Each slide is a bag of M region embeddings drawn from a standard normal. A few **informative**
regions per case also carry a fixed marker direction plus the signal:

- subtyping: the prototype direction of the case's class, so the label is a function of those
  few regions only;
- survival: ``z · d`` for a per-case standard-normal ``z``; the true log-hazard is
  ``log_hazard_scale · z`` and event times are exponential with that hazard. Censoring is
  independent of the event time, as the NLL, Kaplan–Meier and the c-index assume: a random
  exponential censoring time per case, and administrative censoring at the end of follow-up.
  The truth (log-hazard, event and censoring times) is kept out of the cohort CSV, in
  ``truth.csv``, so a test can compare a model with the oracle c-index.

The files are written with :class:`hipt.h5schema.FeaturesWriter`, exactly as ``hipt embed`` writes
them, so training reads them like real features.

Examples
--------
>>> import tempfile
>>> c = make_subtyping_cohort(tempfile.mkdtemp(), n_cases=4, regions=(3, 5), seed=0)
>>> sorted(c.label_map)
['A', 'B']
>>> len(c.table)
4
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hipt.atomic import write_text_atomic
from hipt.h5schema import FeaturesWriter

SITES = ("A1", "B2", "C3", "D4", "E5", "F6", "G7", "H8")


@dataclass
class SyntheticCohort:
    """What a generator wrote.

    Attributes
    ----------
    csv_path : Path
        The cohort CSV (ARCHITECTURE.md columns).
    features_dir : Path
        Folder of ``<slide_id>.h5`` features files.
    table : list of dict
        The CSV rows.
    informative : dict
        slide id → indices of its informative regions (empty for a case's extra slides).
    label_map : dict
        label → class index (subtyping only).
    log_hazard : dict
        case id → true log-hazard (survival only; also in ``truth.csv``).
    truth_path : Path or None
        ``truth.csv`` (survival only): ``case_id, log_hazard, event_time, censor_time``.
    """

    csv_path: Path
    features_dir: Path
    table: list[dict]
    informative: dict[str, list[int]]
    label_map: dict[str, int] = field(default_factory=dict)
    log_hazard: dict[str, float] = field(default_factory=dict)
    truth_path: Path | None = None

    def oracle_c_index(self, case_ids: list[str] | None = None) -> float:
        """Harrell's c-index of the true log-hazard on the observed times of ``case_ids``
        (default: every case): the best a model of these data can expect."""
        from lifelines.utils import concordance_index

        rows = {r["case_id"]: r for r in self.table}
        ids = list(rows) if case_ids is None else list(case_ids)
        return float(
            concordance_index(
                [float(rows[c]["survival_months"]) for c in ids],
                [-self.log_hazard[c] for c in ids],
                [int(rows[c]["event"]) for c in ids],
            )
        )


def _attrs(slide_id: str) -> dict:
    return {
        "slide_id": slide_id,
        "target_mpp": 0.5,
        "vit256_sha256": "synthetic",
        "vit4k_sha256": "synthetic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "hipt_version": "synthetic",
    }


def _write_slide(
    path: Path,
    slide_id: str,
    region: np.ndarray,
    rng: np.random.Generator,
    patch_features: bool,
) -> None:
    m = len(region)
    coords = np.stack([np.arange(m) * 8192, np.zeros(m)], axis=1).astype(np.int64)
    patches = rng.standard_normal((m, 256, 384)).astype(np.float16) if patch_features else None
    with FeaturesWriter(
        path, coords, _attrs(slide_id), patch_features=patch_features, region_dim=region.shape[1]
    ) as w:
        w.write(0, patches, region)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _bags(
    rng: np.random.Generator,
    n_cases: int,
    regions: tuple[int, int],
    n_informative: int,
    dim: int,
    slides_per_case: int,
) -> list[list[np.ndarray]]:
    """Background bags: per case, 1..slides_per_case slides of M ~ U[regions] normal regions."""
    out = []
    for _ in range(n_cases):
        n_slides = int(rng.integers(1, slides_per_case + 1))
        slides = []
        for s in range(n_slides):
            lo = max(regions[0], n_informative + 1) if s == 0 else regions[0]
            m = int(rng.integers(lo, max(lo, regions[1]) + 1))
            slides.append(rng.standard_normal((m, dim)).astype(np.float32))
        out.append(slides)
    return out


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def make_subtyping_cohort(
    out_dir: str | os.PathLike,
    *,
    n_cases: int = 60,
    n_classes: int = 2,
    regions: tuple[int, int] = (20, 40),
    n_informative: int = 3,
    signal: float = 3.0,
    dim: int = 192,
    slides_per_case: int = 1,
    patch_features: bool = False,
    n_sites: int = 6,
    seed: int = 0,
) -> SyntheticCohort:
    """Write a subtyping cohort whose label is carried by ``n_informative`` regions of each case.

    Parameters
    ----------
    out_dir : path
        Receives ``cohort.csv`` and ``features/``.
    n_cases, n_classes : int
        Cohort size; labels are balanced (``"A"``, ``"B"``, ...).
    regions : (int, int)
        Range of regions per slide.
    n_informative : int
        Informative regions per case (in its first slide, at random positions).
    signal : float
        Length of the marker and of the class prototype added to informative regions.
    dim : int
        Region embedding size (192 like ViT-4K).
    slides_per_case : int
        Up to this many slides per case (extra slides are background only).
    patch_features : bool
        Also write random [M, 256, 384] patch features (for ``hipt_lgp``).
    n_sites : int
        Number of TCGA-style tissue-source sites, encoded in the case id.
    seed : int
        Seed of everything generated.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    feats = out_dir / "features"
    marker = _unit(rng, dim) * signal
    protos = [_unit(rng, dim) * signal for _ in range(n_classes)]
    names = [chr(ord("A") + k) for k in range(n_classes)]
    labels = np.arange(n_cases) % n_classes
    rng.shuffle(labels)
    rows, informative = [], {}
    for i, slides in enumerate(_bags(rng, n_cases, regions, n_informative, dim, slides_per_case)):
        site = SITES[i % min(n_sites, len(SITES))]
        case_id = f"TCGA-{site}-{i:04d}"
        idx = sorted(rng.choice(len(slides[0]), size=n_informative, replace=False).tolist())
        slides[0][idx] += marker + protos[labels[i]]
        for s, region in enumerate(slides):
            slide_id = f"{case_id}-{s:02d}"
            _write_slide(feats / f"{slide_id}.h5", slide_id, region, rng, patch_features)
            informative[slide_id] = idx if s == 0 else []
            rows.append({"slide_id": slide_id, "case_id": case_id, "label": names[labels[i]]})
    csv_path = out_dir / "cohort.csv"
    _write_csv(csv_path, rows, ["slide_id", "case_id", "label"])
    return SyntheticCohort(
        csv_path, feats, rows, informative, label_map={n: k for k, n in enumerate(names)}
    )


def draw_survival_times(
    rng: np.random.Generator,
    log_hazard: np.ndarray,
    *,
    baseline_hazard: float = 0.05,
    censor_fraction: float = 0.3,
    follow_up_months: float | None = 180.0,
) -> dict[str, np.ndarray]:
    """Event and independent censoring times for cases with the given true log-hazards.

    The event time is exponential with hazard ``baseline_hazard · exp(log_hazard)``. The random
    censoring time is exponential too, drawn independently of the event time, with the rate that
    censors ``censor_fraction`` of cases at the baseline hazard (``c / (1 - c) · baseline``);
    every case still under follow-up at ``follow_up_months`` is censored there (administrative).

    Returns
    -------
    dict
        ``time`` (observed), ``event`` (1 observed, 0 censored), ``event_time``, ``censor_time``.

    Examples
    --------
    >>> d = draw_survival_times(np.random.default_rng(0), np.zeros(1000))
    >>> bool(((d["time"] == np.minimum(d["event_time"], d["censor_time"])).all()))
    True
    """
    log_hazard = np.asarray(log_hazard, dtype=np.float64)
    if not 0 <= censor_fraction < 1:
        raise ValueError(f"censor_fraction must be in [0, 1), got {censor_fraction}")
    event_time = rng.exponential(1.0 / (baseline_hazard * np.exp(log_hazard)))
    if censor_fraction > 0:
        rate = censor_fraction / (1.0 - censor_fraction) * baseline_hazard
        censor_time = rng.exponential(1.0 / rate, size=len(log_hazard))
    else:
        censor_time = np.full(len(log_hazard), np.inf)
    if follow_up_months is not None:
        censor_time = np.minimum(censor_time, follow_up_months)
    return {
        "time": np.minimum(event_time, censor_time),
        "event": (event_time <= censor_time).astype(np.int64),
        "event_time": event_time,
        "censor_time": censor_time,
    }


def make_survival_cohort(
    out_dir: str | os.PathLike,
    *,
    n_cases: int = 120,
    regions: tuple[int, int] = (20, 40),
    n_informative: int = 3,
    signal: float = 3.0,
    log_hazard_scale: float = 2.0,
    baseline_hazard: float = 0.05,
    censor_fraction: float = 0.3,
    follow_up_months: float | None = 180.0,
    dim: int = 192,
    slides_per_case: int = 1,
    patch_features: bool = False,
    n_sites: int = 6,
    seed: int = 0,
) -> SyntheticCohort:
    """Write a survival cohort with known per-case hazards carried by a few regions.

    Times (months) come from :func:`draw_survival_times` with log-hazard ``log_hazard_scale · z``:
    exponential event times, independent random censoring (about ``censor_fraction`` of cases at
    the baseline hazard) and administrative censoring at ``follow_up_months``. The truth goes to
    ``truth.csv`` beside the cohort CSV, not into it. Other parameters are as in
    :func:`make_subtyping_cohort`.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    feats = out_dir / "features"
    marker = _unit(rng, dim) * signal
    direction = _unit(rng, dim)
    bags = _bags(rng, n_cases, regions, n_informative, dim, slides_per_case)
    z = rng.standard_normal(n_cases)
    drawn = draw_survival_times(
        rng,
        log_hazard_scale * z,
        baseline_hazard=baseline_hazard,
        censor_fraction=censor_fraction,
        follow_up_months=follow_up_months,
    )
    rows, informative, log_hazard, truth = [], {}, {}, []
    for i, slides in enumerate(bags):
        site = SITES[i % min(n_sites, len(SITES))]
        case_id = f"TCGA-{site}-{i:04d}"
        idx = sorted(rng.choice(len(slides[0]), size=n_informative, replace=False).tolist())
        slides[0][idx] += marker + direction * (signal * z[i])
        log_hazard[case_id] = float(log_hazard_scale * z[i])
        truth.append(
            {
                "case_id": case_id,
                "log_hazard": log_hazard[case_id],
                "event_time": float(drawn["event_time"][i]),
                "censor_time": float(drawn["censor_time"][i]),
            }
        )
        for s, region in enumerate(slides):
            slide_id = f"{case_id}-{s:02d}"
            _write_slide(feats / f"{slide_id}.h5", slide_id, region, rng, patch_features)
            informative[slide_id] = idx if s == 0 else []
            rows.append(
                {
                    "slide_id": slide_id,
                    "case_id": case_id,
                    "survival_months": round(float(drawn["time"][i]), 4),
                    "event": int(drawn["event"][i]),
                }
            )
    csv_path = out_dir / "cohort.csv"
    _write_csv(csv_path, rows, ["slide_id", "case_id", "survival_months", "event"])
    truth_path = out_dir / "truth.csv"
    _write_csv(truth_path, truth, ["case_id", "log_hazard", "event_time", "censor_time"])
    return SyntheticCohort(
        csv_path, feats, rows, informative, log_hazard=log_hazard, truth_path=truth_path
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m hipt.synthetic_cohort {subtype,survival} OUT [--cases N] [--seed S]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m hipt.synthetic_cohort", description=__doc__.split("\n")[0]
    )
    p.add_argument("task", choices=["subtype", "survival"])
    p.add_argument("out", help="folder for cohort.csv and features/")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default 60 / 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--patch-features", action="store_true", help="also write [M, 256, 384] patch features"
    )
    a = p.parse_args(argv)
    make = make_subtyping_cohort if a.task == "subtype" else make_survival_cohort
    kw = {"seed": a.seed, "patch_features": a.patch_features}
    if a.cases:
        kw["n_cases"] = a.cases
    c = make(a.out, **kw)
    print(
        f"{len(c.table)} slides of {len({r['case_id'] for r in c.table})} cases: {c.csv_path}, {c.features_dir}/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
