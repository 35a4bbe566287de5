"""``hipt export``: hipt's outputs in the layouts of other tools.

``hipt export trident`` writes TRIDENT's coordinate and features files (:mod:`hipt.export.trident`).
CLAM needs no export: features files carry the ``features`` dataset and the ``coords`` ``name``
attr its loaders read (see the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt export``."""
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    trident = sub.add_parser("trident", help="TRIDENT's patches/ and features_<encoder>/ layout")
    trident.add_argument("--tiles", metavar="DIR", required=True, type=Path,
                         help="folder of tiles/<slide_id>.h5 (or the tiler's output root)")  # fmt: skip
    trident.add_argument("--out", metavar="DIR", required=True, type=Path,
                         help="where patches/ and features_hipt_vit4k/ go")  # fmt: skip
    trident.add_argument("--features", metavar="DIR", type=Path, default=None,
                         help="hipt features folder (default: features/ beside the tiles folder)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Run ``hipt export``: 0 when every slide was exported, 1 if any failed, 2 on bad usage."""
    from hipt.export.trident import export_trident

    try:
        results = export_trident(args.tiles, args.out, args.features)
    except FileNotFoundError as exc:
        print(f"hipt export: error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"{r.slide_id}: FAILED: {r.error}", file=sys.stderr)
    n_features = sum(r.features is not None for r in results)
    print(
        f"exported {len(results) - len(failed)} slide(s) to {args.out} ({n_features} with "
        f"features); failed {len(failed)}",
        file=sys.stderr,
    )
    return 1 if failed else 0
