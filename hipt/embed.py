"""``hipt embed``: every tiled region through ViT-256 and ViT-4K into ``features/<slide_id>.h5``.

Regions stream from the slides through a DataLoader (:mod:`hipt.embed_data`), are grouped into
batches that may span several small slides, go through the :class:`RegionEncoder` on the device,
and each row is routed to its slide's features file. A slide's file is written under a temporary
name and renamed when its last region is in, so a killed run leaves no file that looks complete.

A rerun skips every slide whose features file is valid and was made from the same tiles (hash of
the coordinates and tiling attrs), the same weights (SHA-256), the same normalisation and µm/px,
and holds the patch features if they are asked for; anything else is redone. ``--shard I/N``
restricts a run to the slides :mod:`hipt.shard` assigns to shard ``I``, so the tasks of a Slurm
job array never write the same slide. Every run records one row per slide in ``embedding.csv``
(``embedding.shard-I-of-N.csv`` for a shard): ok, skipped or failed, with the error.

Examples
--------
Embed a folder of tiles on the GPU (the released weights' file names)::

    hipt embed --tiles out/tiles --out out \\
        --vit256 checkpoints/vit256_small_dino.pth --vit4k checkpoints/vit4k_xs_dino.pth

The same from Python, with random weights for a dry run::

    from hipt.embed import embed_tiles
    summary = embed_tiles("out/tiles", "out", random_weights=True, device="cpu")
    print(summary.n_failed, summary.csv_path)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hipt import __version__
from hipt.atomic import write_text_atomic
from hipt.embed_data import RegionDataset, SlideJob, make_region_loader
from hipt.geometry import REGION_PX
from hipt.h5schema import FeaturesWriter, SchemaError, Tiles, read_tiles
from hipt.shard import Shard, resolve_shard, shard_items

__all__ = [
    "SlideResult",
    "EmbedSummary",
    "embed_tiles",
    "tiles_sha256",
    "features_attrs",
    "check_features",
    "list_tiles",
    "resolve_slide_path",
    "csv_name",
    "missing_weights_message",
    "read_embedding_csv",
    "add_arguments",
    "main",
]

CSV_FIELDS = (
    "slide_id",
    "status",
    "n_regions",
    "seconds",
    "regions_per_s",
    "error",
    "features_path",
)
RELEASED_FILES = {"vit256": "vit256_small_dino.pth", "vit4k": "vit4k_xs_dino.pth"}
# Attrs that must equal the current run's for an existing features file to be trusted.
MATCH_KEYS = (
    "slide_id",
    "vit256_sha256",
    "vit4k_sha256",
    "tiles_sha256",
    "target_mpp",
    "random_weights",
    "random_seed",
    "random_depth",
)


def _rel(target: Path) -> str:
    # Relative to the output root (features/<id>.h5), so the record survives moving the folder.
    return f"{target.parent.name}/{target.name}"


@dataclass
class SlideResult:
    """One row of ``embedding.csv``: what happened to one slide in this run.

    ``seconds`` is wall time from the slide's first region reaching the writer to its file being
    renamed into place; slides that share batches overlap, so per-slide rates do not add up to
    the run's rate. ``features_path`` is relative to the output root.
    """

    slide_id: str
    status: str  # "ok", "skipped" or "failed"
    n_regions: int = 0
    seconds: float = 0.0
    regions_per_s: float = 0.0
    error: str = ""
    features_path: str = ""


@dataclass
class EmbedSummary:
    """The result of :func:`embed_tiles`: one :class:`SlideResult` per slide of this shard."""

    results: list[SlideResult]
    csv_path: Path
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_ok(self) -> int:
        return self._count("ok")

    @property
    def n_skipped(self) -> int:
        return self._count("skipped")

    @property
    def n_failed(self) -> int:
        return self._count("failed")

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]


# ------------------------------------------------------------------------- provenance
def tiles_sha256(tiles: Tiles) -> str:
    """SHA-256 of a tiling: its ``coords`` (int64, row order) and its attrs.

    Any change to where regions are, in which order, or how the tiling was made (µm/px, level,
    segmentation parameters) changes the hash and so invalidates features made from it.
    """
    h = hashlib.sha256()
    coords = np.ascontiguousarray(np.asarray(tiles.coords, dtype="<i8"))
    h.update(f"coords{coords.shape}".encode())
    h.update(coords.tobytes())
    h.update(json.dumps(tiles.attrs, sort_keys=True, default=str).encode())
    return h.hexdigest()


def features_attrs(
    tiles: Tiles,
    provenance: dict[str, Any],
    *,
    tiles_hash: str | None = None,
    reader: str = "auto",
    precision: str = "fp32",
) -> dict[str, Any]:
    """The attrs a features file made from ``tiles`` with an encoder of ``provenance`` carries."""
    random = "random" in (provenance["vit256_sha256"], provenance["vit4k_sha256"])
    return {
        "slide_id": tiles.slide_id,
        "target_mpp": float(tiles.attrs["target_mpp"]),
        "mpp_level0": float(tiles.attrs["mpp_level0"]),
        "region_size": int(tiles.attrs.get("region_size", REGION_PX)),
        "vit256_sha256": str(provenance["vit256_sha256"]),
        "vit4k_sha256": str(provenance["vit4k_sha256"]),
        "mean": [float(v) for v in provenance["mean"]],
        "std": [float(v) for v in provenance["std"]],
        "hipt_version": __version__,
        "tiles_sha256": tiles_hash or tiles_sha256(tiles),
        "random_weights": bool(random),
        "random_seed": int(provenance.get("seed", 0)) if random else -1,
        # Depths of randomly initialised encoders ("12,6" is the real architecture).
        "random_depth": str(provenance.get("random_depth", "12,6")) if random else "",
        "reader": reader,
        "precision": precision,
    }


def check_features(
    path: str | os.PathLike, expected: dict[str, Any], *, patch_features: bool = True
) -> str | None:
    """Why the features file at ``path`` cannot be reused for ``expected`` attrs (None if it can).

    The file must pass the schema checks of :func:`hipt.inspect.inspect_file`, have as many rows
    as the tiling, match :data:`MATCH_KEYS`, ``mean`` and ``std``, and hold ``patch_features``
    when they are asked for (a file with them also serves a region-only run).
    """
    from hipt.inspect import inspect_file

    path = Path(path)
    if not path.exists():
        return "no features file"
    report = inspect_file(path)
    if not report.valid:
        return str(report.problem)
    attrs = report.attrs
    for key in MATCH_KEYS:
        have, want = attrs.get(key), expected.get(key)
        if isinstance(want, float) and isinstance(have, int | float):
            same = math.isclose(float(have), want, rel_tol=1e-9)
        else:
            same = have == want
        if not same:
            return f"{key} differs (file {have!r}, now {want!r})"
    for key in ("mean", "std"):
        have = np.asarray(attrs.get(key, []), dtype=float).ravel()
        want = np.asarray(expected[key], dtype=float).ravel()
        if have.shape != want.shape or not np.allclose(have, want, rtol=0, atol=1e-7):
            return f"{key} differs (file {have.tolist()}, now {want.tolist()})"
    names = {d.name for d in report.datasets}
    if patch_features and "patch_features" not in names:
        return "file has no patch_features (made with --no-patch-features)"
    return None


# ---------------------------------------------------------------------------- inputs
def list_tiles(tiles: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Tiles files of a folder (``*.h5``, sorted by name, temporary files left out) or a list."""
    if isinstance(tiles, str | os.PathLike):
        root = Path(tiles)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such tiles folder")
        return sorted(p for p in root.glob("*.h5") if not p.name.startswith("."))
    return [Path(p) for p in tiles]


def resolve_slide_path(
    tiles: Tiles, slide_dir: str | os.PathLike | None = None
) -> tuple[Path | None, list[Path]]:
    """Where the slide of ``tiles`` is: ``(path or None, places looked)``.

    ``slide_dir`` (``--slides``) wins, looked up by file name; then the recorded ``slide_path``
    as is (absolute, or relative to the working folder), then relative to the tiles file's
    folder and its parent (an output folder moved as a whole).
    """
    recorded = Path(str(tiles.attrs["slide_path"]))
    places: list[Path] = []
    if slide_dir is not None:
        places.append(Path(slide_dir) / recorded.name)
    places.append(recorded)
    if not recorded.is_absolute() and tiles.path is not None:
        places += [tiles.path.parent / recorded, tiles.path.parent.parent / recorded]
    for place in places:
        if place.is_file():
            return place, places
    return None, places


def csv_name(shard: Shard | None) -> str:
    """``embedding.csv``, or ``embedding.shard-I-of-N.csv`` for a shard of several."""
    return "embedding.csv" if shard is None or shard.count == 1 else f"embedding.{shard.tag}.csv"


def read_embedding_csv(path: str | os.PathLike) -> list[SlideResult]:
    """Rows of an ``embedding*.csv`` (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                SlideResult(
                    slide_id=row["slide_id"],
                    status=row["status"],
                    n_regions=int(row.get("n_regions") or 0),
                    seconds=float(row.get("seconds") or 0.0),
                    regions_per_s=float(row.get("regions_per_s") or 0.0),
                    error=row.get("error", ""),
                    features_path=row.get("features_path", ""),
                )
            )
    return rows


def _write_csv(path: Path, previous: list[SlideResult], results: Iterable[SlideResult]) -> None:
    # Rows of this run replace earlier rows of the same slide; other slides' rows are kept, so a
    # resumed or partial run (one --tiles file) does not erase the record of the others.
    merged = {r.slide_id: r for r in previous}
    merged.update({r.slide_id: r for r in results})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for slide_id in sorted(merged):
        row = asdict(merged[slide_id])
        row["seconds"] = f"{row['seconds']:.3f}"
        row["regions_per_s"] = f"{row['regions_per_s']:.4f}"
        writer.writerow(row)
    write_text_atomic(path, buf.getvalue())


def _drop_stale_temps(features_dir: Path, slide_id: str) -> None:
    # A killed run of this shard leaves ".<id>.h5.tmp-*"; nobody trusts it, but it takes space.
    # The id is escaped: "s[1]" must not match (and delete) the temporary file of slide "s1",
    # which another shard may be writing right now.
    for tmp in features_dir.glob(f".{glob.escape(slide_id)}.h5.tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu")
    return dev


def missing_weights_message(vit256: Any, vit4k: Any) -> str | None:
    """The error for runs without weights and without ``--random-weights`` (None when complete)."""
    missing = []
    if vit256 is None:
        missing.append(f"ViT-256 (--vit256 PATH, the released file is {RELEASED_FILES['vit256']})")
    if vit4k is None:
        missing.append(f"ViT-4K (--vit4k PATH, the released file is {RELEASED_FILES['vit4k']})")
    if not missing:
        return None
    return (
        "missing encoder weights: "
        + "; ".join(missing)
        + ". Put the checkpoint files somewhere readable (e.g. ./checkpoints/) and pass their paths,"
        " or pass --random-weights for a run with randomly initialised encoders (recorded in the"
        " features files)"
    )


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus - 1))


# ------------------------------------------------------------------------------ driver
class _Progress:
    """tqdm bar over regions (regions/s), quiet between updates when not on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and total:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=total,
                unit="region",
                desc="embed",
                file=sys.stderr,
                mininterval=0.5 if tty else 30.0,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Open:
    """A slide whose features file is being written."""

    writer: FeaturesWriter
    n_regions: int
    started: float
    written: int = 0


def embed_tiles(
    tiles: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vit256: str | os.PathLike | None = None,
    vit4k: str | os.PathLike | None = None,
    random_weights: bool = False,
    device: str | torch.device = "auto",
    batch_regions: int = 4,
    workers: int | None = None,
    shard: Shard | str | None = None,
    patch_features: bool = True,
    reader: str = "auto",
    overwrite: bool = False,
    slide_dir: str | os.PathLike | None = None,
    progress: bool = True,
    encoder: torch.nn.Module | None = None,
    provenance: dict[str, Any] | None = None,
    patch_batch: int = 256,
    random_depth: tuple[int, int] | None = None,
) -> EmbedSummary:
    """Embed tiled slides into ``<out>/features/<slide_id>.h5``; the engine of ``hipt embed``.

    Parameters
    ----------
    tiles : path-like or sequence of path-like
        A folder of ``tiles/<slide_id>.h5`` files, one such file, or a list of them.
    out : path-like
        Output root: features go to ``out/features/``, the run record to ``out/embedding*.csv``.
    vit256, vit4k : path-like, optional
        Encoder weights (released HIPT files or hipt pretraining output).
    random_weights : bool
        Allow running without weight files (randomly initialised, seeded); recorded in the files.
    device : str or torch.device
        ``"auto"`` (CUDA if available), ``"cuda"``, ``"cuda:1"`` or ``"cpu"``.
    batch_regions : int
        Regions per encoder call; regions of several slides may share one.
    workers : int, optional
        DataLoader worker processes reading slides (default: CPUs - 1, at most 16; 0 reads in
        this process).
    shard : Shard or str, optional
        Only the slides of this shard (``"I/N"``, ``"slurm"`` or a :class:`~hipt.shard.Shard`).
    patch_features : bool
        Store ``patch_features`` [M, 256, 384]; False writes region features only.
    reader : str
        Slide reader, ``"auto"``, ``"openslide"`` or ``"fast"``.
    overwrite : bool
        Redo every slide even if its features file could be reused.
    slide_dir : path-like, optional
        Folder holding the slides, if they moved since tiling (looked up by file name).
    progress : bool
        Show a progress bar (regions/s) and one line per slide on stderr.
    encoder, provenance : optional
        A ready :class:`~hipt.models.region_encoder.RegionEncoder` and its provenance dict
        (``vit256_sha256``, ``vit4k_sha256``, ``mean``, ``std``), instead of building one.
    patch_batch : int
        Patches per ViT-256 call when building the encoder here.
    random_depth : (int, int), optional
        Block counts of random ViT-256 / ViT-4K (default the real 12 and 6). Widths, and so
        the file schema, stay the same; only for cheap end-to-end checks with random weights.

    Returns
    -------
    EmbedSummary
        Per-slide results (ok / skipped / failed) and where the CSV was written.

    Raises
    ------
    ValueError
        Missing weights without ``random_weights``, or a bad ``shard``.
    """
    t_run = time.perf_counter()
    out = Path(out)
    features_dir = out / "features"
    shard = resolve_shard(shard) if isinstance(shard, str) else shard
    if batch_regions < 1:
        raise ValueError(f"batch_regions must be >= 1, got {batch_regions}")
    workers = _default_workers() if workers is None else int(workers)
    dev = _pick_device(device)
    paths = shard_items(list_tiles(tiles), shard, key=lambda p: p.stem)

    if encoder is None:
        if not random_weights:
            msg = missing_weights_message(vit256, vit4k)
            if msg:
                raise ValueError(msg)
        for name, path in (("--vit256", vit256), ("--vit4k", vit4k)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path}: no such weights file")
        from hipt.models.region_encoder import build_region_encoder

        kwargs: dict[str, Any] = {}
        if random_depth is not None:
            if not random_weights or vit256 is not None or vit4k is not None:
                raise ValueError(
                    "random_depth applies only to --random-weights without weight files"
                )
            kwargs = dict(
                vit256_kwargs=dict(depth=int(random_depth[0])),
                vit4k_kwargs=dict(depth=int(random_depth[1])),
            )
        encoder, provenance = build_region_encoder(
            vit256,
            vit4k,
            random_weights=random_weights,
            device=dev,
            patch_batch=patch_batch,
            **kwargs,
        )
        provenance = dict(provenance, seed=0)
        if random_depth is not None:
            provenance["random_depth"] = f"{int(random_depth[0])},{int(random_depth[1])}"
    else:
        if provenance is None:
            raise ValueError("pass the provenance dict of the encoder you pass")
        encoder = encoder.to(dev).eval()
    precision = "bf16-autocast" if dev.type == "cuda" else "fp32"

    # -- which slides: read every tiles file of this shard, decide skip / redo / fail.
    features_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out / csv_name(shard)
    previous = read_embedding_csv(csv_path)
    results: dict[str, SlideResult] = {}
    todo: list[tuple[SlideJob, dict[str, Any], Path]] = []

    def record(result: SlideResult) -> None:
        results[result.slide_id] = result
        _write_csv(csv_path, previous, results.values())

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr)

    def fail(slide_id: str, error: str, n_regions: int = 0) -> None:
        record(SlideResult(slide_id, "failed", n_regions=n_regions, error=error))
        say(f"{slide_id}: FAILED: {error}")

    for tiles_path in paths:
        slide_id = tiles_path.stem
        try:
            tiling = read_tiles(tiles_path)
        except SchemaError as exc:
            fail(slide_id, str(exc))
            continue
        if tiling.slide_id != slide_id:
            fail(
                slide_id,
                f"{tiles_path}: slide_id attr {tiling.slide_id!r} differs from the file name",
            )
            continue
        region_px = int(tiling.attrs.get("region_size", REGION_PX))
        if region_px != REGION_PX:
            # The encoder reads a 16x16 grid of 256 px patches; any other size would stop the
            # whole run inside the model with a shape error, not just this slide.
            err = (
                f"{tiles_path}: regions are {region_px} px; hipt embed needs {REGION_PX} px "
                f"regions (tile again with --region-px {REGION_PX})"
            )
            fail(slide_id, err, len(tiling))
            continue
        target = features_dir / f"{slide_id}.h5"
        expected = features_attrs(tiling, provenance, reader=reader, precision=precision)
        if not overwrite:
            why = check_features(target, expected, patch_features=patch_features)
            if why is None:
                results[slide_id] = SlideResult(
                    slide_id, "skipped", n_regions=len(tiling), features_path=_rel(target)
                )
                continue
            if target.exists():
                say(f"{slide_id}: redoing {target.name}: {why}")
        slide_path, looked = resolve_slide_path(tiling, slide_dir)
        if slide_path is None:
            err = (
                f"{tiles_path}: slide {tiling.attrs['slide_path']} not found (looked at "
                f"{', '.join(map(str, looked))}); pass --slides DIR"
            )
            fail(slide_id, err, len(tiling))
            continue
        job = SlideJob(
            slide_id=slide_id,
            slide_path=slide_path,
            coords=tiling.coords,
            target_mpp=float(tiling.attrs["target_mpp"]),
            mpp_level0=float(tiling.attrs["mpp_level0"]),
            region_px=region_px,
        )
        todo.append((job, expected, target))
    if results:
        _write_csv(csv_path, previous, results.values())

    # -- slides without regions get an empty (valid) file at once; the rest stream.
    jobs: list[tuple[SlideJob, dict[str, Any], Path]] = []
    for job, attrs, target in todo:
        _drop_stale_temps(features_dir, job.slide_id)
        if job.n_regions == 0:
            try:
                with FeaturesWriter(target, job.coords, attrs, patch_features=patch_features):
                    pass
            except Exception as exc:  # this slide fails, the others go on
                err = f"{target}: cannot create the features file: {exc}"
                record(SlideResult(job.slide_id, "failed", 0, error=err))
                say(f"{job.slide_id}: FAILED: {err}")
                continue
            record(SlideResult(job.slide_id, "ok", 0, 0.0, 0.0, "", _rel(target)))
        else:
            jobs.append((job, attrs, target))

    total = sum(j.n_regions for j, _, _ in jobs)
    bar = _Progress(total, progress)
    try:
        _stream(jobs, encoder, dev, batch_regions, workers, reader, patch_features, bar, record)
    finally:
        bar.close()

    ordered = [results[p.stem] for p in paths if p.stem in results]
    _write_csv(csv_path, previous, ordered)
    summary = EmbedSummary(ordered, csv_path, time.perf_counter() - t_run, dict(provenance))
    if progress:
        done = sum(r.n_regions for r in ordered if r.status == "ok")
        line = (
            f"embedded {summary.n_ok} slide(s), {done} region(s) in {summary.seconds:.1f} s; "
            f"skipped {summary.n_skipped}; failed {summary.n_failed}; record: {csv_path}"
        )
        print(line, file=sys.stderr)
        for r in summary.failed:
            print(f"  failed {r.slide_id}: {r.error}", file=sys.stderr)
    return summary


def _stream(
    jobs: list[tuple[SlideJob, dict[str, Any], Path]],
    encoder: torch.nn.Module,
    dev: torch.device,
    batch_regions: int,
    workers: int,
    reader: str,
    patch_features: bool,
    bar: _Progress,
    record: Any,
) -> None:
    """Read, batch, encode and write every region of ``jobs``; one failing slide stops only itself."""
    if not jobs:
        return
    cuda = dev.type == "cuda"
    dataset = RegionDataset([j for j, _, _ in jobs], reader=reader)
    loader = make_region_loader(dataset, workers=min(workers, len(dataset)), pin_memory=cuda)
    open_: dict[int, _Open] = {}
    failed: set[int] = set()
    pending: list[tuple[int, int, torch.Tensor]] = []

    def fail(k: int, message: str) -> None:
        failed.add(k)
        job, _, target = jobs[k]
        state = open_.pop(k, None)
        if state is not None:
            # Leaving the writer with an exception drops its temporary file.
            with contextlib.suppress(Exception):
                state.writer.__exit__(RuntimeError, RuntimeError(message), None)
        seconds = time.perf_counter() - state.started if state is not None else 0.0
        # Its regions will never be written; count them as done so the bar reaches the end.
        bar.update(job.n_regions - (state.written if state is not None else 0))
        record(SlideResult(job.slide_id, "failed", job.n_regions, seconds, 0.0, message, ""))
        bar.write(f"{job.slide_id}: FAILED: {message}")

    def flush() -> None:
        rows = [(k, r, px) for k, r, px in pending if k not in failed]
        pending.clear()
        if not rows:
            return
        # [B, H, W, 3] already on the device; the channels-first view costs no copy here (the
        # encoder's patch reordering copies once anyway).
        regions = torch.stack([px for _, _, px in rows]).permute(0, 3, 1, 2)
        with torch.inference_mode():
            patch, region = encoder(regions)
        region_np = region.float().cpu().numpy()
        patch_np = patch.to(torch.float16).cpu().numpy() if patch_features else None
        i = 0
        while i < len(rows):
            # A run of consecutive rows of one slide is one HDF5 write.
            k, start = rows[i][0], rows[i][1]
            j = i + 1
            while j < len(rows) and rows[j][0] == k and rows[j][1] == rows[j - 1][1] + 1:
                j += 1
            if k not in failed:
                state = open_[k]
                try:
                    state.writer.write(
                        start, None if patch_np is None else patch_np[i:j], region_np[i:j]
                    )
                    state.written += j - i
                    bar.update(j - i)
                    if state.written == state.writer.coords.shape[0]:
                        _finish(k, state)
                except Exception as exc:  # e.g. disk full: this slide fails, others go on
                    fail(k, f"{jobs[k][2]}: writing failed: {exc}")
            i = j

    def _finish(k: int, state: _Open) -> None:
        job, _, target = jobs[k]
        state.writer.__exit__(None, None, None)  # fsync + rename onto the final name
        del open_[k]
        seconds = time.perf_counter() - state.started
        rate = job.n_regions / seconds if seconds > 0 else 0.0
        record(SlideResult(job.slide_id, "ok", job.n_regions, seconds, rate, "", _rel(target)))
        bar.write(f"{job.slide_id}: {job.n_regions} region(s) in {seconds:.1f} s ({rate:.2f}/s)")

    try:
        for item in loader:
            k, row = int(item["job"]), int(item["row"])
            if k in failed:
                continue
            if item["error"]:
                fail(k, item["error"])
                continue
            if k not in open_:
                job, attrs, target = jobs[k]
                # The reader actually used ("auto" resolves per slide) is known once one is open.
                attrs = dict(attrs, reader=item["reader"] or attrs["reader"])
                writer = FeaturesWriter(target, job.coords, attrs, patch_features=patch_features)
                try:
                    writer.__enter__()  # creates the temporary file
                except Exception as exc:  # e.g. a name too long for the file system
                    if writer._ctx is not None:  # drop a temporary file it may have left
                        with contextlib.suppress(Exception):
                            writer._ctx.__exit__(type(exc), exc, None)
                    fail(k, f"{target}: cannot create the features file: {exc}")
                    continue
                open_[k] = _Open(writer, job.n_regions, time.perf_counter())
            pixels = item["pixels"]
            if cuda:
                pixels = pixels.to(dev, non_blocking=True)
            pending.append((k, row, pixels))
            if len(pending) >= batch_regions:
                flush()
        flush()
        for k in list(open_):  # only if the loader ended early; never trust a partial file
            fail(
                k, f"{jobs[k][2]}: only {open_[k].written} of {open_[k].n_regions} regions written"
            )
    except BaseException as exc:
        # Interrupted (Ctrl-C, encoder error): drop every unfinished temporary file, then re-raise.
        for state in open_.values():
            with contextlib.suppress(Exception):
                state.writer.__exit__(type(exc), exc, None)
        open_.clear()
        raise
    finally:
        dataset.close()


# --------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt embed``."""
    parser.add_argument(
        "--tiles",
        metavar="DIR",
        required=True,
        type=Path,
        help="folder of tiles/<slide_id>.h5 (or one file)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        type=Path,
        help="output root; features go to OUT/features/",
    )
    parser.add_argument(
        "--vit256", metavar="PATH", type=Path, help=f"ViT-256 weights ({RELEASED_FILES['vit256']})"
    )
    parser.add_argument(
        "--vit4k", metavar="PATH", type=Path, help=f"ViT-4K weights ({RELEASED_FILES['vit4k']})"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="allow randomly initialised encoders for missing weights (recorded in the files)",
    )
    parser.add_argument(
        "--device", metavar="DEVICE", default="auto", help="auto (default), cuda, cuda:N or cpu"
    )
    parser.add_argument(
        "--batch-regions",
        metavar="N",
        type=int,
        default=4,
        help="regions per encoder call (default 4)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=None,
        help="slide-reading worker processes (default: CPUs - 1, max 16)",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="I/N: embed only shard I of N (0-based), or 'slurm' for the array task",
    )
    parser.add_argument(
        "--no-patch-features", action="store_true", help="store region features only"
    )
    parser.add_argument(
        "--reader", default="auto", choices=["auto", "openslide", "fast"], help="slide reader"
    )
    parser.add_argument(
        "--slides",
        metavar="DIR",
        type=Path,
        default=None,
        help="folder of the slides, if they moved since tiling",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo slides even if their features are reusable"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar or per-slide lines"
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
    """Run ``hipt embed``: 0 when every slide is ok or skipped, 1 if any failed, 2 on bad usage."""
    try:
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
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"hipt embed: error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary.n_failed else 0
