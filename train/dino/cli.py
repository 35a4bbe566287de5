"""``hipt pretrain stage1|stage2``: DINO pretraining of ViT-256 (stage 1) or ViT-4K (stage 2).

Run it as it is on one process, under ``torchrun --nproc_per_node=K`` or under ``srun`` (one task
per device); the same command resumes from ``OUT/checkpoint.pth``. Exit codes: 0 finished (or
stopped at ``train.stop_at_step``), 3 stopped by SIGTERM/SIGUSR1 after saving (requeue and run
again), 2 bad configuration or data, or an output folder another live ``hipt pretrain`` is
writing (nothing trained, nothing in it touched), 1 a failure during training.
"""

from __future__ import annotations

import argparse
import sys

from hipt.config import add_set_argument
from hipt.distributed import detect

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt pretrain``."""
    parser.add_argument(
        "stage", choices=["stage1", "stage2"], help="stage1: ViT-256; stage2: ViT-4K"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config (see train/configs/dino_*.yaml)"
    )
    add_set_argument(parser, "optim.lr=0.0005")
    parser.add_argument("--out", metavar="DIR", help="output folder (config key 'out')")
    parser.add_argument(
        "--resume", metavar="PATH", help="resume from this checkpoint (default OUT/checkpoint.pth)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``hipt pretrain``; see the module docstring for the exit codes."""
    from hipt.models.checkpoint import CheckpointError
    from train.dino.config import ConfigError, load_stage_config
    from train.dino.data import DataError
    from train.dino.engine import EXIT_PREEMPTED, pretrain

    env = detect()
    flags: dict = {}
    if args.out:
        flags["out"] = args.out
    if args.resume:
        flags["resume"] = args.resume
    if args.no_progress:
        flags["train"] = {"progress": False}
    try:
        cfg = load_stage_config(args.stage, args.config, args.overrides, flags)
        outcome = pretrain(cfg, env)
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        where = f"[rank {env.rank}] " if env.is_distributed else ""
        print(f"hipt pretrain: error: {where}{exc}", file=sys.stderr)
        return 2
    if env.is_main:
        print(
            f"hipt pretrain {args.stage}: {outcome.status} at step {outcome.step}/"
            f"{outcome.total_steps}; weights in {outcome.out / 'teacher.pth'}",
            file=sys.stderr,
        )
    return EXIT_PREEMPTED if outcome.status == "preempted" else 0
