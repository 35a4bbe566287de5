"""The DINO engine shared by both stages: build, resume, train step by step, checkpoint, export.

One process or many (torchrun, or srun with Slurm's variables; :mod:`hipt.distributed`). Each
process reads its share of every global batch; the student is wrapped in DDP, the teacher is an
EMA of it on every process. Checkpoints are written by rank 0 every ``checkpoint_every_steps``,
at the end, and when SIGTERM or SIGUSR1 arrives (all processes agree on the step to stop at, so
a preempted job saves one consistent state). One output folder is one run: it is locked for the
run's time (:mod:`train.dino.rundir`), so a second live run onto it is refused. ``state.json`` in the output folder says whether
the run is ``running``, ``preempted``, ``stopped`` (``train.stop_at_step``) or ``complete``.

Examples
--------
>>> from train.dino.config import load_stage_config
>>> cfg = load_stage_config("stage2", "train/configs/dino_tiny_cpu_stage2.yaml")  # doctest: +SKIP
>>> pretrain(cfg).status  # doctest: +SKIP
'complete'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from hipt import __version__
from hipt.atomic import write_text_atomic
from hipt.distributed import DistEnv, detect, init_process_group
from train.dino import checkpoint as ck
from train.dino.augment import GridMultiCrop, PatchMultiCrop
from train.dino.config import Stage1Config, Stage2Config, config_dict, save_config
from train.dino.data import (
    FeatureGrids,
    ImageFolderPatches,
    MultiCropDataset,
    ResumableBatchSampler,
    SlidePatches,
)
from train.dino.model import DinoLoss, DinoNet, build_backbone, koleo_loss
from train.dino.rundir import hold_run_folder
from train.dino.schedule import Schedules

__all__ = ["Outcome", "Run", "pretrain"]

EXIT_PREEMPTED = 3  # checkpoint saved after SIGTERM/SIGUSR1: requeue and resume
# Tests that signal a run mid-way slow its steps down with this (seconds); never set otherwise.
_STEP_SLEEP_S = float(os.environ.get("HIPT_TEST_STEP_SLEEP", "0") or 0)


@dataclass
class Outcome:
    """How a run ended: ``status`` (complete / stopped / preempted), last step, output paths."""

    status: str
    step: int
    total_steps: int
    out: Path
    losses: list[float] = field(default_factory=list)


def _arch(cfg: Stage1Config | Stage2Config) -> dict[str, Any]:
    return {"name": cfg.model.arch, "kwargs": dict(sorted(cfg.model.kwargs.items()))}


def _head(cfg: Stage1Config | Stage2Config) -> dict[str, Any]:
    m = cfg.model
    return {
        "out_dim": m.out_dim,
        "hidden_dim": m.hidden_dim,
        "bottleneck_dim": m.bottleneck_dim,
        "layers": m.head_layers,
        "norm_last_layer": m.norm_last_layer,
    }


def _device(cfg: Stage1Config | Stage2Config, env: DistEnv) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device cuda: no CUDA device is visible")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device(want)


def build_dataset(cfg: Stage1Config | Stage2Config, out: Path) -> MultiCropDataset:
    """The stage's source behind multi-crop views; raises DataError for a missing/empty folder."""
    if isinstance(cfg, Stage2Config):
        source = FeatureGrids(cfg.data.features_dir)
        return MultiCropDataset(source, GridMultiCrop(cfg.crops), seed=cfg.train.seed)
    data = cfg.data
    if data.image_folder is not None:
        source: Any = ImageFolderPatches(data.image_folder)
    else:
        source = SlidePatches(
            data.tiles_dir,  # type: ignore[arg-type]
            slides_dir=data.slides_dir,
            reader=data.reader,
            skip_dir=out / "skipped_slides",
        )
    tissue = data.tissue if data.tissue.min_fraction > 0 else None
    return MultiCropDataset(source, PatchMultiCrop(cfg.crops), seed=cfg.train.seed, tissue=tissue)


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test's thread)
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Run:
    """One pretraining run: models, optimiser, data and the step loop (see :func:`pretrain`)."""

    def __init__(self, cfg: Stage1Config | Stage2Config, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env or detect()
        self.out = Path(cfg.out)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = _device(cfg, self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # collectives of objects use the current device
        self.dataset = build_dataset(cfg, self.out)  # bad data folders fail before any work
        self.steps_per_epoch = len(self.dataset) // t.batch_size
        # Checked by the sampler too, but here with the numbers a user needs.
        ResumableBatchSampler(
            len(self.dataset), t.batch_size, seed=t.seed, epoch=0, world_size=self.env.world_size
        )
        self.total_steps = t.epochs * self.steps_per_epoch
        self.arch, self.head = _arch(cfg), _head(cfg)
        self.precision = t.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        self._build_models()
        self.sched = Schedules(
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            peak_lr=cfg.optim.lr * t.batch_size / 256.0,
            min_lr=cfg.optim.min_lr,
            warmup_epochs=cfg.optim.warmup_epochs,
            wd_start=cfg.optim.weight_decay,
            wd_end=cfg.optim.weight_decay_end,
            momentum_start=cfg.dino.momentum_teacher,
            momentum_end=cfg.dino.momentum_teacher_end,
            teacher_temp=cfg.dino.teacher_temp,
            warmup_teacher_temp=cfg.dino.warmup_teacher_temp,
            warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
        )
        self.step = 0

    # ------------------------------------------------------------------ setup
    def _build_models(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
        kwargs = cfg.model.kwargs
        student = DinoNet(build_backbone(cfg.model.arch, kwargs, cfg.model.drop_path), **self.head)
        teacher = DinoNet(build_backbone(cfg.model.arch, kwargs, 0.0), **self.head)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        n_global = cfg.crops.global_crops
        n_crops = n_global + cfg.crops.local_crops
        self.loss_fn = DinoLoss(
            cfg.model.out_dim, n_global, n_crops, cfg.dino.student_temp, cfg.dino.center_momentum
        ).to(self.device)
        # No weight decay on biases and norm scales (1-d tensors), as DINO.
        decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim <= 1]
        fused = cfg.optim.fused is True or (
            cfg.optim.fused == "auto" and self.device.type == "cuda"
        )
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0,
            betas=cfg.optim.betas,
            fused=fused or None,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.last_layer = [p for n, p in student.named_parameters() if "last_layer" in n]
        self.student_params = [p for _, p in sorted(student.named_parameters())]
        self.teacher_params = [p for _, p in sorted(teacher.named_parameters())]
        self.ddp: nn.Module = self.student

    def resume_path(self) -> Path | None:
        if self.cfg.resume is not None:
            return Path(self.cfg.resume)
        own = self.out / "checkpoint.pth"
        return own if own.is_file() else None

    def load(self, path: Path) -> None:
        """Resume from ``path``: checked whole first, then every state is put back."""
        state = ck.read_resume_checkpoint(path)
        ck.check_compatible(state, path, self.arch, self.head)
        try:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher_native"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.loss_fn.center.copy_(state["center"].to(self.device))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ck.CheckpointError(f"{path}: does not fit this run ({exc})") from None
        self.step = int(state["step"])
        rng = state.get("rng") or []
        if len(rng) == self.env.world_size:
            ck.restore_rng(rng[self.env.rank])
        elif self.env.is_main:
            print(
                f"hipt pretrain: {path} was written by {len(rng)} processes, this run has "
                f"{self.env.world_size}: data order is kept, random states are reseeded",
                file=sys.stderr,
            )
        if self.step > self.total_steps:
            raise ck.CheckpointError(
                f"{path}: at step {self.step}, past this config's {self.total_steps} steps"
            )

    def wrap_distributed(self) -> None:
        if self.env.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        if self.cfg.train.compile:
            self.ddp = torch.compile(self.ddp)

    # ------------------------------------------------------------------ saving
    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = ck.capture_rng()
        if not self.env.is_distributed:
            return [mine]
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def _weights_digest(self) -> str:
        digest = hashlib.sha256()
        for p in self.student_params + self.teacher_params:
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _check_ranks_agree(self) -> list[str]:
        """SHA-256 of every process's student + teacher; processes that drifted apart are an error."""
        mine = self._weights_digest()
        if not self.env.is_distributed:
            return [mine]
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) != 1:
            raise RuntimeError(f"processes hold different weights at step {self.step}: {everyone}")
        return everyone

    def save(self) -> None:
        """Write ``checkpoint.pth`` and ``teacher.pth`` (rank 0; every rank gives its RNG)."""
        rng = self._gather_rng()
        digests = self._check_ranks_agree()
        if not self.env.is_main:
            return
        t_back = {
            k[len("backbone.") :]: v
            for k, v in self.teacher.state_dict().items()
            if "backbone." in k
        }
        t_head = {
            k[len("head.") :]: v for k, v in self.teacher.state_dict().items() if "head." in k
        }
        export = ck.teacher_export(t_back, t_head, self.arch)
        common = {
            "arch": self.arch,
            "head": self.head,
            "step": self.step,
            "hipt_version": __version__,
        }
        ck.write_checkpoint(
            self.out / "checkpoint.pth",
            {
                "format": ck.FORMAT,
                **common,
                "stage": self.cfg.stage,
                "teacher": export,
                "teacher_native": self.teacher.state_dict(),
                "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "center": self.loss_fn.center.detach().cpu(),
                "epoch": self.step // max(1, self.steps_per_epoch),
                "world_size": self.env.world_size,
                "rng": rng,
                "rank_weights_sha256": digests,
                "config": config_dict(self.cfg),
            },
        )
        ck.write_checkpoint(self.out / "teacher.pth", {"teacher": export, **common})
        keep = self.cfg.train.keep_every_steps
        if keep and self.step % keep == 0:
            ck.write_checkpoint(
                self.out / f"teacher-{self.step:08d}.pth", {"teacher": export, **common}
            )

    def write_state(self, status: str) -> None:
        if self.env.is_main:
            write_text_atomic(
                self.out / "state.json",
                json.dumps(
                    {"status": status, "step": self.step, "total_steps": self.total_steps},
                    sort_keys=True,
                )
                + "\n",
            )

    # ------------------------------------------------------------------ training
    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self, crops: list[torch.Tensor]) -> float:
        """One optimiser step on this process's share of a global batch; returns its loss."""
        s, sched = self.step, self.sched
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = sched.lr(s)
            if i == 0:
                group["weight_decay"] = sched.weight_decay(s)
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        n_global = self.cfg.crops.global_crops
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(crops[:n_global])
            koleo_weight = self.cfg.dino.koleo_weight
            if koleo_weight > 0:
                student_out, embeddings = self.ddp(crops, with_features=True)
            else:
                student_out, embeddings = self.ddp(crops), None
            loss = self.loss_fn(student_out, teacher_out, sched.teacher_temperature(s))
            if embeddings is not None:  # spread the first global crop of each image
                loss = loss + koleo_weight * koleo_loss(embeddings[: crops[0].shape[0]])
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {s}: lower optim.lr or use fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.clip_grad)
        if s < self.cfg.optim.freeze_last_layer_epochs * self.steps_per_epoch:
            for p in self.last_layer:
                p.grad = None  # DINO keeps the last layer fixed at first: stabler start
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # teacher ← EMA of the student
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1.0 - sched.momentum(s))
        self.step += 1
        return value

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        t = self.cfg.train
        sampler = ResumableBatchSampler(
            len(self.dataset),
            t.batch_size,
            seed=t.seed,
            epoch=epoch,
            rank=self.env.rank,
            world_size=self.env.world_size,
            start_step=start_step,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=t.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if t.workers else None,
            # Its own generator: making worker seeds must not draw from the global one.
            generator=torch.Generator().manual_seed(t.seed),
        )

    def agreed_stop(self, flag: _StopFlag) -> bool:
        """True on every process once any of them got SIGTERM / SIGUSR1."""
        local = torch.tensor([1.0 if flag.signal is not None else 0.0])
        if self.env.is_distributed:
            if dist.get_backend() == "nccl":
                local = local.to(self.device)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return bool(local.item() > 0)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (a killed run may have logged beyond its checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def pretrain(cfg: Stage1Config | Stage2Config, env: DistEnv | None = None) -> Outcome:
    """Run (or resume) DINO pretraining for ``cfg``; the engine of ``hipt pretrain``.

    Returns
    -------
    Outcome
        ``status`` is ``"complete"``, ``"stopped"`` (``train.stop_at_step``) or ``"preempted"``
        (a signal; the checkpoint is saved and the same command resumes).

    Raises
    ------
    ValueError
        Bad data (:class:`~train.dino.data.DataError`), a checkpoint that does not fit
        (:class:`~hipt.models.checkpoint.CheckpointError`), before any step runs; an output
        folder another live run is writing (:class:`~train.dino.rundir.RunFolderBusy`), before
        anything in it is read or written.
    """
    env = env or detect()
    backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    init_process_group(env, backend)
    with hold_run_folder(Path(cfg.out), env, _device(cfg, env)):
        return _pretrain_held(cfg, env)


def _pretrain_held(cfg: Stage1Config | Stage2Config, env: DistEnv) -> Outcome:
    """:func:`pretrain` once the output folder is this run's."""
    run = Run(cfg, env)
    resume = run.resume_path()
    if resume is not None:
        run.load(resume)
    run.wrap_distributed()
    log_path = run.out / "log.jsonl"
    if env.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "config.yaml")
        _truncate_log(log_path, run.step)
    flag = _StopFlag()
    flag.install()
    try:
        status, losses = _loop(run, flag, log_path)
    finally:
        flag.restore()
    return Outcome(status, run.step, run.total_steps, run.out, losses)


def _report(run: Run, log: Any, bar: Any, epoch: int, loss: float, dt: float, eta: float) -> None:
    """One ``log.jsonl`` line (every ``log_every_steps``) and the progress bar's figures."""
    s, t = run.step - 1, run.cfg.train  # the schedules of the step just taken
    if log is not None and run.step % t.log_every_steps == 0:
        record = {
            "step": run.step,
            "epoch": epoch,
            "loss": loss,
            "lr": run.sched.lr(s),
            "weight_decay": run.sched.weight_decay(s),
            "momentum": run.sched.momentum(s),
            "teacher_temp": run.sched.teacher_temperature(s),
            "images_per_s": t.batch_size / dt,
            "eta_s": eta,
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{run.sched.lr(s):.2e}",
            temp=f"{run.sched.teacher_temperature(s):.3f}",
            img_s=f"{t.batch_size / dt:.1f}",
        )


def _loop(run: Run, flag: _StopFlag, log_path: Path) -> tuple[str, list[float]]:
    """Steps until the end, a signal or ``stop_at_step``; returns the status and the losses."""
    cfg, env, t = run.cfg, run.env, run.cfg.train
    bar = None
    if env.is_main and t.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=run.total_steps, initial=run.step, desc=f"pretrain {cfg.stage}", unit="step"
        )
    run.write_state("running")
    losses: list[float] = []
    t_start, step_start = time.perf_counter(), run.step
    log = open(log_path, "a") if env.is_main else None  # noqa: SIM115 (closed below)
    status = "complete"
    try:
        while run.step < run.total_steps:
            epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
            for crops in run.loader(epoch, in_epoch):
                t0 = time.perf_counter()
                losses.append(run.train_step(crops))
                dt = time.perf_counter() - t0
                per_step = (time.perf_counter() - t_start) / (run.step - step_start)
                _report(
                    run, log, bar, epoch, losses[-1], dt, per_step * (run.total_steps - run.step)
                )
                if _STEP_SLEEP_S:
                    time.sleep(_STEP_SLEEP_S)
                if run.agreed_stop(flag):
                    status = "preempted"
                elif t.stop_at_step is not None and t.stop_at_step <= run.step < run.total_steps:
                    status = "stopped"
                if status != "complete" or run.step % t.checkpoint_every_steps == 0:
                    run.save()
                if status != "complete":
                    run.write_state(status)
                    return status, losses
        run.save()
        run.write_state("complete")
        return status, losses
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
