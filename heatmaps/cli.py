"""``hipt heatmap``: attention overlays of a trained fold, for one slide or a folder of slides.

Examples
--------
One slide (its slide file found through the tiles file the features were made from)::

    hipt heatmap --run runs/lung/fold_0 --features out/features/S1.h5 --top-k 5

Every slide of a folder, or of the run's cohort; slides already rendered with the same inputs
are skipped, and ``heatmaps.csv`` records ok / skipped / failed per slide::

    hipt heatmap --run runs/lung/fold_0 --features out/features --out heatmaps
    hipt heatmap --run runs/lung/fold_0 --cohort --config heatmap.yaml --set smoothing.passes=4

Runs may share ``--out``: a slide is rendered under its lock, ``OUT/.<slide_id>.lock``
(:class:`hipt.runlock.ItemLock`); a slide another live run is rendering is left to it
(``locked``), a dead run's lock is taken over, only the holder removes a slide's leftover
temporary folders, and ``heatmaps.csv`` is merged under a file lock, one row per slide.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from heatmaps.config import ConfigError, HeatmapConfig, load_heatmap_config
from heatmaps.inputs import (
    InputError,
    TrainedFold,
    build_encoder,
    find_slide,
    load_fold,
    open_features,
)
from hipt.config import add_set_argument
from hipt.runlock import ItemLock, locked_file

__all__ = ["add_arguments", "main", "run_heatmaps"]

RECORD_CSV = "heatmaps.csv"


@dataclass
class SlideRecord:
    """One row of ``heatmaps.csv``."""

    slide_id: str
    status: str  # ok | skipped | failed | locked (another live run is rendering it)
    seconds: float = 0.0
    error: str = ""
    features_path: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt heatmap``."""
    parser.add_argument(
        "--run",
        required=True,
        type=Path,
        metavar="FOLD_DIR",
        help="a trained fold, runs/<cohort>/fold_k (from hipt train)",
    )
    parser.add_argument(
        "--features", type=Path, metavar="PATH", help="a features file, or a folder of them (batch)"
    )
    parser.add_argument(
        "--cohort",
        action="store_true",
        help="render every slide of the run's cohort CSV (features from the run's "
        "features folder, or --features DIR)",
    )
    parser.add_argument("--slide", type=Path, help="the slide file (default: from the provenance)")
    parser.add_argument(
        "--slides", type=Path, metavar="DIR", help="folder of the slides, if they moved"
    )
    parser.add_argument("--tiles", type=Path, metavar="DIR", help="folder of the tiles files")
    parser.add_argument(
        "--vit256", type=Path, metavar="PATH", help="ViT-256 weights the features were made with"
    )
    parser.add_argument(
        "--vit4k", type=Path, metavar="PATH", help="ViT-4K weights the features were made with"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="regions shown up close (default 5)"
    )
    parser.add_argument(
        "--levels", default=None, help="comma list of slide,region,token (default: all three)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("heatmaps"),
        help="output root; a slide goes to OUT/<slide_id>/ (default: heatmaps)",
    )
    parser.add_argument("--config", type=Path, help="YAML file of heatmap settings")
    add_set_argument(parser, "smoothing.passes=4")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="render again even if up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def _flags(args: argparse.Namespace) -> dict:
    flags: dict = {}
    if args.top_k is not None:
        flags["top_k"] = args.top_k
    if args.levels is not None:
        flags["levels"] = [s.strip() for s in args.levels.split(",") if s.strip()]
    if args.device is not None:
        flags["device"] = args.device
    if args.no_progress:
        flags["progress"] = False
    return flags


def _features_list(args: argparse.Namespace, fold: TrainedFold) -> list[Path]:
    if args.cohort:
        if fold.slide_ids is None:
            raise InputError(f"{fold.fold_dir.parent}: config.yaml names no readable cohort CSV")
        folder = args.features or fold.features_dir
        if folder is None or not Path(folder).is_dir():
            raise InputError("--cohort needs the run's features folder or --features DIR")
        return [Path(folder) / f"{s}.h5" for s in sorted(fold.slide_ids)]
    if args.features is None:
        raise InputError("pass --features FILE|DIR or --cohort")
    if args.features.is_dir():
        return sorted(p for p in args.features.glob("*.h5") if not p.name.startswith("."))
    return [args.features]


def _read_records(path: Path) -> dict[str, SlideRecord]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {
            r["slide_id"]: SlideRecord(**{**r, "seconds": float(r["seconds"] or 0)})
            for r in csv.DictReader(fh)
        }


def _merge_records(path: Path, mine: list[SlideRecord]) -> None:
    """Merge ``mine`` into ``heatmaps.csv`` under its file lock: one row per slide, none lost.

    A ``locked`` row never replaces a row already there: the run holding the slide records it.
    """
    from hipt.atomic import atomic_path

    with locked_file(path):
        records = _read_records(path)
        for r in mine:
            if r.status != "locked" or r.slide_id not in records:
                records[r.slide_id] = r
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(SlideRecord.__dataclass_fields__))
            w.writeheader()
            for r in records.values():
                w.writerow(asdict(r))


def _needs_encoder(fold: TrainedFold, cfg: HeatmapConfig) -> bool:
    tokens = "token" in cfg.levels and cfg.top_k > 0
    patches = "region" in cfg.levels and fold.input_key != "patch_features"
    return tokens or patches or cfg.smoothing.passes > 1


def _encoder_for(
    info, args: argparse.Namespace, fold: TrainedFold, cfg: HeatmapConfig, encoders: dict
) -> object | None:
    """The region encoder a render of this slide needs (None when it needs none)."""
    if not _needs_encoder(fold, cfg):
        return None
    # One encoder per set of weights, shared by the slides embedded with it.
    key = tuple(
        str(info.attrs.get(k))
        for k in ("vit256_sha256", "vit4k_sha256", "random_seed", "random_depth")
    )
    if key not in encoders:
        encoders[key] = build_encoder(
            info.attrs, args.vit256, args.vit4k, device=cfg.device, patch_batch=cfg.patch_batch
        )
    return encoders[key]


def _one_slide(
    path: Path,
    args: argparse.Namespace,
    fold: TrainedFold,
    cfg: HeatmapConfig,
    encoders: dict[tuple, object],
    say,
) -> SlideRecord:
    """Check, skip or render one features file; never raises (a failure is a record)."""
    from heatmaps.pipeline import SlideJob, features_sha256, fingerprint, is_rendered, render_slide
    from hipt.names import check_name

    t0 = time.perf_counter()
    slide_id = path.stem
    try:
        check_name(slide_id, "slide id")
        if not path.is_file():
            raise InputError(f"{path}: no features file")
        info = open_features(path, fold)
        slide_path = find_slide(info, args.slide, args.tiles, args.slides)
        job = SlideJob(info, slide_path, features_sha256(path))
        key = fingerprint(fold, job, cfg)
        if not args.overwrite and is_rendered(args.out / slide_id, key):
            say(f"{slide_id}: up to date, skipped")
            return SlideRecord(slide_id, "skipped", features_path=str(path))
        lock = ItemLock(args.out / f".{slide_id}.lock")
        if not lock.acquire():
            owner = lock.owner() or "another run"
            return SlideRecord(slide_id, "locked", 0.0, f"being rendered by {owner}", str(path))
        try:
            if lock.took_over is not None:
                say(
                    f"{slide_id}: took over the lock of {lock.took_over}, which is no longer running"
                )
            # The holder may have finished it between our first look and our lock.
            if not args.overwrite and is_rendered(args.out / slide_id, key):
                say(f"{slide_id}: rendered by another run meanwhile, skipped")
                return SlideRecord(slide_id, "skipped", features_path=str(path))
            encoder = _encoder_for(info, args, fold, cfg, encoders)
            render_slide(fold, job, encoder, cfg, args.out, say=say)
        finally:
            lock.release()
    except Exception as exc:  # one bad slide must not stop the batch
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, InputError | ValueError):
            line = f"{type(exc).__name__}: {line}"
        return SlideRecord(slide_id, "failed", round(time.perf_counter() - t0, 2), line, str(path))
    seconds = round(time.perf_counter() - t0, 2)
    say(f"{slide_id}: rendered in {seconds:.1f} s -> {args.out / slide_id}")
    return SlideRecord(slide_id, "ok", seconds, "", str(path))


def run_heatmaps(args: argparse.Namespace, cfg: HeatmapConfig) -> int:
    """Render every requested slide; 0 if all ok or skipped, 1 if any failed, 2 on bad input."""
    try:
        fold = load_fold(args.run, device=cfg.device)
        paths = _features_list(args, fold)
    except InputError as exc:
        print(f"hipt heatmap: {exc}", file=sys.stderr)
        return 2
    if args.slide is not None and len(paths) != 1:
        print("hipt heatmap: --slide goes with one features file", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out = args.out
    if (out / "__init__.py").exists():  # e.g. the default "heatmaps" run from a source checkout
        print(f"hipt heatmap: {out} is a Python package folder; pass --out DIR", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, SlideRecord] = {}  # this run's, merged into the CSV slide by slide
    encoders: dict[tuple, object] = {}

    bar = tqdm(paths, unit="slide", disable=not cfg.progress or len(paths) < 2, file=sys.stderr)
    say = (lambda line: bar.write(line, file=sys.stderr)) if cfg.progress else (lambda line: None)
    for path in bar:
        record = _one_slide(path, args, fold, cfg, encoders, say)
        records[record.slide_id] = record
        if record.status == "failed":
            print(f"{record.slide_id}: FAILED: {record.error}", file=sys.stderr)
        elif record.status == "locked":
            print(f"{record.slide_id}: left alone, {record.error}", file=sys.stderr)
        _merge_records(out / RECORD_CSV, [record])
    bar.close()
    _merge_records(out / RECORD_CSV, [])  # the record exists even when no slide was given
    this = [records[p.stem] for p in paths if p.stem in records]
    failed = [r for r in this if r.status == "failed"]
    n_ok = sum(r.status == "ok" for r in this)
    n_skip = sum(r.status == "skipped" for r in this)
    n_locked = sum(r.status == "locked" for r in this)
    print(
        f"hipt heatmap: {n_ok} rendered, {n_skip} skipped, {len(failed)} failed"
        + (f", {n_locked} left to other runs" if n_locked else "")
        + f"; record: {out / RECORD_CSV}",
        file=sys.stderr,
    )
    for r in failed:
        print(f"  failed {r.slide_id}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hipt heatmap``."""
    try:
        cfg = load_heatmap_config(args.config, args.overrides, _flags(args))
    except ConfigError as exc:
        print(f"hipt heatmap: {exc}", file=sys.stderr)
        return 2
    return run_heatmaps(args, cfg)
