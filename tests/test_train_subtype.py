"""Subtyping training: the method finds the signal, the runs folder, resume, determinism, accumulation."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from hipt.synthetic.cohorts import make_subtyping_cohort
from train.cli import add_arguments, resolve_config, run
from train.config import default_config, merge, validate
from train.data import BagStore, case_strata, load_cohort
from train.loops import FoldRunner, load_checkpoint
from train.splits import fold_cases, make_splits, read_splits


def _cfg(cohort, out, **over):
    base = {
        "cohort": "syn",
        "task": "subtype",
        "csv": str(cohort.csv_path),
        "features_dir": str(cohort.features_dir),
        "out": str(out),
        "model": {"name": "abmil", "kwargs": {"hidden_dim": 16}},
        "splits": {"folds": 3},
        "train": {"epochs": 2, "lr": 1e-3, "progress": False},
    }
    model = over.pop("model", {})
    base["model"] = {
        "name": model.get("name", "abmil"),
        "kwargs": model.get("kwargs", {"hidden_dim": 16}),
    }
    return validate(merge(merge(default_config(), base), over))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_subtyping_cohort(
        tmp_path_factory.mktemp("small"),
        n_cases=18,
        regions=(3, 6),
        n_informative=1,
        slides_per_case=2,
        seed=1,
    )


def test_learns_the_informative_regions(tmp_path):
    """Label = function of 3 regions per bag: AUC ≥ 0.95 and attention ranks those regions first."""
    torch.set_num_threads(1)
    syn = make_subtyping_cohort(
        tmp_path / "c", n_cases=80, regions=(8, 16), n_informative=3, seed=0
    )
    cfg = _cfg(
        syn,
        tmp_path / "runs",
        splits={"folds": 4},
        model={"kwargs": {"hidden_dim": 64}},
        train={"epochs": 10, "patience": 0, "lr": 5e-4},
    )
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="subtype")
    store = BagStore(cohort, "region_features")
    splits = make_splits(cohort.case_ids, case_strata(cohort), folds=4, seed=1)
    cases = fold_cases(splits, 0)
    runner = FoldRunner(cfg, cohort, store, cases, 0, tmp_path / "runs" / "fold_0")
    metrics = runner.run()
    assert metrics["test"]["auc"] >= 0.95
    assert metrics["test"]["balanced_accuracy"] >= 0.85
    model = load_checkpoint(cfg, cohort, tmp_path / "runs" / "fold_0" / "best.pt")
    _, attn, _ = runner.predict(model, cases["test"])
    rank_auc, top1, top3 = [], [], []
    for cid, a in zip(cases["test"], attn, strict=True):
        informative = syn.informative[cohort.case(cid).slide_ids[0]]
        is_inf = np.zeros(len(a), dtype=bool)
        is_inf[informative] = True
        # Per bag: how well attention separates informative regions from the rest.
        rank_auc.append(roc_auc_score(is_inf, a.numpy()))
        top1.append(bool(is_inf[int(a.argmax())]))
        top3.append(is_inf[torch.argsort(a, descending=True)[:3].numpy()].mean())
    assert np.mean(rank_auc) >= 0.95, rank_auc
    assert np.mean(top1) >= 0.9, top1
    assert np.mean(top3) >= 0.85, top3


def test_cli_writes_the_runs_folder_then_skips_and_resumes(small, tmp_path):
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "cohort.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cohort": "tiny",
                "task": "subtype",
                "csv": str(small.csv_path),
                "features_dir": str(small.features_dir),
                "model": {"name": "hipt_gp"},
                "splits": {"folds": 3},
                "train": {"epochs": 5, "lr": 5e-4},
            }
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "hipt.cli",
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "runs"),
    ]
    cmd += ["--epochs", "2", "--set", "train.patience=1", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "tiny"
    for f in ("config.yaml", "splits.csv", "summary.csv", "report.md"):
        assert (run_dir / f).is_file(), f
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (
        saved["train"]["epochs"] == 2
        and saved["train"]["patience"] == 1
        and saved["train"]["lr"] == 5e-4
    )
    assert saved["label_map"] == {"A": 0, "B": 1}
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["fold"].tolist() == [0, 1, 2]
    report = (run_dir / "report.md").read_text()
    assert "mean ± sd" in report and "fold_2/roc.png" in report
    pooled = [line for line in report.splitlines() if line.startswith(("| A |", "| B |"))]
    assert (
        sum(int(v) for line in pooled for v in line.strip("|").split("|")[1:]) == 18
    )  # every case once
    splits = read_splits(run_dir / "splits.csv")
    multi_slide = False
    for k in range(3):
        fold = run_dir / f"fold_{k}"
        for f in ("best.pt", "predictions.csv", "metrics.json", "roc.png", "history.csv"):
            assert (fold / f).is_file(), (k, f)
        m = json.loads((fold / "metrics.json").read_text())
        assert m["status"] == "complete" and m["epochs_run"] <= 2
        preds = pd.read_csv(fold / "predictions.csv")
        assert sorted(preds["case_id"]) == fold_cases(splits, k)["test"]
        assert np.allclose(preds[["prob_A", "prob_B"]].sum(axis=1), 1.0, atol=1e-5)
        multi_slide |= bool(preds["slide_ids"].str.contains(";").any())
        assert (fold / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert multi_slide  # cases with two slides are predicted once, with both slide ids

    before = {k: (run_dir / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)}
    # An interrupted fold: unreadable metrics.json and a leftover temp file.
    (run_dir / "fold_1" / "metrics.json").write_text('{"status": "compl')
    (run_dir / "fold_1" / ".best.pt.tmp-deadbeef").write_bytes(b"partial")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "fold 0: finished earlier, skipped" in res.stdout
    assert "fold 2: finished earlier, skipped" in res.stdout
    assert "fold 1: best epoch" in res.stdout
    assert (run_dir / "fold_0" / "metrics.json").stat().st_mtime_ns == before[0]
    assert json.loads((run_dir / "fold_1" / "metrics.json").read_text())["status"] == "complete"
    assert not (run_dir / "fold_1" / ".best.pt.tmp-deadbeef").exists()
    # Rebuilding only the report (after a Slurm array) reads the finished folds.
    (run_dir / "report.md").unlink()
    res = subprocess.run(
        cmd + ["--report-only"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "3 fold(s) finished" in res.stdout and (run_dir / "report.md").is_file()


def test_one_fold_and_bad_input_exit_codes(small, tmp_path, capsys):
    cfg = _cfg(small, tmp_path / "runs")
    assert run(cfg, fold=2) == 0
    run_dir = tmp_path / "runs" / "syn"
    assert sorted(p.name for p in run_dir.glob("fold_*")) == ["fold_2"]
    assert run(cfg, fold=7) == 2
    assert "fold 7 not in the splits" in capsys.readouterr().err
    bad = dict(cfg, csv=str(tmp_path / "missing.csv"))
    assert run(bad) == 2
    assert "cannot read cohort CSV" in capsys.readouterr().err
    # Changing the seed would change the splits of a run that already has folds: refused.
    assert run(dict(cfg, seed=99)) == 2
    assert "differs from the splits" in capsys.readouterr().err


def test_two_seeded_runs_are_identical(small, tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg = _cfg(
            small,
            tmp_path / name,
            model={"name": "hipt_gp", "kwargs": {}},
            train={"epochs": 2, "accumulate": 2},
        )
        assert run(cfg) == 0
        outs.append(tmp_path / name / "syn")
    a, b = outs
    assert (a / "splits.csv").read_text() == (b / "splits.csv").read_text()
    for k in range(3):
        assert (a / f"fold_{k}" / "predictions.csv").read_text() == (
            b / f"fold_{k}" / "predictions.csv"
        ).read_text()
        sa = torch.load(a / f"fold_{k}" / "best.pt", map_location="cpu", weights_only=True)
        sb = torch.load(b / f"fold_{k}" / "best.pt", map_location="cpu", weights_only=True)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert (a / "summary.csv").read_text() == (b / "summary.csv").read_text()


def test_best_epoch_is_selected_on_validation_and_checkpoint_reproduces_predictions(
    small, tmp_path
):
    cfg = _cfg(small, tmp_path / "runs", train={"epochs": 6, "patience": 0, "lr": 3e-3})
    assert run(cfg, fold=0) == 0
    fold = tmp_path / "runs" / "syn" / "fold_0"
    hist = pd.read_csv(fold / "history.csv")
    m = json.loads((fold / "metrics.json").read_text())
    assert m["best_epoch"] == int(hist["val_loss"].idxmin())
    assert m["val"]["loss"] == pytest.approx(hist["val_loss"].min())
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="subtype")
    model = load_checkpoint(cfg, cohort, fold / "best.pt")
    preds = pd.read_csv(fold / "predictions.csv")
    store = BagStore(cohort, "region_features")
    with torch.no_grad():
        probs = [torch.softmax(model(store.bag(c)).logits, 0)[1].item() for c in preds["case_id"]]
    np.testing.assert_allclose(probs, preds["prob_B"], atol=1e-6)

    cfg_auc = _cfg(
        small,
        tmp_path / "auc",
        splits={"val_fraction": 0.3},
        train={"epochs": 4, "patience": 0, "select_on": "auc"},
    )
    assert run(cfg_auc, fold=0) == 0
    fold = tmp_path / "auc" / "syn" / "fold_0"
    hist = pd.read_csv(fold / "history.csv")
    assert hist["val_metric"].notna().all()
    assert json.loads((fold / "metrics.json").read_text())["best_epoch"] == int(
        hist["val_metric"].idxmax()
    )


def _runner(small, tmp_path, **train):
    cfg = _cfg(small, tmp_path, model={"kwargs": {"hidden_dim": 8, "dropout": 0.0}}, train=train)
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="subtype")
    cases = {
        "train": cohort.case_ids[:10],
        "val": cohort.case_ids[10:14],
        "test": cohort.case_ids[14:],
    }
    return FoldRunner(cfg, cohort, BagStore(cohort, "region_features"), cases, 0, tmp_path / "f")


def _epoch(runner, order_seed):
    from train.loops import build_model

    torch.manual_seed(0)
    model = build_model(runner.cfg, runner.cohort)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = []
    original = opt.step
    opt.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    runner.train_epoch(model, opt, torch.Generator().manual_seed(order_seed))
    return model, len(steps)


def test_gradient_accumulation_is_real(small, tmp_path):
    # 10 bags, 4 per step → 3 optimiser steps (4 + 4 + 2).
    runner = _runner(small, tmp_path, accumulate=4, balanced_sampling=False)
    _, n = _epoch(runner, 0)
    assert n == 3
    # One step over all bags uses the mean gradient: the bag order no longer matters...
    runner = _runner(small, tmp_path, accumulate=10, balanced_sampling=False)
    a, n = _epoch(runner, 0)
    b, _ = _epoch(runner, 1)
    assert n == 1
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    # ...while stepping on every bag depends on it.
    runner = _runner(small, tmp_path, accumulate=1, balanced_sampling=False)
    c, n = _epoch(runner, 0)
    d, _ = _epoch(runner, 1)
    assert n == 10
    assert any(
        not torch.allclose(pc, pd_, atol=1e-6)
        for pc, pd_ in zip(c.parameters(), d.parameters(), strict=True)
    )


def test_class_balanced_sampling(small, tmp_path):
    runner = _runner(small, tmp_path, balanced_sampling=True)
    labels = {c: runner.cohort.case(c).label for c in runner.cases["train"]}
    runner.cases["train"] = [c for c in runner.cases["train"] if labels[c] == 0] + [
        next(c for c in runner.cases["train"] if labels[c] == 1)
    ]  # heavy imbalance: one case of class 1
    gen = torch.Generator().manual_seed(0)
    drawn = [labels[c] for _ in range(200) for c in runner._order(gen)]
    assert 0.45 < np.mean(drawn) < 0.55


def test_config_precedence(small, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cohort": "p",
                "csv": "x.csv",
                "features_dir": "feats",
                "train": {"lr": 0.5, "epochs": 3},
            }
        )
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(config),
            "--epochs",
            "7",
            "--set",
            "train.lr=0.25",
            "--set",
            "splits.site_preserving=true",
        ]
    )
    cfg = resolve_config(args)
    assert cfg["train"]["epochs"] == 7  # flag over file
    assert cfg["train"]["lr"] == 0.25  # --set over file
    assert cfg["train"]["weight_decay"] == 1e-5  # default kept
    assert cfg["splits"]["site_preserving"] is True
    assert cfg["splits"]["folds"] == 10 and cfg["train"]["select_on"] == "loss"
    assert cfg["csv"] == str((tmp_path / "x.csv").resolve())  # relative to the YAML
    bad = parser.parse_args(["--config", str(config), "--set", "task=regression"])
    with pytest.raises(
        ValueError, match="task = 'regression': Input should be 'subtype' or 'survival'"
    ):
        resolve_config(bad)
    typo = parser.parse_args(["--config", str(config), "--set", "train.learning_rate=0.1"])
    with pytest.raises(
        ValueError, match=r"train.learning_rate: unknown key \(allowed: epochs, lr,"
    ):
        resolve_config(typo)


def test_example_configs_load_and_validate():
    from pathlib import Path

    from train.config import load_yaml

    folder = Path(__file__).parent.parent / "train" / "configs"
    # dino_*.yaml are pretraining configs, checked against their own schema in test_dino_*.
    configs = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("dino_"))
    assert len(configs) >= 4
    for path in configs:
        cfg = validate(merge(default_config(), load_yaml(path)))
        assert Path(cfg["csv"]).is_absolute() and cfg["task"] in ("subtype", "survival")
        assert set(cfg) == set(default_config()), path  # no misspelt top-level keys
        for section in ("train", "splits", "survival", "model"):
            assert set(cfg[section]) <= set(default_config()[section]), (path, section)


def test_hipt_lgp_trains_on_patch_features_and_reloads_from_metrics(tmp_path, capsys):
    from hipt.models.slide import load_slide_model

    syn = make_subtyping_cohort(
        tmp_path / "c", n_cases=9, regions=(2, 4), n_informative=1, patch_features=True, seed=4
    )
    cfg = _cfg(
        syn,
        tmp_path / "runs",
        model={"name": "hipt_lgp", "kwargs": {"vit4k_kwargs": {"depth": 1}}},
        train={"epochs": 1, "max_regions": 2},
    )
    # No ViT-4K weights: refused before anything is written, unless asked for explicitly.
    assert run(cfg, fold=0) == 2
    assert not (tmp_path / "runs").exists()
    assert "set model.kwargs.random_weights: true" in capsys.readouterr().err
    cfg["model"]["kwargs"]["random_weights"] = True
    assert run(cfg, fold=0) == 0
    fold = tmp_path / "runs" / "syn" / "fold_0"
    m = json.loads((fold / "metrics.json").read_text())
    assert m["model_args"] == {
        "vit4k_kwargs": {"depth": 1},
        "random_weights": True,
        "n_classes": 2,
        "task": "classification",
        "n_bins": 4,
    }
    model = load_slide_model(fold / m["checkpoint"], name=m["model"], **m["model_args"])
    cohort = load_cohort(
        cfg["csv"], cfg["features_dir"], task="subtype", input_key="patch_features"
    )
    preds = pd.read_csv(fold / "predictions.csv")
    store = BagStore(cohort, "patch_features")
    with torch.no_grad():
        for _, r in preds.iterrows():
            bag = store.bag(r["case_id"])
            assert (
                bag.shape[1:] == (256, 384) and r["n_regions"] == bag.shape[0]
            )  # test bags are whole
            p = torch.softmax(model(bag).logits, 0)[1].item()
            assert p == pytest.approx(r["prob_B"], abs=1e-5)


def test_interrupted_fold_resumes_to_the_uninterrupted_result(small, tmp_path, monkeypatch):
    cfg_a = _cfg(
        small,
        tmp_path / "a",
        model={"name": "hipt_gp", "kwargs": {}},
        train={"epochs": 4, "patience": 0},
    )
    assert run(cfg_a, fold=0) == 0
    cfg_b = dict(cfg_a, out=str(tmp_path / "b"))
    calls = {"n": 0}
    original = FoldRunner.train_epoch

    def dies_in_epoch_3(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("node lost")
        return original(self, *args)

    monkeypatch.setattr(FoldRunner, "train_epoch", dies_in_epoch_3)
    assert run(cfg_b, fold=0) == 1
    fold_b = tmp_path / "b" / "syn" / "fold_0"
    assert (fold_b / "resume.pt").is_file() and not (fold_b / "metrics.json").exists()
    calls["n"] = -100  # no more failures
    assert run(cfg_b, fold=0) == 0
    assert calls["n"] == -98  # only epochs 2 and 3 ran again
    fold_a = tmp_path / "a" / "syn" / "fold_0"
    assert (fold_a / "history.csv").read_text() == (fold_b / "history.csv").read_text()
    assert (fold_a / "predictions.csv").read_text() == (fold_b / "predictions.csv").read_text()
    assert not (fold_b / "resume.pt").exists()
    # A changed config does not resume from an old epoch checkpoint.
    runner = FoldRunner(
        dict(cfg_b, seed=5), None, None, {"train": [], "val": [], "test": []}, 0, fold_b
    )
    runner._save_resume("other", {"epoch": 0})
    assert runner._load_resume(runner._fingerprint()) is None


def test_resume_state_loads_on_the_cpu_for_a_cuda_fold(small, tmp_path):
    """A GPU fold's epoch checkpoint holds RNG states that ``torch.set_rng_state`` and
    ``torch.cuda.set_rng_state`` accept only as CPU byte tensors, so it is loaded on the CPU."""
    cfg = dict(_cfg(small, tmp_path, model={"name": "hipt_gp", "kwargs": {}}), device="cuda")
    cohort = load_cohort(cfg["csv"], cfg["features_dir"], task="subtype")
    cases = {"train": cohort.case_ids[:10], "val": cohort.case_ids[10:14], "test": []}
    runner = FoldRunner(cfg, cohort, None, cases, 0, tmp_path / "f")
    fp = runner._fingerprint()
    runner.fold_dir.mkdir()
    runner._save_resume(
        fp,
        {
            "epoch": 0,
            "generator": torch.Generator().get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.get_rng_state(),  # stands in for torch.cuda.get_rng_state()
        },
    )
    state = runner._load_resume(fp)
    assert state is not None
    for key in ("generator", "torch_rng", "cuda_rng"):
        assert state[key].device.type == "cpu" and state[key].dtype == torch.uint8, key
    torch.set_rng_state(state["torch_rng"])


def test_report_counts_the_folds_of_a_user_split_file(small, tmp_path):
    """``splits.folds`` (here 3) does not apply to a user split file with 2 folds."""
    cohort = load_cohort(small.csv_path, small.features_dir, task="subtype")
    ids = cohort.case_ids
    rows = ["case_id,fold,role"]
    for k in range(2):
        for i, c in enumerate(ids):
            role = "test" if i % 2 == k else ("val" if i % 4 in (2 + k, 3 - k) else "train")
            rows.append(f"{c},{k},{role}")
    split_file = tmp_path / "user_splits.csv"
    split_file.write_text("\n".join(rows) + "\n")
    cfg = _cfg(small, tmp_path / "runs", splits={"folds": 3, "file": str(split_file)})
    assert run(cfg) == 0
    report = (tmp_path / "runs" / "syn" / "report.md").read_text()
    assert "2 of 2 folds finished" in report


def test_selection_on_an_undefined_val_auc_is_refused(small, tmp_path):
    """select_on=auc with val cases of one class would keep epoch 0 silently."""
    runner = _runner(small, tmp_path, select_on="auc")
    labels = {c: runner.cohort.case(c).label for c in runner.cohort.case_ids}
    runner.cases["val"] = [c for c in runner.cases["val"] if labels[c] == 0][:2]
    with pytest.raises(ValueError, match="cannot select on val auc"):
        runner.run()


def test_rerun_with_other_settings_is_refused_once_a_fold_finished(small, tmp_path, capsys):
    """Finished folds are skipped on a re-run, so a re-run with another lr would report the old
    folds under a config.yaml that says the new lr."""
    cfg = _cfg(small, tmp_path / "runs", train={"epochs": 1})
    assert run(cfg, fold=0) == 0
    saved = (tmp_path / "runs" / "syn" / "config.yaml").read_text()
    other = _cfg(small, tmp_path / "runs", train={"epochs": 1, "lr": 0.5})
    assert run(other, fold=1) == 2
    assert "other settings (train.lr)" in capsys.readouterr().err
    assert (tmp_path / "runs" / "syn" / "config.yaml").read_text() == saved
    assert not (tmp_path / "runs" / "syn" / "fold_1").exists()
    # Settings that do not change results may differ; the same settings go on.
    assert run(dict(cfg, threads=0, train=dict(cfg["train"], cache=False)), fold=1) == 0
