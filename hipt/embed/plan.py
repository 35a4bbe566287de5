"""Which slides a ``hipt embed`` run embeds: tiles files in, one decision per slide out.

For each tiles file of the shard, :func:`plan_slide` decides: reuse the existing features file
(``skipped``), fail the slide with one line naming the file and the problem (a tiles file that
breaks the schema, a slide that moved, changed or does not hold the tiled coordinates), leave it
to another live process that holds its lock (``locked``), or embed it (an :class:`EmbedJob`
holding the slide's lock). One bad slide never stops the others.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipt.embed.data import SlideJob
from hipt.embed.records import SlideResult
from hipt.embed.reuse import check_features, features_attrs, tiles_sha256
from hipt.geometry import REGION_PX
from hipt.h5schema import SchemaError, Tiles, read_tiles
from hipt.names import check_name
from hipt.runlock import ItemLock

__all__ = [
    "EmbedJob",
    "PlanSettings",
    "list_tiles",
    "resolve_slide_path",
    "plan_slide",
    "features_rel",
]


class NoTilesError(FileNotFoundError):
    """``--tiles`` names no tiles file: the message says where it looked and what to pass."""


def list_tiles(tiles: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Tiles files of a folder (``*.h5``, sorted by name, temporary files left out) or a list.

    The tiler's output root (a folder holding ``tiles/``) is accepted too.

    Raises
    ------
    NoTilesError
        When a folder holds no tiles file (with a hint when it looks like another output).
    """
    if not isinstance(tiles, str | os.PathLike):
        return [Path(p) for p in tiles]
    root = Path(tiles)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise NoTilesError(f"--tiles {root}: no such tiles folder or file")
    found = _h5_files(root)
    if not found and (root / "tiles").is_dir():
        found = _h5_files(root / "tiles")  # the tiler's --out root: its tiles/ folder
    if not found:
        hint = ""
        if (root / "features").is_dir() or root.name == "features":
            hint = " (this looks like an embedding output; pass the tiler's OUT/tiles)"
        raise NoTilesError(
            f"--tiles {root}: no tiles files (*.h5) in it or in {root / 'tiles'}{hint}; "
            "run 'hipt tile' first or pass its output folder"
        )
    return found


def _h5_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".") and p.is_file())


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


def features_rel(target: Path) -> str:
    """``features/<id>.h5``: relative to the output root, so the record survives a moved folder."""
    return f"{target.parent.name}/{target.name}"


@dataclass
class EmbedJob:
    """A slide to embed: its regions, the attrs its file gets, where it goes, and its lock."""

    job: SlideJob
    attrs: dict[str, Any]
    target: Path
    lock: ItemLock | None = None


@dataclass
class PlanSettings:
    """What every slide of a run shares when deciding what to do with it."""

    features_dir: Path
    provenance: dict[str, Any]
    reader: str = "auto"
    precision: str = "fp32"
    patch_features: bool = True
    overwrite: bool = False
    slide_dir: Path | None = None
    say: Any = field(default=lambda line: None)


def _fail(slide_id: str, error: str, n_regions: int = 0) -> SlideResult:
    return SlideResult(slide_id, "failed", n_regions=n_regions, error=error)


def _read_checked_tiles(tiles_path: Path) -> Tiles:
    """The tiles file, checked for what embedding needs (raises SchemaError naming the file)."""
    tiling = read_tiles(tiles_path)
    if tiling.slide_id != tiles_path.stem:
        raise SchemaError(
            f"{tiles_path}: slide_id attr {tiling.slide_id!r} differs from the file name"
        )
    region_px = int(tiling.attrs["region_size"])
    if region_px != REGION_PX:
        # The encoder reads a 16x16 grid of 256 px patches; any other size would stop the whole
        # run inside the model with a shape error, not just this slide.
        raise SchemaError(
            f"{tiles_path}: regions are {region_px} px; hipt embed needs {REGION_PX} px "
            f"regions (tile again with --region-px {REGION_PX})"
        )
    return tiling


def _slide_mismatch(tiling: Tiles, slide: Any, slide_path: Path) -> str | None:
    """Why the slide at ``slide_path`` is not the one that was tiled (None when it is)."""
    where = f"{tiling.path}: slide {slide_path}"
    recorded = tiling.attrs.get("slide_file_bytes")
    if recorded is not None and slide_path.stat().st_size != int(recorded):
        return (
            f"{where} is {slide_path.stat().st_size} bytes, the tiled slide was {recorded} "
            "(another slide under that name?); tile it again"
        )
    size = [int(v) for v in tiling.attrs["slide_size"]]
    if list(slide.dimensions) != size:
        return f"{where} is {slide.dimensions[0]}x{slide.dimensions[1]} px, the tiled slide was {size[0]}x{size[1]}; tile it again"
    if len(tiling):
        r0 = int(tiling.attrs["region_size_level0"])
        x, y = tiling.coords[:, 0], tiling.coords[:, 1]
        outside = (x <= -r0) | (y <= -r0) | (x >= size[0]) | (y >= size[1])
        if outside.any():
            row = int(outside.argmax())
            return (
                f"{tiling.path}: region {row} at {tiling.coords[row].tolist()} lies outside the "
                f"{size[0]}x{size[1]} px slide; tile it again"
            )
    return None


def _open_slide(tiling: Tiles, slide_path: Path, reader: str) -> tuple[str, str | None]:
    """``(reader the slide reads with, problem or None)``, after checking it is the tiled slide."""
    from hipt.slide import Slide  # the slide stack loads only when slides are opened

    try:
        with Slide(slide_path, mpp=float(tiling.attrs["mpp_level0"]), reader=reader) as slide:
            return slide.reader_name, _slide_mismatch(tiling, slide, slide_path)
    except Exception as exc:  # any unreadable slide fails alone
        text = " ".join(str(exc).split()) or type(exc).__name__
        return reader, text if str(slide_path) in text else f"{slide_path}: {text}"


def _drop_stale_temps(features_dir: Path, slide_id: str) -> None:
    # Called only by the holder of the slide's lock: any ".<id>.h5.tmp-*" then belongs to a dead
    # run. The id is escaped: "s[1]" must not match (and delete) the temporary file of "s1".
    for tmp in features_dir.glob(f".{glob.escape(slide_id)}.h5.tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def plan_slide(tiles_path: Path, s: PlanSettings) -> SlideResult | EmbedJob:
    """Decide what to do with one tiles file (see the module docstring); never raises for bad input."""
    slide_id = tiles_path.stem
    try:
        check_name(slide_id, f"{tiles_path}: slide id")
        tiling = _read_checked_tiles(tiles_path)
    except ValueError as exc:  # SchemaError, or an id that would make an unsafe path
        return _fail(slide_id, str(exc))
    target = s.features_dir / f"{slide_id}.h5"
    slide_path, looked = resolve_slide_path(tiling, s.slide_dir)
    reader, problem = s.reader, None
    if slide_path is not None:
        reader, problem = _open_slide(tiling, slide_path, s.reader)
    expected = features_attrs(
        tiling, s.provenance, tiles_hash=tiles_sha256(tiling), reader=reader, precision=s.precision
    )
    if not s.overwrite and _reusable(target, expected, tiling, s):
        return SlideResult(slide_id, "skipped", len(tiling), features_path=features_rel(target))
    if slide_path is None:
        err = (
            f"{tiles_path}: slide {tiling.attrs['slide_path']} not found (looked at "
            f"{', '.join(map(str, looked))}); pass --slides DIR"
        )
        return _fail(slide_id, err, len(tiling))
    if problem is not None:
        return _fail(slide_id, problem, len(tiling))
    return _locked_job(tiling, slide_path, expected, target, s)


def _reusable(target: Path, expected: dict[str, Any], tiling: Tiles, s: PlanSettings) -> bool:
    why = check_features(target, expected, patch_features=s.patch_features, tiles=tiling)
    if why is not None and target.exists():
        s.say(f"{tiling.slide_id}: redoing {target.name}: {why}")
    return why is None


def _locked_job(
    tiling: Tiles, slide_path: Path, expected: dict[str, Any], target: Path, s: PlanSettings
) -> SlideResult | EmbedJob:
    slide_id = tiling.slide_id
    lock = ItemLock(s.features_dir / f".{slide_id}.lock")
    if not lock.acquire():
        owner = lock.owner()
        return SlideResult(slide_id, "locked", len(tiling), error=f"being embedded by {owner}")
    if lock.took_over is not None:
        s.say(f"{slide_id}: took over the lock of {lock.took_over}, which is no longer running")
    # The holder may have finished it between our check and our lock.
    if (
        not s.overwrite
        and check_features(target, expected, patch_features=s.patch_features, tiles=tiling) is None
    ):
        lock.release()
        return SlideResult(slide_id, "skipped", len(tiling), features_path=features_rel(target))
    _drop_stale_temps(s.features_dir, slide_id)
    job = SlideJob(
        slide_id=slide_id,
        slide_path=slide_path,
        coords=tiling.coords,
        target_mpp=float(tiling.attrs["target_mpp"]),
        mpp_level0=float(tiling.attrs["mpp_level0"]),
        region_px=int(tiling.attrs["region_size"]),
    )
    return EmbedJob(job, expected, target, lock)
