"""``hipt export trident``: hipt's tiles and features in the layout TRIDENT's loaders read.

TRIDENT (mahmoodlab/TRIDENT) reads its own coordinate files, ``patches/<id>_patches.h5``, whose
``coords`` dataset carries the tiling as attrs: ``patch_size`` (the patch side at the target
magnification, here the 4096 px region), ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap``, ``name``, ``level0_width`` and ``level0_height``. Its
slide encoders read ``features_<encoder>/<id>.h5`` with a ``features`` [M, D] and a ``coords``
[M, 2] dataset, whose attrs are those of the coordinate file (``patch_size_level0`` above all).

hipt's tiles file keeps CLAM's meaning of ``patch_size`` (the region side in read-level pixels),
so TRIDENT's layout is written here, beside it, instead of changing the tiles file.
Magnifications are written as ``10 / µm per px`` (TRIDENT converts a magnification back to a
pixel size the same way), so TRIDENT's own patcher finds hipt's exact region size; a µm/px that
is not a round magnification gives a fractional one rather than TRIDENT's rounding to 20×/40×.

Examples
--------
From the shell (the tiler's and the embedder's output roots)::

    hipt export trident --tiles out/tiles --features out/features --out out/trident
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hipt.atomic import atomic_path
from hipt.h5schema import SchemaError, Tiles, read_features, read_features_info, read_tiles
from hipt.names import check_name

__all__ = ["ENCODER_NAME", "ExportResult", "trident_coords_attrs", "export_slide", "export_trident"]

ENCODER_NAME = "hipt_vit4k"  # features_<encoder>/: the ViT-4K region [CLS] of each region


def _magnification(mpp: float) -> int | float:
    mag = 10.0 / float(mpp)
    return int(round(mag)) if abs(mag - round(mag)) < 1e-9 else mag


def trident_coords_attrs(tiles: Tiles, out_dir: Path) -> dict[str, Any]:
    """The attrs TRIDENT reads from a coordinate file's ``coords`` dataset, for ``tiles``."""
    a = tiles.attrs
    width, height = (int(v) for v in a["slide_size"])
    return {
        "patch_size": int(a["region_size"]),  # at the target magnification
        "patch_size_level0": int(a["region_size_level0"]),
        "level0_magnification": _magnification(a["mpp_level0"]),
        "target_magnification": _magnification(a["target_mpp"]),
        "overlap": 0,
        "name": tiles.slide_id,
        "savetodir": str(out_dir),
        "level0_width": width,
        "level0_height": height,
    }


def _write_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict]) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in datasets.items():
            d = f.create_dataset(name, data=data)
            for key, value in attrs.get(name, {}).items():
                d.attrs[key] = value


@dataclass
class ExportResult:
    """One slide: what was written, or why not."""

    slide_id: str
    patches: Path | None = None
    features: Path | None = None
    error: str = ""


def export_slide(tiles_path: Path, features_dir: Path | None, out: Path) -> ExportResult:
    """Write TRIDENT's coordinate file (and features file, when hipt's exists) for one slide."""
    try:
        tiles = read_tiles(tiles_path)
        check_name(tiles.slide_id, f"{tiles_path}: slide id")
    except ValueError as exc:  # SchemaError, or an id that would make an unsafe path
        return ExportResult(tiles_path.stem, error=str(exc))
    result = ExportResult(tiles.slide_id)
    attrs = trident_coords_attrs(tiles, out)
    result.patches = out / "patches" / f"{tiles.slide_id}_patches.h5"
    _write_h5(result.patches, {"coords": tiles.coords}, {"coords": attrs})
    source = None if features_dir is None else features_dir / f"{tiles.slide_id}.h5"
    if source is None or not source.exists():
        return result
    try:
        info = read_features_info(source)
        arrays = read_features(source)
    except SchemaError as exc:
        result.error = str(exc)
        return result
    if not np.array_equal(arrays["coords"], tiles.coords):
        result.error = f"{source}: its coords differ from {tiles_path}; embed again"
        return result
    enc_dir = out / f"features_{ENCODER_NAME}"
    result.features = enc_dir / f"{tiles.slide_id}.h5"
    feature_attrs = {"name": tiles.slide_id, "savetodir": str(enc_dir), "encoder": ENCODER_NAME,
                     "vit4k_sha256": str(info.attrs["vit4k_sha256"])}  # fmt: skip
    _write_h5(
        result.features,
        {"features": arrays["region_features"], "coords": arrays["coords"]},
        {"features": feature_attrs, "coords": attrs},
    )
    return result


def _tiles_files(tiles: Path) -> Iterator[Path]:
    if tiles.is_file():
        yield tiles
        return
    folder = (
        tiles / "tiles" if not list(tiles.glob("*.h5")) and (tiles / "tiles").is_dir() else tiles
    )
    yield from sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))


def export_trident(
    tiles: str | os.PathLike, out: str | os.PathLike, features: str | os.PathLike | None = None
) -> list[ExportResult]:
    """Export every tiles file of ``tiles`` (and its features, if found) to TRIDENT's layout.

    ``features`` defaults to the ``features/`` folder beside the tiles folder (the embedder's
    output root); slides without a features file get a coordinate file only.

    Raises
    ------
    FileNotFoundError
        When ``tiles`` holds no tiles file.
    """
    tiles, out = Path(tiles), Path(out)
    paths = list(_tiles_files(tiles)) if tiles.exists() else []
    if not paths:
        raise FileNotFoundError(f"--tiles {tiles}: no tiles files (*.h5) there")
    if features is None:
        root = paths[0].parent.parent
        features = root / "features" if (root / "features").is_dir() else None
    features_dir = None if features is None else Path(features)
    return [export_slide(p, features_dir, out) for p in paths]
