"""``hipt tile``: segment tissue and cut slides into 4096 px regions.

Writes ``OUT/tiles/<slide_id>.h5``, ``OUT/qc/<slide_id>.png`` and ``OUT/tiling.csv``. Exit code 0
when every slide is tiled (or skipped, or left to another live run tiling it into ``OUT``), 1 when
any slide failed, 2 when the output folder cannot be written.
"""

from __future__ import annotations

import argparse
import math
import sys

from hipt.geometry import PATCH_PX, REGION_PX
from hipt.readers import READERS
from hipt.readers.base import EDGE_FILLS
from hipt.shard import resolve_shard
from hipt.slide import PLAUSIBLE_MPP
from preprocessing.tiler import (
    MAX_SLIDE_PX,
    Terminated,
    TileResult,
    TileSettings,
    terminate_on_sigterm,
    tile_batch,
)
from preprocessing.tissue import SegmentationParams


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _positive(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _mpp(text: str) -> float:
    """A µm/px a scan or a region can really have."""
    value = _positive(text)
    lo, hi = PLAUSIBLE_MPP
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{text} µm/px is implausible; slides and regions are {lo:g}-{hi:g} µm/px "
            "(0.25 is 40x, 0.5 is 20x)"
        )
    return value


def _region_px(text: str) -> int:
    value = _positive_int(text)
    if value % PATCH_PX:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of the {PATCH_PX} px patch, got {text}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt tile``."""
    # A flat list of flags, one call each: long, but nothing to split.
    parser.add_argument(
        "inputs", nargs="+", metavar="SLIDES_OR_DIRS", help="slide files or folders of slides"
    )
    parser.add_argument("--out", required=True, help="output folder (tiles/, qc/, tiling.csv)")
    parser.add_argument(
        "--target-mpp", type=_mpp, default=0.5, help="µm/px of the regions (default 0.5)"
    )
    parser.add_argument(
        "--region-px",
        type=_region_px,
        default=REGION_PX,
        help=f"region side in px at --target-mpp (default {REGION_PX})",
    )
    parser.add_argument(
        "--min-tissue",
        type=_fraction,
        default=0.25,
        help="minimum tissue fraction of a region (default 0.25)",
    )
    parser.add_argument(
        "--mpp",
        type=_mpp,
        default=None,
        help="level-0 µm/px of every slide, overriding the metadata",
    )
    parser.add_argument(
        "--trust-metadata",
        action="store_true",
        help="accept a µm/px that disagrees with the objective power by more than 1.5x",
    )
    parser.add_argument(
        "--reader", choices=READERS, default="auto", help="pixel reader (default auto)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="slides tiled in parallel (processes)"
    )
    parser.add_argument(
        "--seg-mpp",
        type=_mpp,
        default=SegmentationParams.seg_mpp,
        help="µm/px of the segmentation image",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="decode every kept region once, so unreadable tiles fail the slide now (slow)",
    )
    parser.add_argument(
        "--allow-upsampling",
        action="store_true",
        help="tile slides scanned coarser than --target-mpp (regions are upsampled; the factor "
        "is recorded); without it such slides fail",
    )
    parser.add_argument(
        "--edge-fill",
        choices=sorted(EDGE_FILLS),
        default="white",
        help="what regions show past the slide edge (default white, like glass; CLAM and "
        "TRIDENT use black)",
    )
    parser.add_argument(
        "--max-slide-px",
        type=_positive_int,
        default=MAX_SLIDE_PX,
        help=f"refuse slides claiming more level-0 pixels (default {MAX_SLIDE_PX:.0e})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo slides whose tiles file is already complete"
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="tile only shard I of N of the slides (0-based), or 'slurm' for this array task",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def summary(results: list[TileResult]) -> str:
    """A short text summary: counts by status, then every failed or skipped-with-reason slide."""
    statuses = ("ok", "skipped", "failed", "not_processed", "locked")
    counts = {s: sum(r.status == s for r in results) for s in statuses}
    regions = sum(r.n_regions for r in results if r.status in ("ok", "skipped"))
    lines = [
        f"tiled {counts['ok']} slide(s), skipped {counts['skipped']}, failed {counts['failed']}, "
        f"not processed {counts['not_processed']}"
        + (f", left to other runs {counts['locked']}" if counts["locked"] else "")
        + f"; {regions} regions in total"
    ]
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines.append("failed:")
        lines += [f"  {r.slide_id}: {r.error}" for r in failed]
    noted = [r for r in results if r.status in ("skipped", "not_processed", "locked") and r.error]
    if noted:
        lines.append("not processed:")
        lines += [f"  {r.slide_id}: {r.error}" for r in noted]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run ``hipt tile``; returns the exit code."""
    from pathlib import Path

    settings = TileSettings(
        target_mpp=args.target_mpp,
        region_px=args.region_px,
        min_tissue=args.min_tissue,
        mpp=args.mpp,
        trust_metadata=args.trust_metadata,
        reader=args.reader,
        seg=SegmentationParams(seg_mpp=args.seg_mpp),
        verify=args.verify,
        allow_upsampling=args.allow_upsampling,
        edge_fill=args.edge_fill,
        max_slide_px=args.max_slide_px,
    )
    out = Path(args.out)
    try:
        shard = resolve_shard(args.shard)
    except ValueError as exc:
        print(f"hipt tile: {exc}", file=sys.stderr)
        return 2
    finished: list[TileResult] = []
    terminate_on_sigterm()
    record = "tiling.csv" if shard is None else f"tiling.{shard.tag}.csv"
    try:
        results = tile_batch(
            args.inputs,
            out,
            settings,
            workers=max(1, args.workers),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            shard=shard,
            on_result=finished.append,
        )
    except OSError as exc:
        print(f"hipt tile: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        # Slurm preemption or scancel: the workers are stopped and the record is written, so
        # the same command (requeued) resumes with the slides that did not finish.
        print(
            f"hipt tile: stopped by SIGTERM after {len(finished)} slide(s) finished; "
            f"they are recorded in {out / record}; run the same command to go on",
            file=sys.stderr,
        )
        print(summary(finished))
        return 143
    print(summary(results))
    print(f"wrote {out / record}")
    return 1 if any(r.status == "failed" for r in results) else 0
