"""Who am I in a distributed job: rank, world size and rendezvous from torchrun or from Slurm.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``. A job
step started by ``srun`` without torchrun has Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID`` instead; its master is the step's first node and its port is derived from the
job id, so a requeued job (same id) meets at the same address. Anything else is one process.

``python -m hipt.distributed`` prints ``export MASTER_ADDR=... MASTER_PORT=...`` for a batch
script that starts torchrun on every node (``eval "$(python -m hipt.distributed)"``).

Examples
--------
>>> env = detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
...               "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[03-04]"})
>>> env.launcher, env.rank, env.world_size, env.master_addr, env.master_port
('slurm', 1, 4, 'gpu03', 21234)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["DistEnv", "detect", "first_node", "port_for_job", "init_process_group"]

# Ports 20000-39999: above the usual service ports, below Linux's ephemeral range (32768+ overlaps
# only partly, and a job id maps to one fixed port, so two jobs on a node rarely collide).
PORT_BASE = 20000
PORT_SPAN = 20000
DEFAULT_PORT = 29500  # torchrun's own default, for a single node without a job id


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and rendezvous of this process.

    ``launcher`` is ``"torchrun"``, ``"slurm"`` (srun without torchrun) or ``"single"``.
    """

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list (``"gpu[03-05,09],cpu1"`` → ``"gpu03"``).

    >>> first_node("node[007-009]"), first_node("a1,b2"), first_node("solo")
    ('node007', 'a1', 'solo')
    """
    text = nodelist.strip()
    found = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", text)
    if not found or not found.group(1):
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges = found.group(1), found.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is part of the name: keep it
    return prefix + first


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port that depends only on the job id (so a requeued job reuses it).

    >>> port_for_job(1234), port_for_job(21234)
    (21234, 21234)
    """
    digits = re.sub(r"\D", "", str(job_id))  # array jobs: "1234_5" → 12345
    if not digits:
        raise ValueError(f"Slurm job id {job_id!r} has no digits")
    return PORT_BASE + int(digits) % PORT_SPAN


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank and rendezvous from torchrun's variables, else from an srun step's, else one process.

    The batch script of a job also carries ``SLURM_PROCID`` (0) and ``SLURM_NTASKS``; only a job
    step (``SLURM_STEP_NUM_TASKS`` set by srun) counts as distributed, so ``hipt pretrain`` run
    straight from a batch script stays one process instead of waiting for peers that never start.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"]))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = env.get("SLURM_JOB_ID")
        return DistEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_node(nodes),
            master_port=int(env.get("MASTER_PORT") or (port_for_job(job) if job else DEFAULT_PORT)),
        )
    return DistEnv(launcher="single")


def init_process_group(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Join the process group of ``env`` (nothing to do for one process).

    ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (CUDA). The rendezvous is a TCP store at
    ``env.master_addr:env.master_port``, reached the same way whichever launcher started us.
    """
    if not env.is_distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _rendezvous_exports(environ: Mapping[str, str]) -> str:
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    job = environ.get("SLURM_JOB_ID")
    if not nodes or not job:
        return f"export MASTER_ADDR=127.0.0.1 MASTER_PORT={DEFAULT_PORT}"
    return f"export MASTER_ADDR={first_node(nodes)} MASTER_PORT={port_for_job(job)}"


if __name__ == "__main__":
    print(_rendezvous_exports(os.environ))
    sys.exit(0)
