"""The driver of ``hipt embed``: build the encoder, plan the slides, stream, record, summarise."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hipt.embed.plan import EmbedJob, PlanSettings, features_rel, list_tiles, plan_slide
from hipt.embed.records import EmbedSummary, RunRecord, SlideResult, csv_name
from hipt.embed.stream import StreamSettings, stream_regions
from hipt.faults import Terminated
from hipt.h5schema import FeaturesWriter
from hipt.shard import Shard, resolve_shard, shard_items

__all__ = ["embed_tiles", "missing_weights_message", "RELEASED_FILES", "check_out_dir"]

RELEASED_FILES = {"vit256": "vit256_small_dino.pth", "vit4k": "vit4k_xs_dino.pth"}


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


def check_out_dir(out: Path) -> None:
    """Raise ``NotADirectoryError`` (one line) when ``out`` or ``out/features`` is not a folder."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"--out {out}: is a file; pass a folder (features go to OUT/features/)"
        )
    features = out / "features"
    if features.exists() and not features.is_dir():
        raise NotADirectoryError(
            f"--out {out}: {features} is a file, not the features folder; move it away or pass "
            "another --out"
        )


def _pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu")
    return dev


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus - 1))


def _build_encoder(
    vit256: Any, vit4k: Any, random_weights: bool, dev: torch.device, patch_batch: int,
    random_depth: tuple[int, int] | None,
) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
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
            raise ValueError("random_depth applies only to --random-weights without weight files")
        kwargs = dict(
            vit256_kwargs=dict(depth=int(random_depth[0])),
            vit4k_kwargs=dict(depth=int(random_depth[1])),
        )
    encoder, provenance = build_region_encoder(
        vit256, vit4k, random_weights=random_weights, device=dev, patch_batch=patch_batch, **kwargs
    )
    provenance = dict(provenance, seed=0)
    if random_depth is not None:
        provenance["random_depth"] = f"{int(random_depth[0])},{int(random_depth[1])}"
    return encoder, provenance


class _Progress:
    """tqdm bar over regions (regions/s), quiet between updates when not on a terminal.

    Failure lines always reach stderr, with or without the bar (``--no-progress`` hides only
    progress), so a Slurm log shows every failed slide.
    """

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
        elif self.enabled or "FAILED" in line:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Run:
    """What one call of :func:`embed_tiles` works with."""

    paths: list[Path]
    features_dir: Path
    record: RunRecord
    progress: bool

    def say(self, line: str) -> None:
        if self.progress or "FAILED" in line:
            print(line, file=sys.stderr)


def _plan(run: _Run, settings: PlanSettings) -> list[EmbedJob]:
    todo: list[EmbedJob] = []
    try:
        for tiles_path in run.paths:
            decision = plan_slide(tiles_path, settings)
            if isinstance(decision, EmbedJob):
                todo.append(decision)
                continue
            run.record.add(decision, write=False)
            if decision.status == "failed":
                run.say(f"{decision.slide_id}: FAILED: {decision.error}")
            elif decision.status == "locked":
                run.say(f"{decision.slide_id}: left alone, {decision.error}")
    except BaseException:  # SIGTERM or Ctrl-C while planning: give back the locks taken so far
        for job in todo:
            if job.lock is not None:
                job.lock.release()
        raise
    finally:
        run.record.flush()
    return todo


def _write_empty(job: EmbedJob, patch_features: bool) -> SlideResult:
    # A slide without regions gets an empty (valid) file at once.
    try:
        with FeaturesWriter(job.target, job.job.coords, job.attrs, patch_features=patch_features):
            pass
    except Exception as exc:  # this slide fails, the others go on
        err = f"{job.target}: cannot create the features file: {exc}"
        return SlideResult(job.job.slide_id, "failed", 0, error=err)
    finally:
        if job.lock is not None:
            job.lock.release()
    return SlideResult(job.job.slide_id, "ok", 0, features_path=features_rel(job.target))


def _summarise(run: _Run, t_run: float, provenance: dict[str, Any]) -> EmbedSummary:
    results = run.record.results
    ordered = [results[p.stem] for p in run.paths if p.stem in results]
    summary = EmbedSummary(ordered, run.record.path, time.perf_counter() - t_run, dict(provenance))
    done = sum(r.n_regions for r in ordered if r.status == "ok")
    line = (
        f"embedded {summary.n_ok} slide(s), {done} region(s) in {summary.seconds:.1f} s; "
        f"skipped {summary.n_skipped}; failed {summary.n_failed}"
        + (f"; left to other runs {summary.n_locked}" if summary.n_locked else "")
        + f"; record: {run.record.path}"
    )
    print(line, file=sys.stderr)
    for r in summary.failed:
        print(f"  failed {r.slide_id}: {r.error}", file=sys.stderr)
    return summary


def _say_terminated(run: _Run, todo: list[EmbedJob]) -> None:
    done = [j.job.slide_id for j in todo if run.record.results.get(j.job.slide_id, None)
            and run.record.results[j.job.slide_id].status == "ok"]  # fmt: skip
    left = [j.job.slide_id for j in todo if j.job.slide_id not in done]
    print(
        f"hipt embed: terminated: {len(done)} slide(s) finished this run"
        + (f" ({', '.join(done[:10])}{', ...' if len(done) > 10 else ''})" if done else "")
        + f", {len(left)} not finished (their temporary files were removed); rerun to resume",
        file=sys.stderr,
    )


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
        A folder of ``tiles/<slide_id>.h5`` files (or the tiler's output root holding
        ``tiles/``), one such file, or a list of them.
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
        Slide reader, ``"auto"``, ``"openslide"`` or ``"fast"``; recorded, and part of the
        reuse check.
    overwrite : bool
        Redo every slide even if its features file could be reused.
    slide_dir : path-like, optional
        Folder holding the slides, if they moved since tiling (looked up by file name).
    progress : bool
        Show a progress bar (regions/s) and one line per slide on stderr; failures and the
        final summary are printed either way.
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
        Per-slide results (ok / skipped / failed / locked) and where the CSV was written.

    Raises
    ------
    ValueError
        Missing weights without ``random_weights``, a bad ``shard``, or no tiles files found.
    hipt.faults.DiskFull
        The output's file system is full (every finished file stays intact).
    hipt.faults.Terminated
        SIGTERM inside :func:`hipt.faults.raise_on_sigterm`, after cleaning up.

    Examples
    --------
    >>> summary = embed_tiles("out/tiles", "out", random_weights=True)  # doctest: +SKIP
    >>> summary.n_failed, summary.csv_path  # doctest: +SKIP
    (0, PosixPath('out/embedding.csv'))
    """
    # Long only by its parameter docs: the body is the run's outline, each step a function.
    t_run = time.perf_counter()
    out = Path(out)
    check_out_dir(out)
    shard = resolve_shard(shard) if isinstance(shard, str) else shard
    if batch_regions < 1:
        raise ValueError(f"batch_regions must be >= 1, got {batch_regions}")
    workers = _default_workers() if workers is None else int(workers)
    dev = _pick_device(device)
    paths = shard_items(list_tiles(tiles), shard, key=lambda p: p.stem)
    if encoder is None:
        encoder, provenance = _build_encoder(
            vit256, vit4k, random_weights, dev, patch_batch, random_depth
        )
    elif provenance is None:
        raise ValueError("pass the provenance dict of the encoder you pass")
    else:
        encoder = encoder.to(dev).eval()
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(paths, features_dir, RunRecord(out / csv_name(shard)), progress)
    plan = PlanSettings(
        features_dir, provenance, reader=reader,
        precision="bf16-autocast" if dev.type == "cuda" else "fp32",
        patch_features=patch_features, overwrite=overwrite,
        slide_dir=None if slide_dir is None else Path(slide_dir), say=run.say,
    )  # fmt: skip
    todo = _plan(run, plan)
    try:
        _embed(
            run, todo, encoder, dev, StreamSettings(batch_regions, workers, reader, patch_features)
        )
    except Terminated:
        _say_terminated(run, todo)
        raise
    finally:
        for job in todo:
            if job.lock is not None:
                job.lock.release()
    return _summarise(run, t_run, provenance)


def _embed(run: _Run, todo: list[EmbedJob], encoder: torch.nn.Module, dev: torch.device,
           settings: StreamSettings) -> None:  # fmt: skip
    streaming = []
    for job in todo:
        if job.job.n_regions:
            streaming.append(job)
        else:
            result = _write_empty(job, settings.patch_features)
            run.record.add(result)
            if result.status == "failed":
                run.say(f"{result.slide_id}: FAILED: {result.error}")
    bar = _Progress(sum(j.job.n_regions for j in streaming), run.progress)
    try:
        stream_regions(streaming, encoder, dev, settings, bar, run.record.add)
    finally:
        bar.close()
