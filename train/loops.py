"""Training and evaluation of one fold: one bag per step, real gradient accumulation, model
selection on the validation set (or the last epoch, the original HIPT protocol), one test pass
with the selected model.

Everything a fold writes goes through temp + rename, and ``metrics.json`` is written last, so a
fold folder with a valid ``metrics.json`` is complete. An unfinished fold resumes after its last
finished epoch (``resume.pt``: model, optimiser, sampler and RNG states) when the config and cases
are unchanged, giving the same result as an uninterrupted run; otherwise it starts again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hipt.atomic import atomic_path, write_text_atomic
from hipt.models import create_model
from hipt.models.slide import load_slide_model
from hipt.survival import bin_edges, nll_loss, risk_from_logits, survival_curve, to_bins
from train.data import BagStore, Cohort
from train.metrics import classification_metrics, concordance, risk_groups, survival_metrics
from train.plots import km_png, roc_png

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "best.pt"
RESUME_FILE = "resume.pt"  # the last finished epoch of an unfinished fold


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) for a repeatable fold; NumPy draws use explicit generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def fold_is_done(fold_dir: str | os.PathLike) -> bool:
    """True when the fold's ``metrics.json`` exists, parses and says the fold finished."""
    path = Path(fold_dir) / METRICS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("status") == "complete" and "test" in data


def model_args(cfg: dict[str, Any], cohort: Cohort) -> dict[str, Any]:
    """Builder arguments of the configured slide model, sized for the cohort (classes or time
    bins, input size for abmil); recorded in ``metrics.json`` so other stages can rebuild it."""
    args = dict(cfg["model"].get("kwargs") or {})
    if cfg["model"]["name"] == "abmil" and "in_dim" not in args and cohort.feature_dim:
        args["in_dim"] = cohort.feature_dim
    args.update(
        n_classes=max(len(cohort.label_map), 1),
        task="classification" if cfg["task"] == "subtype" else "survival",
        n_bins=int(cfg["survival"]["n_bins"]),
    )
    return args


def build_model(cfg: dict[str, Any], cohort: Cohort) -> torch.nn.Module:
    """The configured slide model (:func:`model_args`), freshly initialised."""
    return create_model(cfg["model"]["name"], **model_args(cfg, cohort))


def make_optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over the trainable parameters; the fused kernel where torch has one for the device.

    Bags are small, so the optimiser step is a large share of a step's time: fused Adam is about
    3x faster than the default on CPU for ``hipt_gp``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = float(cfg["train"]["lr"]), float(cfg["train"]["weight_decay"])
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / torch
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def json_safe(x: Any) -> Any:
    """``x`` with NaN and inf as ``None`` and NumPy scalars as Python ones, for ``json.dumps``."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


@dataclass
class _Progress:
    """Where a fold's training stands: the selected epoch and state, the history so far."""

    best_score: float = float("nan")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0
    stopped: bool = False


def _better(score: float, best: float) -> bool:
    return math.isfinite(score) and (not math.isfinite(best) or score > best)


class FoldRunner:
    """Train, select and test one fold.

    Parameters
    ----------
    cfg : dict
        Resolved config (:func:`train.config.validate`).
    cohort : Cohort
    store : BagStore
    cases : dict
        ``{"train": [...], "val": [...], "test": [...]}`` case ids of this fold.
    fold : int
    fold_dir : path
        Output folder of this fold.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        cohort: Cohort,
        store: BagStore,
        cases: dict[str, list[str]],
        fold: int,
        fold_dir: str | os.PathLike,
    ) -> None:
        self.cfg, self.cohort, self.store, self.cases, self.fold = cfg, cohort, store, cases, fold
        self.fold_dir = Path(fold_dir)
        self.task = cfg["task"]
        self.device = torch.device(cfg.get("device") or "cpu")
        self.tr = cfg["train"]
        self.alpha = float(cfg["survival"]["alpha"])
        self._targets: dict[str, tuple[torch.Tensor, ...]] = {}
        if self.task == "survival":
            train = [cohort.case(c) for c in cases["train"]]
            self.edges = bin_edges(
                np.array([c.time for c in train]),
                np.array([c.event for c in train]),
                int(cfg["survival"]["n_bins"]),
            )

    # ------------------------------------------------------------------ targets
    def _target(self, case_id: str) -> tuple[torch.Tensor, ...]:
        if case_id not in self._targets:
            self._targets[case_id] = self._make_target(case_id)
        return self._targets[case_id]

    def _make_target(self, case_id: str) -> tuple[torch.Tensor, ...]:
        c = self.cohort.case(case_id)
        if self.task == "subtype":
            return (torch.tensor([c.label], device=self.device),)
        b = int(to_bins(np.array([c.time]), self.edges)[0])
        return torch.tensor([b], device=self.device), torch.tensor(
            [float(c.event)], device=self.device
        )

    def _loss(self, logits: torch.Tensor, target: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.task == "subtype":
            return F.cross_entropy(logits.unsqueeze(0), target[0])
        return nll_loss(logits.unsqueeze(0), target[0], target[1], alpha=self.alpha)

    # ------------------------------------------------------------------ epochs
    def _order(self, gen: torch.Generator) -> list[str]:
        ids = self.cases["train"]
        n = len(ids)
        if self.task == "subtype" and self.tr["balanced_sampling"]:
            labels = np.array([self.cohort.case(c).label for c in ids])
            counts = np.bincount(labels)
            w = torch.tensor(1.0 / counts[labels], dtype=torch.float64)
            idx = torch.multinomial(w, n, replacement=True, generator=gen)
        else:
            idx = torch.randperm(n, generator=gen)
        return [ids[i] for i in idx.tolist()]

    def _bag(self, case_id: str, gen: torch.Generator | None = None) -> torch.Tensor:
        bag = self.store.bag(case_id)
        cap = self.tr.get("max_regions")
        if gen is not None and cap and bag.shape[0] > int(cap):
            keep = torch.randperm(bag.shape[0], generator=gen)[: int(cap)].sort().values
            bag = bag[keep]
        return bag.to(self.device, non_blocking=True)

    def train_epoch(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
    ) -> float:
        """One pass over the training cases; the optimiser steps every ``accumulate`` bags."""
        model.train()
        order = self._order(gen)
        acc = int(self.tr["accumulate"])
        n = len(order)
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for i, cid in enumerate(order):
            group_start = (i // acc) * acc
            group_size = min(acc, n - group_start)
            out = model(self._bag(cid, gen))
            loss = self._loss(out.logits, self._target(cid))
            # Scale so one optimiser step sees the mean gradient of its group of bags.
            (loss / group_size).backward()
            total += float(loss.detach())
            if i + 1 == group_start + group_size:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return total / max(n, 1)

    @torch.no_grad()
    def predict(
        self, model: torch.nn.Module, case_ids: list[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """Logits [N, n_out], attention per case and the mean loss over ``case_ids``."""
        model.eval()
        logits, attn, total = [], [], 0.0
        for cid in case_ids:
            out = model(self._bag(cid))
            logits.append(out.logits.float().cpu())
            attn.append(out.attention.float().cpu())
            total += float(self._loss(out.logits, self._target(cid)))
        return (
            torch.stack(logits) if logits else torch.zeros(0),
            attn,
            total / max(len(case_ids), 1),
        )

    def _score(self, case_ids: list[str], logits: torch.Tensor, loss: float) -> tuple[float, float]:
        """(selection score, task metric) on a set of cases; higher score is better."""
        if self.task == "subtype":
            y = np.array([self.cohort.case(c).label for c in case_ids])
            metric = (
                classification_metrics(y, torch.softmax(logits, 1).numpy())["auc"]
                if len(y)
                else float("nan")
            )
        else:
            cs = [self.cohort.case(c) for c in case_ids]
            metric = concordance(
                np.array([c.time for c in cs]),
                np.array([c.event for c in cs]),
                risk_from_logits(logits).numpy(),
            )
        return (-loss if self.tr["select_on"] in ("loss", "last") else metric), metric

    def _check_selectable(self) -> None:
        """Refuse a metric-based selection that the fold's val cases cannot score.

        The val AUC needs two classes and the val c-index a comparable pair; otherwise the score
        is NaN at every epoch and the first epoch's model would be kept without a word.
        """
        if self.tr["select_on"] in ("loss", "last"):
            return
        val = [self.cohort.case(c) for c in self.cases["val"]]
        if self.task == "subtype":
            undefined = len({c.label for c in val}) < 2
            why = "val cases of only one class"
        else:
            times = np.array([c.time for c in val], dtype=float)
            events = np.array([c.event for c in val])
            undefined = not math.isfinite(concordance(times, events, np.zeros(len(val))))
            why = "no comparable pair of val cases"
        if undefined:
            raise ValueError(
                f"fold {self.fold}: cannot select on val {self.tr['select_on']} ({why} among "
                f"{len(val)}); use train.select_on=loss or a split with more val cases"
            )

    # ------------------------------------------------------------------ resume
    def _fingerprint(self) -> str:
        """What must match for an epoch checkpoint to be resumed (config, fold and its cases)."""
        cfg = copy.deepcopy(self.cfg)
        cfg["train"].pop("progress", None)
        blob = json.dumps(
            {"cfg": cfg, "fold": self.fold, "cases": self.cases}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _load_resume(self, fingerprint: str) -> dict[str, Any] | None:
        path = self.fold_dir / RESUME_FILE
        if not path.is_file():
            return None
        try:
            # On the CPU: RNG states (the CUDA one included) must be CPU byte tensors, and
            # load_state_dict moves model and optimiser tensors to the model's device.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file is just not resumable
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            return None
        return state

    def _save_resume(self, fingerprint: str, state: dict[str, Any]) -> None:
        with atomic_path(self.fold_dir / RESUME_FILE) as tmp:
            torch.save({"fingerprint": fingerprint, **state}, tmp)

    # ------------------------------------------------------------------ fold
    def run(self) -> dict[str, Any]:
        """Train, select the model (best val epoch, or the last with ``select_on: last``), test
        it once and write the fold's files; return its metrics."""
        self._check_selectable()
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.fold_dir.glob(".*.tmp-*"):
            stale.unlink()  # left by a killed run
        seed = int(self.cfg["seed"]) * 1000 + self.fold
        seed_everything(seed)
        gen = torch.Generator().manual_seed(seed)
        model = build_model(self.cfg, self.cohort).to(self.device)
        opt = make_optimizer(self.cfg, model)
        fingerprint = self._fingerprint()
        progress = self._resume(model, opt, gen, fingerprint)
        self._train(model, opt, gen, fingerprint, progress)
        model.load_state_dict(progress.best_state)
        with atomic_path(self.fold_dir / CHECKPOINT_FILE) as tmp:
            torch.save({k: v.cpu() for k, v in progress.best_state.items()}, tmp)
        write_text_atomic(
            self.fold_dir / "history.csv", pd.DataFrame(progress.history).to_csv(index=False)
        )
        metrics = self._test(model, progress, seed)
        write_text_atomic(self.fold_dir / METRICS_FILE, json.dumps(json_safe(metrics), indent=2))
        (self.fold_dir / RESUME_FILE).unlink(missing_ok=True)
        return metrics

    def _resume(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        fingerprint: str,
    ) -> _Progress:
        """Where training stands: from ``resume.pt`` when it matches this fold, else epoch 0."""
        resume = self._load_resume(fingerprint)
        if resume is None:
            return _Progress()
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if "cuda_rng" in resume and torch.cuda.is_available():
            torch.cuda.set_rng_state(resume["cuda_rng"])
        return _Progress(
            best_score=float(resume["best_score"]),
            best_epoch=int(resume["best_epoch"]),
            best_state=resume["best_state"],
            history=list(resume["history"]),
            start=int(resume["epoch"]) + 1,
            stopped=bool(resume["stopped"]),
        )

    def _train(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        fingerprint: str,
        progress: _Progress,
    ) -> None:
        """The epochs left: train, score on val, keep the selected state, save ``resume.pt``."""
        epochs, patience = int(self.tr["epochs"]), int(self.tr["patience"])
        last = self.tr["select_on"] == "last"  # the original protocol: no selection, no stop
        bar = tqdm(
            range(progress.start, epochs if not progress.stopped else progress.start),
            initial=progress.start,
            total=epochs,
            desc=f"fold {self.fold}",
            unit="epoch",
            disable=not self.tr.get("progress", True),
            leave=False,
        )
        for epoch in bar:
            train_loss = self.train_epoch(model, opt, gen)
            val_logits, _, val_loss = self.predict(model, self.cases["val"])
            score, metric = self._score(self.cases["val"], val_logits, val_loss)
            progress.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_metric": metric,
                }
            )
            if last or progress.best_state is None or _better(score, progress.best_score):
                progress.best_score, progress.best_epoch = score, epoch
                progress.best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(
                train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=progress.best_epoch
            )
            stop = bool(
                not last
                and patience
                and epoch + 1 >= int(self.tr["min_epochs"])
                and epoch - progress.best_epoch >= patience
            )
            self._save_resume(
                fingerprint, self._resume_state(model, opt, gen, epoch, stop, progress)
            )
            if stop:
                break
        bar.close()

    @staticmethod
    def _resume_state(
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        epoch: int,
        stopped: bool,
        progress: _Progress,
    ) -> dict[str, Any]:
        cuda = {"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
        return {
            "epoch": epoch,
            "stopped": stopped,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            **cuda,
            "best_score": progress.best_score,
            "best_epoch": progress.best_epoch,
            "best_state": progress.best_state,
            "history": progress.history,
        }

    def _test(self, model: torch.nn.Module, progress: _Progress, seed: int) -> dict[str, Any]:
        """Test the selected model once; write ``predictions.csv`` and the plot; the metrics."""
        test_ids = self.cases["test"]
        logits, attn, test_loss = self.predict(model, test_ids)
        threshold = None
        if self.task == "survival":
            # Risk groups split at the training cases' median risk, fixed before the test set.
            train_logits, _, _ = self.predict(model, self.cases["train"])
            threshold = float(np.median(risk_from_logits(train_logits).numpy()))
        preds, test_metrics = self._evaluate(test_ids, logits, attn, threshold)
        write_text_atomic(self.fold_dir / "predictions.csv", preds.to_csv(index=False))
        val_row = progress.history[progress.best_epoch]
        metrics = {
            "status": "complete",
            "fold": self.fold,
            "task": self.task,
            "model": self.cfg["model"]["name"],
            "model_args": model_args(self.cfg, self.cohort),
            "checkpoint": CHECKPOINT_FILE,
            "seed": seed,
            "selected_on": self.tr["select_on"],
            "best_epoch": progress.best_epoch,
            "epochs_run": len(progress.history),
            "n_cases": {r: len(v) for r, v in self.cases.items()},
            "val": {"loss": val_row["val_loss"], "metric": val_row["val_metric"]},
            "test": {"loss": test_loss, **test_metrics},
        }
        if self.task == "survival":
            metrics["bin_edges"] = [float(e) for e in self.edges]
            metrics["risk_threshold"] = threshold
        return metrics

    def _evaluate(
        self,
        case_ids: list[str],
        logits: torch.Tensor,
        attn: list[torch.Tensor],
        threshold: float | None = None,
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        cases = [self.cohort.case(c) for c in case_ids]
        base = pd.DataFrame(
            {
                "case_id": case_ids,
                "slide_ids": [";".join(c.slide_ids) for c in cases],
                "n_regions": [int(a.numel()) for a in attn],
            }
        )
        title = f"{self.cfg['cohort']} fold {self.fold}"
        if self.task == "subtype":
            names = self.cohort.class_names
            y = np.array([c.label for c in cases])
            probs = (
                torch.softmax(logits, dim=1).numpy() if len(cases) else np.zeros((0, len(names)))
            )
            base["label"] = [c.label_name for c in cases]
            base["label_index"] = y
            for k, name in enumerate(names):
                base[f"prob_{name}"] = probs[:, k]
            base["pred"] = [names[k] for k in probs.argmax(1)]
            metrics = classification_metrics(y, probs, names)
            roc_png(y, probs, names, self.fold_dir / "roc.png", title=title)
            metrics["plots"] = ["roc.png"]
            return base, metrics
        times = np.array([c.time for c in cases])
        events = np.array([c.event for c in cases])
        risk = risk_from_logits(logits).numpy()
        surv = survival_curve(logits).numpy()
        base["survival_months"] = times
        base["event"] = events
        base["risk"] = risk
        base["high_risk"] = risk_groups(risk, threshold)
        for k in range(surv.shape[1]):
            base[f"survival_bin{k}"] = surv[:, k]
        metrics = survival_metrics(times, events, risk, threshold)
        km_png(
            times,
            events,
            base["high_risk"].to_numpy(),
            self.fold_dir / "km.png",
            title=title,
            p=metrics["logrank_p"],
        )
        metrics["plots"] = ["km.png"]
        return base, metrics


def load_checkpoint(
    cfg: dict[str, Any], cohort: Cohort, path: str | os.PathLike
) -> torch.nn.Module:
    """Rebuild the configured model and load a fold's ``best.pt`` (``weights_only=True``)."""
    return load_slide_model(path, name=cfg["model"]["name"], **model_args(cfg, cohort))
