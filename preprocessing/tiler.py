"""Cut slides into 4096 px regions at a target µm/px.

For each slide: segment tissue on a low-resolution level, lay a grid of regions (``region_px`` at
``target_mpp``) over the tissue bounding box, keep regions whose tissue fraction reaches
``min_tissue``, and write ``tiles/<slide_id>.h5``, ``qc/<slide_id>.png``; a batch also writes
``tiling.csv``. Only low-resolution levels are read, so tiling time does not grow with the slide.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

import hipt
from hipt.atomic import atomic_path, write_text_atomic
from hipt.geometry import PATCH_PX, REGION_PX, TOKEN_PX
from hipt.h5schema import SchemaError, read_tiles, write_tiles
from hipt.readers import SlideReadError
from hipt.shard import Shard, shard_items
from hipt.slide import Slide
from preprocessing.tissue import SegmentationParams, TissueMask, segment_tissue

# Suffixes picked up when a folder is given. DICOM is left out on purpose: one DICOM slide is a
# folder of many .dcm files, so pass one of its files explicitly.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
)
CSV_COLUMNS = (
    "slide_id",
    "slide_path",
    "status",
    "n_regions",
    "mpp_level0",
    "mpp_source",
    "seconds",
    "error",
)


@dataclass(frozen=True)
class TileSettings:
    """Everything that decides a slide's tiles; recorded in, and compared with, each tiles file.

    Attributes
    ----------
    target_mpp : float
        µm/px of the regions.
    region_px : int
        Region side in pixels at ``target_mpp``.
    min_tissue : float
        Keep a region when at least this fraction of it is tissue.
    mpp : float or None
        Level-0 µm/px to use instead of the metadata (``--mpp``).
    trust_metadata : bool
        Accept a µm/px that disagrees with the objective power.
    reader : str
        ``auto``, ``openslide`` or ``fast``.
    seg : SegmentationParams
        Tissue segmentation parameters.
    verify : bool
        Decode every kept region once at the read level, so a slide with an unreadable tile
        fails now rather than at embedding time (slow: reads the pixels the embedder will).
    """

    target_mpp: float = 0.5
    region_px: int = REGION_PX
    min_tissue: float = 0.25
    mpp: float | None = None
    trust_metadata: bool = False
    reader: str = "auto"
    seg: SegmentationParams = field(default_factory=SegmentationParams)
    verify: bool = False

    def as_attrs(self) -> dict[str, Any]:
        """The settings as tiles-file attrs (those that change the result)."""
        return {
            "target_mpp": float(self.target_mpp),
            "region_size": int(self.region_px),
            "min_tissue": float(self.min_tissue),
            "mpp_override": "none" if self.mpp is None else float(self.mpp),
            "trust_metadata": int(self.trust_metadata),
            "verified": int(self.verify),
            **self.seg.as_attrs(),
        }


@dataclass
class TileResult:
    """One row of ``tiling.csv``."""

    slide_id: str
    slide_path: str
    status: str  # ok | failed | skipped
    n_regions: int = 0
    mpp_level0: float | None = None
    mpp_source: str = ""
    seconds: float = 0.0
    error: str = ""
    duplicate: bool = False  # the same file given again: reported, but no row of its own

    def row(self) -> dict[str, str]:
        d = asdict(self)
        d["mpp_level0"] = "" if self.mpp_level0 is None else f"{self.mpp_level0:.6g}"
        d["seconds"] = f"{self.seconds:.3f}"
        return {k: str(d[k]) for k in CSV_COLUMNS}


@dataclass
class RegionGrid:
    """Kept regions of one slide: level-0 top-left corners and tissue fractions."""

    coords: np.ndarray  # int64 [N, 2]
    tissue_fraction: np.ndarray  # float32 [N]
    region_size_level0: int
    origin_level0: tuple[int, int]
    grid_shape: tuple[int, int]  # (rows, cols)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------- geometry
def region_grid(
    tissue: TissueMask,
    region_size_level0: int,
    min_tissue: float,
) -> RegionGrid:
    """Lay a grid of square regions over the tissue and keep the tissue-rich ones.

    The grid starts at the top-left of the tissue bounding box and covers the whole box, so
    regions may extend past the slide edge (they are read as white). A region is kept when it
    holds tissue and its tissue fraction is at least ``min_tissue``; in addition every tissue fragment that no kept
    region touches keeps the region holding most of it, so a biopsy smaller than a region still
    yields a region.

    Parameters
    ----------
    tissue : TissueMask
        Mask and its level-0 downsample.
    region_size_level0 : int
        Region side in level-0 pixels.
    min_tissue : float
        Minimum tissue fraction of a kept region.

    Returns
    -------
    RegionGrid
        Kept regions in row-major grid order.
    """
    mask = tissue.mask
    ds = tissue.downsample
    x0, y0, x1, y1 = tissue.bbox_level0()
    r = int(region_size_level0)
    cols = max(1, math.ceil((x1 - x0) / r))
    rows = max(1, math.ceil((y1 - y0) / r))

    def edges(start: int, n: int) -> np.ndarray:
        return np.rint((start + np.arange(n + 1) * r) / ds).astype(np.int64)

    # Each region's cell in mask pixels is [ex[i], ex[i+1]) x [ey[j], ey[j+1]); the grid covers
    # the tissue box, so every tissue pixel falls in one cell. Area outside the mask is glass.
    ex, ey = edges(x0, cols), edges(y0, rows)
    ncell = rows * cols
    ys, xs = np.nonzero(mask)
    cell = (np.searchsorted(ey, ys, side="right") - 1) * cols + (
        np.searchsorted(ex, xs, side="right") - 1
    )
    sums = np.bincount(cell, minlength=ncell).reshape(rows, cols)
    area = np.outer(np.diff(ey), np.diff(ex)).astype(np.float64)
    fraction = sums / np.maximum(area, 1)
    # A region without any tissue is never kept, even with min_tissue 0.
    keep = (fraction >= min_tissue) & (sums > 0)

    # Fragments no kept region touches get the region holding most of them.
    labels, n = ndimage.label(mask)
    if n:
        lab = labels[ys, xs]
        counts = np.bincount(lab * ncell + cell, minlength=(n + 1) * ncell).reshape(n + 1, ncell)
        kept_flat = keep.ravel()
        for frag in range(1, n + 1):
            touched = counts[frag] > 0
            if touched.any() and not (touched & kept_flat).any():
                kept_flat[int(np.argmax(counts[frag]))] = True
        keep = kept_flat.reshape(rows, cols)

    jj, ii = np.nonzero(keep)  # row-major
    coords = np.stack([x0 + ii * r, y0 + jj * r], axis=1).astype(np.int64).reshape(-1, 2)
    return RegionGrid(
        coords=coords,
        tissue_fraction=fraction[jj, ii].astype(np.float32),
        region_size_level0=r,
        origin_level0=(x0, y0),
        grid_shape=(rows, cols),
    )


def verify_regions(
    slide: Slide, coords: np.ndarray, region_level0: float, level: int, chunk_px: int = 4096
) -> None:
    """Decode each region at ``level`` in chunks; raise ``SlideReadError`` naming the region."""
    ds = slide.level_downsamples[level]
    n = int(math.ceil(region_level0 / ds))
    for x, y in coords.tolist():
        for cy in range(0, n, chunk_px):
            for cx in range(0, n, chunk_px):
                try:
                    slide.read_level(
                        level,
                        int(x + cx * ds),
                        int(y + cy * ds),
                        min(chunk_px, n - cx),
                        min(chunk_px, n - cy),
                    )
                except SlideReadError as exc:
                    raise SlideReadError(
                        f"{_one_line(str(exc))} (verifying the region at level-0 ({x}, {y}))"
                    ) from None


# ---------------------------------------------------------------------------------- outputs
def qc_image(tissue: TissueMask, grid: RegionGrid) -> Image.Image:
    """The thumbnail with the tissue outline (green) and kept regions (blue) drawn on it."""
    img = tissue.image.copy()
    outline = tissue.mask & ~ndimage.binary_erosion(tissue.mask, iterations=1)
    outline = ndimage.binary_dilation(outline, iterations=1 if max(img.shape) < 1500 else 2)
    img[outline] = (0, 170, 0)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    d = tissue.downsample
    width = max(1, round(max(img.shape) / 400))
    for (x, y), frac in zip(grid.coords, grid.tissue_fraction, strict=True):
        box = (
            x / d,
            y / d,
            (x + grid.region_size_level0) / d - 1,
            (y + grid.region_size_level0) / d - 1,
        )
        draw.rectangle(box, outline=(20, 60, 230), width=width)
        draw.text((box[0] + 3 * width, box[1] + 2 * width), f"{frac:.2f}", fill=(20, 60, 230))
    return im


def write_png_atomic(image: Image.Image, path: Path) -> None:
    """Save a PNG under a temporary name and rename it."""
    with atomic_path(path) as tmp:
        # Light compression: a QC image is looked at, not archived; level 1 is ~6x faster.
        image.save(tmp, format="PNG", compress_level=1)


def write_csv_atomic(results: Sequence[TileResult], path: Path) -> None:
    """Write ``tiling.csv`` (one row per slide) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(r.row())
    write_text_atomic(path, buf.getvalue())


def tiles_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "tiles" / f"{slide_id}.h5"


def qc_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "qc" / f"{slide_id}.png"


def existing_result(path: Path, out_dir: Path, settings: TileSettings) -> TileResult | None:
    """A ``skipped`` result if the slide's tiles file is complete, valid and made with ``settings``."""
    slide_id = path.stem
    tp, qp = tiles_path(out_dir, slide_id), qc_path(out_dir, slide_id)
    if not tp.exists() or not qp.exists():
        return None
    try:
        tiles = read_tiles(tp)
    except SchemaError:
        return None
    attrs = tiles.attrs
    if attrs.get("slide_path") != str(path.resolve()):
        return None
    # A slide replaced under the same name is tiled again.
    if attrs.get("slide_file_bytes") != path.stat().st_size:
        return None
    for key, value in settings.as_attrs().items():
        have = attrs.get(key)
        if isinstance(value, float) and isinstance(have, int | float):
            if not math.isclose(value, float(have), rel_tol=1e-9):
                return None
        elif have != value:
            return None
    if settings.reader != "auto" and attrs.get("reader") != settings.reader:
        return None
    return TileResult(
        slide_id=slide_id,
        slide_path=str(path),
        status="skipped",
        n_regions=len(tiles),
        mpp_level0=float(attrs["mpp_level0"]),
        mpp_source=str(attrs["mpp_source"]),
        error="",
    )


# ---------------------------------------------------------------------------------- one slide
def tile_slide(
    path: str | os.PathLike, out_dir: str | os.PathLike, settings: TileSettings
) -> TileResult:
    """Tile one slide; never raises for a bad slide (the result says ``failed`` and why).

    A slide that fails leaves no tiles file or QC image behind: outputs of an earlier run (other
    settings, or ``--overwrite``) are removed, so ``tiles/`` never holds a slide whose latest
    tiling failed.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hipt.synthetic import write_generic_tiff
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = write_generic_tiff(d / "s1.tiff", 4096, 4096, mpp=0.5, seed=1).path
    >>> r = tile_slide(p, d / "out", TileSettings())
    >>> r.status, r.n_regions >= 1
    ('ok', True)
    """
    path = Path(path)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    result = TileResult(slide_id=path.stem, slide_path=str(path), status="failed")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Slide(
                path,
                mpp=settings.mpp,
                trust_metadata=settings.trust_metadata,
                reader=settings.reader,
            ) as slide:
                result.mpp_level0 = slide.mpp_level0
                result.mpp_source = slide.mpp_source
                tissue = segment_tissue(slide, settings.seg)
                r0 = slide.region_size_level0(settings.region_px, settings.target_mpp)
                region_level0 = int(round(r0))
                grid = region_grid(tissue, region_level0, settings.min_tissue)
                read_level = slide.best_level_for(settings.target_mpp)
                if settings.verify:
                    verify_regions(slide, grid.coords, r0, read_level)
                attrs = {
                    "slide_id": slide.slide_id,
                    "slide_path": str(path.resolve()),
                    "slide_size": list(slide.dimensions),
                    "slide_file_bytes": path.stat().st_size,
                    "mpp_level0": float(slide.mpp_level0),
                    "mpp_source": slide.mpp_source,
                    "objective_power": slide.objective_power,
                    "region_size_level0": region_level0,
                    "read_level": int(read_level),
                    "region_size_read_level": int(round(r0 / slide.level_downsamples[read_level])),
                    "patch_size": PATCH_PX,
                    "token_size": TOKEN_PX,
                    "reader": slide.reader_name,
                    "tissue_mask_mpp": float(tissue.mask_mpp),
                    "seg_threshold": float(tissue.threshold),
                    "grid_origin_level0": list(grid.origin_level0),
                    "grid_shape": list(grid.grid_shape),
                    "hipt_version": hipt.__version__,
                    **settings.as_attrs(),
                }
        write_png_atomic(qc_image(tissue, grid), qc_path(out_dir, path.stem))
        # The tiles file goes last: its presence marks the slide complete.
        write_tiles(tiles_path(out_dir, path.stem), grid.coords, grid.tissue_fraction, attrs)
        result.status = "ok"
        result.n_regions = len(grid.coords)
        notes = [_one_line(str(w.message)) for w in caught]
        result.error = "; ".join(notes)
    except (SlideReadError, SchemaError) as exc:
        result.error = _one_line(str(exc))
    except OSError as exc:
        result.error = _one_line(f"{path}: {exc}")
    except Exception as exc:  # one bad slide must never stop the batch
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result.error = _one_line(
            f"{path}: unexpected {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"
        )
    if result.status == "failed":
        # An earlier run's outputs would pass for this run's (the embedder reads every tiles file).
        for stale in (tiles_path(out_dir, path.stem), qc_path(out_dir, path.stem)):
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                result.error = _one_line(f"{result.error}; cannot remove the stale {stale}: {exc}")
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------- batch
def collect_slides(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[TileResult]]:
    """Expand files and folders into slide paths; report missing inputs and duplicates.

    Folders are searched (not recursively) for files with a known slide suffix. The same file
    given twice is skipped the second time; two different files with the same slide id would
    write the same outputs, so the second one fails.
    """
    slides: list[Path] = []
    problems: list[TileResult] = []
    by_resolved: dict[Path, Path] = {}
    by_id: dict[str, Path] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = sorted(
                q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
            )
            if not found:
                problems.append(
                    TileResult(p.name, str(p), "failed", error=f"{p}: folder holds no slides")
                )
            candidates = found
        elif p.exists():
            candidates = [p]
        else:
            problems.append(
                TileResult(p.stem, str(p), "failed", error=f"{p}: no such file or folder")
            )
            continue
        for q in candidates:
            resolved = q.resolve()
            if resolved in by_resolved:
                problems.append(
                    TileResult(
                        q.stem,
                        str(q),
                        "skipped",
                        error=f"{q}: same slide given twice (as {by_resolved[resolved]})",
                        duplicate=True,
                    )
                )
                continue
            if q.stem in by_id:
                problems.append(
                    TileResult(
                        q.stem,
                        str(q),
                        "failed",
                        error=f"{q}: slide id {q.stem!r} is already used by {by_id[q.stem]}; rename one of them",
                    )
                )
                continue
            by_resolved[resolved] = q
            by_id[q.stem] = q
            slides.append(q)
    return slides, problems


def check_output_dir(out_dir: Path) -> None:
    """Create ``out_dir/{tiles,qc}`` and prove they are writable; raise ``OSError`` naming the folder."""
    try:
        for sub in ("tiles", "qc"):
            d = out_dir / sub
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as exc:
        raise OSError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None


def tile_batch(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: TileSettings,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    on_result: Callable[[TileResult], None] | None = None,
    shard: Shard | None = None,
) -> list[TileResult]:
    """Tile many slides; one bad slide never stops the batch. Writes ``out_dir/tiling.csv``.

    With ``shard`` (a Slurm array task's share), only the slides whose id falls in that shard are
    tiled and the record is ``tiling.<shard tag>.csv``, so array tasks never write the same file.

    Slides whose tiles file is complete, valid and made with the same settings are skipped
    unless ``overwrite``. Raises ``OSError`` only when ``out_dir`` cannot be written.

    Returns
    -------
    list of TileResult
        One per input slide (and per duplicate or missing input), in input order.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    slides, problems = collect_slides(inputs)
    slides = shard_items(slides, shard, key=lambda p: p.stem)
    results: dict[Path, TileResult] = {}
    todo: list[Path] = []
    for p in slides:
        done = None if overwrite else existing_result(p, out_dir, settings)
        if done is not None:
            results[p] = done
        else:
            todo.append(p)
    bar = tqdm(
        total=len(slides), desc="tiling", unit="slide", disable=not progress, initial=len(results)
    )

    def finish(p: Path, r: TileResult) -> None:
        results[p] = r
        bar.update(1)
        if r.status == "failed":
            bar.write(f"failed: {r.error}", file=sys.stderr)
        if on_result is not None:
            on_result(r)

    if workers <= 1 or len(todo) <= 1:
        for p in todo:
            finish(p, tile_slide(p, out_dir, settings))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(tile_slide, p, out_dir, settings): p for p in todo}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    r = fut.result()
                except Exception as exc:  # a worker died (e.g. killed for memory)
                    r = TileResult(
                        p.stem, str(p), "failed", error=_one_line(f"{p}: worker failed: {exc!r}")
                    )
                finish(p, r)
    bar.close()
    ordered = [results[p] for p in slides] + problems
    record = "tiling.csv" if shard is None else f"tiling.{shard.tag}.csv"
    write_csv_atomic([r for r in ordered if not r.duplicate], out_dir / record)
    return ordered
