"""Seconds per training epoch of one fold: 500 bags of 40 regions ([M, 192] features) on CPU.

Compares, in the same run, the naive path (open and read each bag's HDF5 file at every step,
default Adam) against fused Adam (what ``hipt train`` uses) and bags cached in memory
(``train.cache: true``, the default), for ``hipt_gp`` and ``abmil``.
An epoch here is one pass over the fold's training cases plus the validation pass.

Usage::

    python benchmarks/bench_train.py [--cases 500] [--regions 40] [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from hipt.synthetic.cohorts import make_subtyping_cohort
from train.config import default_config, merge, validate
from train.data import BagStore, case_strata, load_cohort
from train.loops import FoldRunner, build_model, make_optimizer
from train.splits import fold_cases, make_splits


def time_epochs(
    cfg: dict, cohort, cases: dict, cache: bool, epochs: int, fused: bool = True
) -> float:
    """Median seconds of ``epochs`` (train + val) epochs with a fresh store and model."""
    store = BagStore(cohort, "region_features", cache=cache)
    runner = FoldRunner(cfg, cohort, store, cases, 0, Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    model = build_model(cfg, cohort)
    opt = make_optimizer(cfg, model) if fused else torch.optim.Adam(model.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    if cache:  # first read fills the cache; time the steady state a real run sees after epoch 1
        for c in cases["train"] + cases["val"]:
            store.bag(c)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        runner.train_epoch(model, opt, gen)
        runner.predict(model, cases["val"])
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--regions", type=int, default=40)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        syn = make_subtyping_cohort(tmp, n_cases=a.cases, regions=(a.regions, a.regions), seed=0)
        gen_s = time.perf_counter() - t0
        cohort = load_cohort(syn.csv_path, syn.features_dir, task="subtype")
        splits = make_splits(cohort.case_ids, case_strata(cohort), folds=10, seed=1)
        cases = fold_cases(splits, 0)
        print(
            f"# {a.cases} bags x {a.regions} regions x 192; fold 0: {len(cases['train'])} train / "
            f"{len(cases['val'])} val bags; torch threads {a.threads}; {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} thread(s); cohort written in {gen_s:.1f} s"
        )
        print(f"{'model':<8} {'bags / optimiser':<26} {'s/epoch':>8} {'bags/s':>8} {'speed-up':>9}")
        for name, kwargs in (("hipt_gp", {}), ("abmil", {})):
            cfg = validate(
                merge(
                    default_config(),
                    {
                        "cohort": "bench",
                        "csv": str(syn.csv_path),
                        "features_dir": str(syn.features_dir),
                        "model": {"name": name, "kwargs": kwargs},
                        "train": {"progress": False},
                    },
                )
            )
            n = len(cases["train"]) + len(cases["val"])
            naive = time_epochs(cfg, cohort, cases, cache=False, epochs=a.epochs, fused=False)
            print(
                f"{name:<8} {'h5 each step, Adam':<26} {naive:8.2f} {n / naive:8.1f} {'1.00x':>9}"
            )
            for label, cache in (("h5 each step, fused Adam", False), ("cached, fused Adam", True)):
                t = time_epochs(cfg, cohort, cases, cache=cache, epochs=a.epochs)
                print(f"{name:<8} {label:<26} {t:8.2f} {n / t:8.1f} {naive / t:8.2f}x")


if __name__ == "__main__":
    main()
