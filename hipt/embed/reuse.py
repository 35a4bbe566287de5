"""Whether an existing features file can be reused: provenance attrs and the reuse check.

A features file is reused when it passes every schema check of :mod:`hipt.h5schema` with its
data intact (checksums), holds exactly the tiling's coordinates in the same order, and was made
with the same weights, normalisation, µm/px, tiling (:func:`tiles_sha256`) and slide reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hipt import __version__
from hipt.geometry import REGION_PX
from hipt.h5schema import SchemaError, Tiles, read_features_info

__all__ = ["REGION_ATTRS", "MATCH_KEYS", "tiles_sha256", "features_attrs", "check_features"]

# Tiles attrs that decide which pixels a region holds: where the slide is (its identity, not its
# path, so a moved folder keeps its features), the µm/px and the region geometry. Attrs that only
# describe how the grid was found (segmentation threshold, --verify, the tiler's reader, the
# version) are left out: changing them does not change a region's pixels. A tiles attr added
# later that changes pixels (edge fill, upsampling factor) is added here; absent attrs are skipped,
# so older tiles files keep their hash.
REGION_ATTRS = (
    "slide_id",
    "slide_size",
    "slide_file_bytes",
    "mpp_level0",
    "target_mpp",
    "region_size",
    "region_size_level0",
    "region_size_read_level",
    "read_level",
    "patch_size",
    "token_size",
    "edge_fill",
    "upsample_factor",
)
# Attrs that must equal the current run's for an existing features file to be trusted.
MATCH_KEYS = (
    "slide_id",
    "vit256_sha256",
    "vit4k_sha256",
    "target_mpp",
    "random_weights",
    "random_seed",
    "random_depth",
)


def _hash_coords(h: Any, tiles: Tiles) -> None:
    coords = np.ascontiguousarray(np.asarray(tiles.coords, dtype="<i8"))
    h.update(f"coords{coords.shape}".encode())
    h.update(coords.tobytes())


def tiles_sha256(tiles: Tiles) -> str:
    """SHA-256 of what decides a tiling's regions: ``coords`` (row order) and :data:`REGION_ATTRS`.

    Re-tiling with other incidental settings (``--verify``, another segmentation threshold that
    finds the same grid) keeps the hash, so existing features stay valid.
    """
    h = hashlib.sha256(b"hipt.tiles_sha256/2")
    _hash_coords(h, tiles)
    region = {k: tiles.attrs[k] for k in REGION_ATTRS if k in tiles.attrs}
    h.update(json.dumps(region, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tiles_sha256_v1(tiles: Tiles) -> str:
    # The hash of hipt 0.1.0 (coords and every attr): a features file made by it from these very
    # tiles is still reused, so upgrading does not re-embed a cohort.
    h = hashlib.sha256()
    _hash_coords(h, tiles)
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
    """The attrs a features file made from ``tiles`` with an encoder of ``provenance`` carries.

    ``reader`` is the slide reader that produces the pixels (``openslide`` or ``fast``; ``auto``
    when not known yet).
    """
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


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(have, int | float):
        return math.isclose(float(have), want, rel_tol=1e-9)
    return have == want


def _attrs_differ(attrs: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key in MATCH_KEYS:
        if not _same(attrs.get(key), expected.get(key)):
            return f"{key} differs (file {attrs.get(key)!r}, now {expected.get(key)!r})"
    for key in ("mean", "std"):
        have = np.asarray(attrs.get(key, []), dtype=float).ravel()
        want = np.asarray(expected[key], dtype=float).ravel()
        if have.shape != want.shape or not np.allclose(have, want, rtol=0, atol=1e-7):
            return f"{key} differs (file {have.tolist()}, now {want.tolist()})"
    reader = expected.get("reader", "auto")
    if reader != "auto" and attrs.get("reader") != reader:
        return f"made by the {attrs.get('reader')!r} reader, this run reads with {reader!r}"
    return None


def _tiling_differs(
    path: Path, attrs: dict[str, Any], tiles: Tiles | None, want: str
) -> str | None:
    have = attrs.get("tiles_sha256")
    if have != want and (tiles is None or have != _tiles_sha256_v1(tiles)):
        return f"tiles_sha256 differs (file {have!r}, now {want!r}): the tiling changed"
    if tiles is None:
        return None
    with h5py.File(path, "r") as f:
        coords = f["coords"][()]
    if coords.shape != tiles.coords.shape:
        return f"{len(coords)} rows, the tiling has {len(tiles)} regions"
    if not np.array_equal(coords, tiles.coords):
        row = int(np.argwhere((coords != tiles.coords).any(1))[0, 0])
        return f"coords row {row} is {coords[row].tolist()}, the tiling has {tiles.coords[row].tolist()}"
    return None


def check_features(
    path: str | os.PathLike,
    expected: dict[str, Any],
    *,
    patch_features: bool = True,
    tiles: Tiles | None = None,
) -> str | None:
    """Why the features file at ``path`` cannot be reused for ``expected`` attrs (None if it can).

    The file must pass the schema checks of :mod:`hipt.h5schema` with intact data (every row is
    read, so a checksum mismatch is found), match :data:`MATCH_KEYS`, ``mean``, ``std``, the
    reader (unless ``expected["reader"]`` is ``"auto"``) and ``tiles_sha256``, hold the same
    ``coords`` as ``tiles`` (when given) row for row, and hold ``patch_features`` when they are
    asked for (a file with them also serves a region-only run).
    """
    path = Path(path)
    if not path.exists():
        return "no features file"
    try:
        info = read_features_info(path, verify=True)
    except SchemaError as exc:
        return str(exc)
    why = _attrs_differ(info.attrs, expected)
    if why is None:
        why = _tiling_differs(path, info.attrs, tiles, str(expected.get("tiles_sha256")))
    if why is None and patch_features and not info.has_patch_features:
        why = "file has no patch_features (made with --no-patch-features)"
    return why
