"""``hipt embed``: its options and its entry point (exit 0 ok, 1 a slide failed, 2 bad usage)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hipt.embed.driver import RELEASED_FILES, embed_tiles
from hipt.faults import raise_on_sigterm

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt embed``."""
    parser.add_argument("--tiles", metavar="DIR", required=True, type=Path,
                        help="folder of tiles/<slide_id>.h5, the tiler's output root, or one file")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", required=True, type=Path,
                        help="output root; features go to OUT/features/")  # fmt: skip
    parser.add_argument("--vit256", metavar="PATH", type=Path,
                        help=f"ViT-256 weights ({RELEASED_FILES['vit256']})")  # fmt: skip
    parser.add_argument("--vit4k", metavar="PATH", type=Path,
                        help=f"ViT-4K weights ({RELEASED_FILES['vit4k']})")  # fmt: skip
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="allow randomly initialised encoders for missing weights (recorded in the files)",
    )
    parser.add_argument(
        "--device", metavar="DEVICE", default="auto", help="auto (default), cuda, cuda:N or cpu"
    )
    parser.add_argument("--batch-regions", metavar="N", type=int, default=4,
                        help="regions per encoder call (default 4)")  # fmt: skip
    parser.add_argument("--workers", metavar="N", type=int, default=None,
                        help="slide-reading worker processes (default: CPUs - 1, max 16)")  # fmt: skip
    parser.add_argument("--shard", metavar="I/N", default=None,
                        help="I/N: embed only shard I of N (0-based), or 'slurm' for the array task")  # fmt: skip
    parser.add_argument(
        "--no-patch-features", action="store_true", help="store region features only"
    )
    parser.add_argument(
        "--reader", default="auto", choices=["auto", "openslide", "fast"], help="slide reader"
    )
    parser.add_argument("--slides", metavar="DIR", type=Path, default=None,
                        help="folder of the slides, if they moved since tiling")  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="redo slides even if their features are reusable"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar or per-slide lines (failures and the summary are still printed)",
    )
    # Shallower random encoders (same widths, same file schema) for cheap end-to-end checks of
    # the pipeline itself; recorded in the random_depth attr. Not for real use, so not listed.
    parser.add_argument("--random-depth", type=_depths, default=None, help=argparse.SUPPRESS)


def _depths(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected two block counts, e.g. 2,1")
    return int(parts[0]), int(parts[1])


def main(args: argparse.Namespace) -> int:
    """Run ``hipt embed``: 0 when every slide is ok or skipped, 1 if any failed, 2 on bad usage.

    SIGTERM stops the run cleanly (see :mod:`hipt.faults`); :mod:`hipt.cli` turns it into exit
    143 and a full disk into exit 1 with one line.
    """
    try:
        with raise_on_sigterm():
            summary = embed_tiles(
                args.tiles,
                args.out,
                vit256=args.vit256,
                vit4k=args.vit4k,
                random_weights=args.random_weights,
                device=args.device,
                batch_regions=args.batch_regions,
                workers=args.workers,
                shard=args.shard,
                patch_features=not args.no_patch_features,
                reader=args.reader,
                overwrite=args.overwrite,
                slide_dir=args.slides,
                progress=not args.no_progress,
                random_depth=args.random_depth,
            )
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as exc:
        print(f"hipt embed: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 1 if summary.n_failed else 0
