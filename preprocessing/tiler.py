"""Cut slides into 4096 px regions at a target µm/px.

For each slide: segment tissue on a low-resolution level, lay a grid of regions (``region_px`` at
``target_mpp``) over the tissue bounding box, keep regions whose tissue fraction reaches
``min_tissue``, and write ``tiles/<slide_id>.h5``, ``qc/<slide_id>.png``; a batch also writes
``tiling.csv``. Only low-resolution levels are read, so tiling time does not grow with the slide.

Runs may share an output folder (a requeued Slurm task beside its predecessor, overlapping
shards): a slide is tiled only under its lock, ``tiles/.<slide_id>.lock``
(:class:`hipt.runlock.ItemLock`); a slide another live process holds is reported ``locked`` and
left to it, and only the holder removes a slide's leftover temporary files. ``tiling.csv`` is
merged under a file lock, so no run loses another's rows.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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
from hipt.names import check_name
from hipt.readers import SlideReadError
from hipt.readers.base import EDGE_FILLS
from hipt.runlock import ItemLock, locked_file
from hipt.shard import Shard, shard_items
from hipt.slide import Slide, dicom_instances, slide_id_for
from preprocessing.tissue import SegmentationParams, TissueMask, segment_tissue

# Suffixes picked up when a folder is given. A DICOM slide is a folder of .dcm instances: the
# folder (given, or inside a given folder) is one slide, named after it.
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
    "upsample_factor",
    "seconds",
    "error",
)
# A slide claiming more pixels than this is refused (``--max-slide-px``): 50 gigapixels is
# above any real scan (a 200,000 x 200,000 px slide is 40).
MAX_SLIDE_PX = 50_000_000_000
# Fewer file bytes per claimed level-0 pixel than this cannot be a real slide: even bare glass
# in JPEG tiles takes about 0.01 bytes per pixel; the bound leaves 20x room.
MIN_FILE_BYTES_PER_PX = 0.0005
# Level-0 µm/px more than this factor coarser than the target counts as upsampling.
UPSAMPLE_TOLERANCE = 1.001


class Terminated(Exception):
    """SIGTERM arrived: stop, clean up, record what finished (exit 143)."""


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
    allow_upsampling : bool
        Tile a slide whose level 0 is coarser than ``target_mpp`` (its regions are then
        upsampled by ``upsample_factor``, recorded in the tiles file and ``tiling.csv``);
        without it such a slide fails, since ViT-256 was never trained on upsampled pixels.
    edge_fill : {"white", "black"}
        What a region shows where it runs past the slide edge. White (the default) is what
        glass looks like, so the encoder sees background it knows, and the tissue mask treats
        it as background; CLAM and TRIDENT fill black. Recorded as the ``edge_fill`` attr;
        readers take it as ``fill`` (``EDGE_FILLS`` maps it to a grey value).
    max_slide_px : int
        Refuse a slide claiming more level-0 pixels than this.
    """

    target_mpp: float = 0.5
    region_px: int = REGION_PX
    min_tissue: float = 0.25
    mpp: float | None = None
    trust_metadata: bool = False
    reader: str = "auto"
    seg: SegmentationParams = field(default_factory=SegmentationParams)
    verify: bool = False
    allow_upsampling: bool = False
    edge_fill: str = "white"
    max_slide_px: int = MAX_SLIDE_PX

    def __post_init__(self) -> None:
        if self.edge_fill not in EDGE_FILLS:
            raise ValueError(
                f"edge_fill must be one of {sorted(EDGE_FILLS)}, not {self.edge_fill!r}"
            )

    def as_attrs(self) -> dict[str, Any]:
        """The settings as tiles-file attrs (those that change the result)."""
        return {
            "target_mpp": float(self.target_mpp),
            "region_size": int(self.region_px),
            "min_tissue": float(self.min_tissue),
            "mpp_override": "none" if self.mpp is None else float(self.mpp),
            "trust_metadata": int(self.trust_metadata),
            "verified": int(self.verify),
            "edge_fill": self.edge_fill,
            **self.seg.as_attrs(),
        }


@dataclass
class TileResult:
    """One row of ``tiling.csv``."""

    slide_id: str
    slide_path: str
    status: str  # ok | failed | skipped | not_processed | locked (left to another live run)
    n_regions: int = 0
    mpp_level0: float | None = None
    mpp_source: str = ""
    upsample_factor: float = 1.0
    seconds: float = 0.0
    error: str = ""
    duplicate: bool = False  # the same file given again: reported, but no row of its own

    def row(self) -> dict[str, str]:
        d = asdict(self)
        d["mpp_level0"] = "" if self.mpp_level0 is None else f"{self.mpp_level0:.6g}"
        d["upsample_factor"] = f"{self.upsample_factor:.6g}"
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
    # Over 60 lines with its docstring; the body is one computation (cells, fractions, kept
    # regions, rescued fragments) that reads best in one place.
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
    """Merge this run's rows into ``tiling.csv`` atomically: one row per slide, others' rows kept.

    Under a file lock (:func:`hipt.runlock.locked_file`), so runs finishing together lose no
    row: rows on disk whose slide this run does not mention stay (in their order, first); every
    slide of this run gets this run's row, so the latest run wins. A ``locked`` row (the slide
    was left to another live run) never replaces a row already there: that run writes the
    outcome.
    """
    with locked_file(path):
        on_disk = _read_csv_rows(path)
        present = {row["slide_id"] for row in on_disk}
        results = [r for r in results if r.status != "locked" or r.slide_id not in present]
        mine = {r.slide_id for r in results}
        _write_rows([row for row in on_disk if row["slide_id"] not in mine], results, path)


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("slide_id"):
                    rows.append({k: row.get(k) or "" for k in CSV_COLUMNS})
    except FileNotFoundError:
        pass
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        # A damaged record is rewritten from this run alone; say so rather than fail the batch.
        print(f"warning: {path}: earlier rows dropped, cannot read it ({exc})", file=sys.stderr)
        return []
    return rows


def _write_rows(kept: list[dict[str, str]], results: Sequence[TileResult], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    for r in results:
        writer.writerow(r.row())
    write_text_atomic(path, buf.getvalue())


def tiles_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "tiles" / f"{slide_id}.h5"


def qc_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "qc" / f"{slide_id}.png"


def lock_path(out_dir: Path, slide_id: str) -> Path:
    """The slide's lock, ``tiles/.<slide_id>.lock`` (a dot-file: no reader lists it)."""
    return Path(out_dir) / "tiles" / f".{slide_id}.lock"


def remove_leftovers(out_dir: Path, slide_id: str) -> None:
    """Remove temporary files a killed run left for ``slide_id`` (``.<id>.h5.tmp-*`` and PNG).

    Only for the holder of the slide's lock: any such file then belongs to a dead run.
    """
    # Escaped: the leftovers of "s[1]" are not those of "s1".
    for folder, suffix in (("tiles", ".h5"), ("qc", ".png")):
        for tmp in (Path(out_dir) / folder).glob(f".{glob.escape(slide_id)}{suffix}.tmp-*"):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def sweep_leftovers(
    out_dir: Path, slide_ids: Iterable[str], say: Callable[[str], None] = print
) -> None:
    """Remove what killed runs left for these slides (skipped ones too), each under its lock.

    A slide another live process holds keeps its temporary files: they are being written.
    """
    stale: dict[str, list[Path]] = {}
    for folder, suffix in (("tiles", ".h5"), ("qc", ".png")):
        for tmp in (Path(out_dir) / folder).glob(".*.tmp-*"):
            name = tmp.name[1:].rsplit(".tmp-", 1)[0]
            if name.endswith(suffix):
                stale.setdefault(name[: -len(suffix)], []).append(tmp)
    for slide_id in sorted(set(slide_ids) & set(stale)):
        lock = ItemLock(lock_path(out_dir, slide_id))
        if lock.acquire():
            if lock.took_over is not None:
                say(
                    f"{slide_id}: took over the lock of {lock.took_over}, which is no longer running"
                )
            try:
                remove_leftovers(out_dir, slide_id)
            finally:
                lock.release()


def existing_result(path: Path, out_dir: Path, settings: TileSettings) -> TileResult | None:
    """A ``skipped`` result if the slide's tiles file is complete, valid and made with ``settings``."""
    slide_id = slide_id_for(path)
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
    factor = float(attrs.get("upsample_factor", 1.0))
    if factor > 1 and not settings.allow_upsampling:
        return None
    return TileResult(
        slide_id=slide_id,
        slide_path=str(path),
        status="skipped",
        n_regions=len(tiles),
        mpp_level0=float(attrs["mpp_level0"]),
        mpp_source=str(attrs["mpp_source"]),
        upsample_factor=factor,
        error="",
    )


# ---------------------------------------------------------------------------------- one slide
def check_claimed_size(slide: Slide, path: Path, settings: TileSettings) -> None:
    """Refuse a slide whose level-0 size is over the limit, or impossible for its file size.

    A header can claim any size; nothing is allocated from it before this check passes.
    """
    w, h = slide.dimensions
    pixels = w * h
    if pixels > settings.max_slide_px:
        raise SlideReadError(
            f"{path}: claims {w}x{h} px ({pixels / 1e9:.1f} gigapixels), over the limit of "
            f"{settings.max_slide_px / 1e9:g} (--max-slide-px)"
        )
    size = _file_bytes(path)
    if size is not None and size < pixels * MIN_FILE_BYTES_PER_PX:
        raise SlideReadError(
            f"{path}: claims {w}x{h} px but the file holds only {size} bytes; a real slide "
            "of that size cannot be this small (damaged or forged header)"
        )


def _file_bytes(path: Path) -> int | None:
    """Bytes of the slide: the file, or a DICOM folder's instances together."""
    try:
        if path.is_dir():
            return sum(q.stat().st_size for q in dicom_instances(path)) or None
        return path.stat().st_size
    except OSError:
        return None


def upsample_factor(slide: Slide, settings: TileSettings) -> float:
    """How much the regions are upsampled (1.0 when level 0 is at least as fine as the target).

    Raises ``SlideReadError`` for a coarser scan unless ``settings.allow_upsampling``.
    """
    factor = slide.mpp_level0 / settings.target_mpp
    if factor <= UPSAMPLE_TOLERANCE:
        return 1.0
    if not settings.allow_upsampling:
        raise SlideReadError(
            f"{slide.path}: the scan is {slide.mpp_level0:g} µm/px, coarser than --target-mpp "
            f"{settings.target_mpp:g}: its regions would be upsampled {factor:.3g}x; "
            "pass --allow-upsampling to tile it anyway"
        )
    return factor


def tiles_attrs(
    slide: Slide,
    path: Path,
    settings: TileSettings,
    tissue: TissueMask,
    grid: RegionGrid,
    factor: float,
) -> dict[str, Any]:
    """The attrs of one slide's tiles file: the slide, its geometry, provenance and settings."""
    r0 = slide.region_size_level0(settings.region_px, settings.target_mpp)
    read_level = slide.best_level_for(settings.target_mpp)
    return {
        "slide_id": slide.slide_id,
        "slide_path": str(path.resolve()),
        "slide_size": list(slide.dimensions),
        "slide_file_bytes": _file_bytes(path) or 0,
        "mpp_level0": float(slide.mpp_level0),
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "region_size_level0": grid.region_size_level0,
        "read_level": int(read_level),
        "region_size_read_level": int(round(r0 / slide.level_downsamples[read_level])),
        "upsample_factor": float(factor),
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


def plan_slide(
    path: Path, settings: TileSettings, result: TileResult
) -> tuple[TissueMask, RegionGrid, dict[str, Any]]:
    """Open, check, segment and grid one slide; fills ``result``'s µm/px fields on the way."""
    with Slide(
        path, mpp=settings.mpp, trust_metadata=settings.trust_metadata, reader=settings.reader
    ) as slide:
        result.mpp_level0 = slide.mpp_level0
        result.mpp_source = slide.mpp_source
        check_claimed_size(slide, path, settings)
        factor = result.upsample_factor = upsample_factor(slide, settings)
        tissue = segment_tissue(slide, settings.seg)
        r0 = slide.region_size_level0(settings.region_px, settings.target_mpp)
        grid = region_grid(tissue, int(round(r0)), settings.min_tissue)
        if settings.verify:
            verify_regions(slide, grid.coords, r0, slide.best_level_for(settings.target_mpp))
        return tissue, grid, tiles_attrs(slide, path, settings, tissue, grid, factor)


def _failure_message(exc: BaseException, path: Path) -> str:
    """One line for a slide that failed: the reader's own message, or the error and where."""
    if isinstance(exc, SlideReadError | SchemaError):
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        return _one_line(f"{path}: {exc}")
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return _one_line(
        f"{path}: unexpected {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"
    )


def tile_slide(
    path: str | os.PathLike, out_dir: str | os.PathLike, settings: TileSettings
) -> TileResult:
    """Tile one slide; never raises for a bad slide (the result says ``failed`` and why).

    A slide that fails leaves no tiles file or QC image behind: outputs of an earlier run (other
    settings, or ``--overwrite``) are removed, so ``tiles/`` never holds a slide whose latest
    tiling failed. Warnings (e.g. a µm/px guessed from the objective power) go to the result's
    ``error`` field of an ``ok`` slide.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from hipt.synthetic import write_generic_tiff
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = write_generic_tiff(d / "s1.tiff", 4096, 4096, mpp=0.5, seed=1).path
    >>> r = tile_slide(p, d / "out", TileSettings())
    >>> r.status, r.n_regions >= 1
    ('ok', True)

    The slide's lock (``tiles/.<slide_id>.lock``) is held while it is tiled; a slide another
    live process holds is returned ``locked`` and left alone.
    """
    path, out_dir = Path(path), Path(out_dir)
    (out_dir / "tiles").mkdir(parents=True, exist_ok=True)
    lock = ItemLock(lock_path(out_dir, slide_id_for(path)))
    if not lock.acquire():
        return _locked_result(path, lock)
    try:
        return _tile_held_slide(path, out_dir, settings)
    finally:
        lock.release()


def _locked_result(path: Path, lock: ItemLock) -> TileResult:
    owner = lock.owner()
    holder = f"being tiled by {owner}" if owner is not None else "being tiled by another run"
    return TileResult(slide_id_for(path), str(path), "locked", error=f"{path}: {holder}")


def _tile_held_slide(path: Path, out_dir: Path, settings: TileSettings) -> TileResult:
    """:func:`tile_slide` for a caller that holds the slide's lock (perhaps another process)."""
    start = time.perf_counter()
    slide_id = slide_id_for(path)
    result = TileResult(slide_id=slide_id, slide_path=str(path), status="failed")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tissue, grid, attrs = plan_slide(path, settings, result)
        remove_leftovers(out_dir, slide_id)
        write_png_atomic(qc_image(tissue, grid), qc_path(out_dir, slide_id))
        # The tiles file goes last: its presence marks the slide complete.
        write_tiles(tiles_path(out_dir, slide_id), grid.coords, grid.tissue_fraction, attrs)
        result.status = "ok"
        result.n_regions = len(grid.coords)
        result.error = "; ".join(_one_line(str(w.message)) for w in caught)
    except Terminated:
        raise
    except Exception as exc:  # one bad slide must never stop the batch
        result.error = _failure_message(exc, path)
    if result.status == "failed":
        # An earlier run's outputs would pass for this run's (the embedder reads every tiles file).
        for stale in (tiles_path(out_dir, slide_id), qc_path(out_dir, slide_id)):
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:
                result.error = _one_line(f"{result.error}; cannot remove the stale {stale}: {exc}")
    result.seconds = time.perf_counter() - start
    return result


class SlideClaims:
    """The slides a batch holds: their locks, taken and released in the batch's main process.

    Taken right before a slide is tiled (not all at the start), so two runs over the same slides
    share them out; pool workers tile a slide under its main process's lock.
    """

    def __init__(
        self, out_dir: Path, settings: TileSettings, overwrite: bool, say: Callable[[str], None]
    ) -> None:
        self.out_dir, self.settings, self.overwrite, self.say = out_dir, settings, overwrite, say
        self.held: dict[Path, ItemLock] = {}

    def claim(self, path: Path) -> TileResult | None:
        """None when this run holds ``path`` and must tile it; else its result (locked, skipped)."""
        if path in self.held:
            return None
        slide_id = slide_id_for(path)
        lock = self.held[path] = ItemLock(lock_path(self.out_dir, slide_id))
        # Registered before it is taken, so a SIGTERM in between still gives it back.
        if not lock.acquire():
            del self.held[path]
            return _locked_result(path, lock)
        if lock.took_over is not None:
            self.say(
                f"{slide_id}: took over the lock of {lock.took_over}, which is no longer running"
            )
        # The holder may have finished it between our first look and our lock.
        done = None if self.overwrite else existing_result(path, self.out_dir, self.settings)
        if done is not None:
            self.release(path)
            return done
        return None

    def release(self, path: Path) -> None:
        lock = self.held.pop(path, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for path in list(self.held):
            self.release(path)


# ---------------------------------------------------------------------------------- batch
def _entry_problem(q: Path) -> str | None:
    """Why a folder entry with a slide's name is not processed (None: it is a slide file)."""
    try:
        q.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{q}: symlink loop, not processed"
        return f"{q}: dangling symlink, not processed"
    if q.is_dir():
        return f"{q}: a folder named like a slide, not processed"
    if not q.is_file():
        return f"{q}: not a regular file, not processed"
    return None


def _folder_slides(folder: Path) -> tuple[list[Path], list[TileResult]]:
    """The slides in one given folder: slide files and DICOM sub-folders; skipped entries."""
    found: list[Path] = []
    skipped: list[TileResult] = []
    for q in sorted(folder.iterdir()):
        if q.is_dir() and not q.is_symlink() and dicom_instances(q):
            found.append(q)  # a DICOM whole-slide image
            continue
        if q.suffix.lower() not in SLIDE_SUFFIXES and not q.name.lower().endswith(
            (".ome.tiff", ".ome.tif")
        ):
            continue
        if q.suffix.lower() == ".mrxs" and q.is_file():
            found.append(q)
            continue
        problem = _entry_problem(q)
        if problem is None:
            found.append(q)
        else:
            skipped.append(TileResult(q.stem, str(q), "not_processed", error=problem))
    return found, skipped


def collect_slides(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[TileResult]]:
    """Expand files and folders into slide paths; report missing inputs, duplicates, bad names.

    Folders are searched (not recursively) for files with a known slide suffix and for DICOM
    sub-folders; a folder holding ``.dcm`` files is itself one slide, and a ``.dcm`` file
    stands for its folder. Entries that look like slides but are not files (a folder named
    ``x.svs``, a dangling symlink, a symlink loop) are listed as ``not_processed``. The same
    slide given twice is skipped the second time; two different slides with the same slide id
    would write the same outputs, so the second one fails, as does an id that is no safe name.
    """
    slides: list[Path] = []
    problems: list[TileResult] = []
    by_resolved: dict[Path, Path] = {}
    by_id: dict[str, Path] = {}
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".dcm" and p.is_file():
            p = p.parent
        if p.is_dir() and p.suffix.lower() != ".mrxs" and not dicom_instances(p):
            candidates, skipped = _folder_slides(p)
            problems += skipped
            if not candidates and not skipped:
                problems.append(
                    TileResult(p.name, str(p), "failed", error=f"{p}: folder holds no slides")
                )
        elif p.exists():
            candidates = [p]
        else:
            problems.append(
                TileResult(p.stem, str(p), "failed", error=f"{p}: no such file or folder")
            )
            continue
        for q in candidates:
            problem = _claim(q, by_resolved, by_id)
            if problem is not None:
                problems.append(problem)
                continue
            slides.append(q)
    return slides, problems


def _claim(q: Path, by_resolved: dict[Path, Path], by_id: dict[str, Path]) -> TileResult | None:
    """Register slide ``q`` under its id; the problem if it is a repeat or its id is unusable."""
    resolved = q.resolve()
    sid = slide_id_for(q)
    if resolved in by_resolved:
        return TileResult(
            sid,
            str(q),
            "skipped",
            error=f"{q}: same slide given twice (as {by_resolved[resolved]})",
            duplicate=True,
        )
    try:
        check_name(sid, "slide id")
    except ValueError as exc:
        return TileResult(sid, str(q), "failed", error=f"{q}: {exc}; rename the file")
    if sid in by_id:
        return TileResult(
            sid,
            str(q),
            "failed",
            error=f"{q}: slide id {sid!r} is already used by {by_id[sid]}; rename one of them",
        )
    by_resolved[resolved] = q
    by_id[sid] = q
    return None


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
    unless ``overwrite``; a slide another live process is tiling in ``out_dir`` (it holds the
    slide's lock) is ``locked`` and left to it. Failure lines always go to stderr, with or
    without the progress bar.
    A worker process that dies (e.g. killed for memory) fails only its own slide; the pool is
    rebuilt for the rest. Raises ``OSError`` only when ``out_dir`` cannot be written, and
    :class:`Terminated` (after writing the record of what finished) on SIGTERM, when
    :func:`terminate_on_sigterm` is in force.

    Returns
    -------
    list of TileResult
        One per input slide (and per duplicate, missing or skipped input), in input order.
    """
    # Long only by its docstring and the one closure that reports each result as it lands.
    from tqdm import tqdm

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    slides, problems = collect_slides(inputs)
    slides = shard_items(slides, shard, key=slide_id_for)
    sweep_leftovers(out_dir, map(slide_id_for, slides), lambda line: print(line, file=sys.stderr))
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
    for r in problems:  # refused before tiling (missing, unsafe name, id taken): failures too
        if r.status == "failed":
            _say(bar, progress, f"failed: {r.error}")

    claims = SlideClaims(out_dir, settings, overwrite, lambda line: _say(bar, progress, line))

    def finish(p: Path, r: TileResult) -> None:
        if results.get(p) is r:
            return  # a SIGTERM cut the first call short; the pool's futures report it again
        results[p] = r  # first: a SIGTERM from here on still finds the slide recorded
        claims.release(p)
        bar.update(1)
        if r.status == "failed":
            _say(bar, progress, f"failed: {r.error}")
        elif r.status == "locked":
            _say(bar, progress, f"left alone: {r.error}")
        elif r.error:
            _say(bar, progress, f"warning: {r.error}")
        if on_result is not None:
            on_result(r)

    record = out_dir / ("tiling.csv" if shard is None else f"tiling.{shard.tag}.csv")
    try:
        if workers <= 1 or len(todo) <= 1:
            for p in todo:
                early = claims.claim(p)
                finish(p, early if early is not None else _tile_held_slide(p, out_dir, settings))
        else:
            _tile_in_pool(todo, out_dir, settings, workers, finish, claims)
    finally:
        # Also on SIGTERM: the record says what finished.
        claims.release_all()
        bar.close()
        ordered = [results[p] for p in slides if p in results] + problems
        write_csv_atomic([r for r in ordered if not r.duplicate], record)
    return ordered


def _say(bar, progress: bool, line: str) -> None:
    """A line to stderr: through the bar when it is shown (so it is not overwritten)."""
    if progress:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def _tile_in_pool(
    todo: list[Path],
    out_dir: Path,
    settings: TileSettings,
    workers: int,
    finish: Callable[[Path, TileResult], None],
    claims: SlideClaims,
) -> None:
    """Tile ``todo`` in ``workers`` processes; a dead worker fails only its own slide.

    At most ``workers`` slides are in flight, so when a worker dies (the pool then fails every
    running future) only those few are suspects: each is tried again alone in a fresh pool,
    where a second death names its slide, and the rest go on in a rebuilt pool.
    """
    queue = list(todo)
    while queue:
        suspects = _run_until_broken(queue, out_dir, settings, workers, finish, claims)
        for p in suspects:
            alone = _run_until_broken([p], out_dir, settings, 1, finish, claims)
            if alone:
                finish(
                    p,
                    TileResult(
                        slide_id_for(p),
                        str(p),
                        "failed",
                        error=f"{p}: the worker process tiling it died (killed, e.g. for memory)",
                    ),
                )


def _run_until_broken(
    queue: list[Path],
    out_dir: Path,
    settings: TileSettings,
    workers: int,
    finish: Callable[[Path, TileResult], None],
    claims: SlideClaims,
) -> list[Path]:
    """Run slides from ``queue`` (consumed) until done or a worker dies; return the suspects.

    Each slide is claimed (locked) here, right before it is submitted; a suspect stays claimed.
    """
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    running: dict[Future, Path] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                p = queue.pop(0)
                early = claims.claim(p)
                if early is not None:
                    finish(p, early)
                    continue
                running[pool.submit(_tile_held_slide, p, out_dir, settings)] = p
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = []
            for fut in done:
                p = running[fut]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken.append(p)
                else:
                    finish(p, result)
                del running[fut]  # only now: until then a SIGTERM settles it from ``running``
            if broken:
                return broken + list(running.values())
        return []
    except Terminated:
        _stop_workers(pool)
        _settle_stopped(running, out_dir, finish)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _settle_stopped(
    running: dict[Future, Path], out_dir: Path, finish: Callable[[Path, TileResult], None]
) -> None:
    """After SIGTERM stopped the workers: record the slides they finished, clean up the rest."""
    # A slide whose worker returned just before the signal has its files in place; its result
    # may still be on its way to the pool's result thread, which settles every future once the
    # workers are gone (a result, or BrokenProcessPool).
    wait(running, timeout=10)
    for fut, p in running.items():
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            finish(p, fut.result())
        else:
            remove_leftovers(out_dir, slide_id_for(p))


def _worker_init() -> None:
    # A worker dies at once on SIGTERM (the parent removes its temporary files).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker of ``pool`` and wait for them, so none goes on writing."""
    # The executor has no public way to reach its processes before Python 3.14's
    # terminate_workers(); _processes is the mapping it keeps of them.
    procs = list(getattr(pool, "_processes", {}).values())
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def terminate_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (``hipt tile`` installs it)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
