"""One output folder, one run: the lock a ``hipt pretrain`` run holds on its output folder.

``OUT/.pretrain.lock`` (a :class:`hipt.runlock.ItemLock`, taken by rank 0) names the host, PID
and Slurm job of the run writing the folder. A second live run onto the same folder is refused
before it reads or writes anything there (:class:`RunFolderBusy`, exit 2, naming the holder).
A lock whose process is dead is taken over, so a killed run resumes: on the same host the old
PID is checked (a reused PID is told apart by its start time), and a requeued Slurm job (same
``SLURM_JOB_ID``, higher ``SLURM_RESTART_COUNT``) takes over its earlier start's lock from any
node, since Slurm ends every process of a job before it starts the job again. A lock of another
job on another host cannot be checked and counts as held: its line says where to look.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from hipt.distributed import DistEnv
from hipt.runlock import ItemLock

__all__ = ["LOCK_NAME", "RunFolderBusy", "hold_run_folder"]

LOCK_NAME = ".pretrain.lock"


class RunFolderBusy(ValueError):
    """Another live ``hipt pretrain`` is writing this output folder."""


@contextlib.contextmanager
def hold_run_folder(out: Path, env: DistEnv, device: torch.device) -> Iterator[None]:
    """Hold ``out`` for this run while the block runs; every process of the run enters it.

    Rank 0 takes the lock (creating ``out``); the other ranks learn its answer, so all of them
    stop together when the folder is busy. A folder this call created and the run left empty
    (it failed before writing anything) is removed again.

    Raises
    ------
    RunFolderBusy
        On every rank, when another live process holds the folder; nothing in it was touched.
    ValueError
        When ``out`` cannot be created.
    """
    lock, refusal, created = None, "", False
    if env.is_main:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{out}: cannot create the output folder ({exc})") from None
        lock = ItemLock(out / LOCK_NAME)
        if not lock.acquire():
            holder = lock.owner() or "a process that is starting"
            refusal = (
                f"{out}: another hipt pretrain is writing this folder ({holder}); "
                "wait for it to end or pass another --out"
            )
            lock = None
        elif lock.took_over is not None:
            print(
                f"hipt pretrain: {out}: took over the lock of {lock.took_over}, "
                "which is no longer running",
                file=sys.stderr,
            )
    refusal = _rank0_says(refusal, env, device)
    if refusal:
        raise RunFolderBusy(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            if created:
                with contextlib.suppress(OSError):  # only succeeds when nothing was written
                    out.rmdir()


def _rank0_says(text: str, env: DistEnv, device: torch.device) -> str:
    """Rank 0's ``text``, on every rank."""
    if not env.is_distributed:
        return text
    nccl = dist.get_backend() == "nccl"
    if nccl and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL sends the object from the current device
    box = [text]
    dist.broadcast_object_list(box, src=0, device=device if nccl else None)
    return str(box[0])
