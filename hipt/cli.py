"""The ``hipt`` command. Each subcommand lives in its own module, imported only when it runs.

A subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Stage modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "tile": ("preprocessing.cli", "segment tissue and cut slides into 4096 px regions"),
    "embed": ("hipt.embed", "embed tiled regions with ViT-256 and ViT-4K into features/*.h5"),
    "train": ("train.cli", "slide-level subtyping or survival, k-fold by case"),
    "pretrain": ("train.dino.cli", "DINO pretraining of ViT-256 (stage1) or ViT-4K (stage2)"),
    "inspect": (
        "hipt.inspect",
        "print the schema, shapes and provenance of a tiles or features file",
    ),
    "heatmap": (
        "heatmaps.cli",
        "attention overlays of a trained fold: PNG, OME-Zarr and QuPath GeoJSON",
    ),
    "demo": ("hipt.demo", "run the pipeline on a small generated cohort"),
    "slurm": ("hipt.slurm", "submit the stages as chained Slurm jobs, or report their progress"),
}


def _top_parser() -> argparse.ArgumentParser:
    from hipt import __version__

    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="hipt",
        description="Hierarchical Image Pyramid Transformer for whole-slide images.",
        epilog=f"commands:\n{lines}\n\nRun 'hipt COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hipt {__version__}")
    p.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hipt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version
        top.print_help()
        return 2
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}")
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"hipt {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
