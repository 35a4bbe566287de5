"""The HDF5 file formats that join the stages (schema version 1): one module, every reader and writer.

``tiles/<slide_id>.h5`` holds the region grid of a slide; ``features/<slide_id>.h5`` holds its
patch and region embeddings. Both are written to a temporary name and renamed, so a file with the
final name is always complete; readers still check the schema string and shapes and name the file
when something is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hipt.atomic import atomic_path

TILES_SCHEMA = "hipt.tiles/1"
FEATURES_SCHEMA = "hipt.features/1"

TILES_REQUIRED_ATTRS = (
    "slide_id",
    "slide_path",
    "slide_size",
    "mpp_level0",
    "mpp_source",
    "target_mpp",
    "region_size",
    "region_size_level0",
    "read_level",
    "patch_size",
    "token_size",
)
FEATURES_REQUIRED_ATTRS = (
    "slide_id",
    "target_mpp",
    "vit256_sha256",
    "vit4k_sha256",
    "mean",
    "std",
    "hipt_version",
)


class SchemaError(ValueError):
    """A file does not follow the hipt schema; the message names the file and what is wrong."""


def _attr(value: Any) -> Any:
    """Turn numpy scalars into plain Python values (h5py returns numpy types)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _encode_attr(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, dict):
        import json

        return json.dumps(value, sort_keys=True)
    return value


def _checked_header(
    f: h5py.File, path: Path, schema: str, required: tuple[str, ...], dataset: str
) -> dict[str, Any]:
    """The root attrs of ``f`` after checking its schema string, required attrs and datasets."""
    found = _attr(f.attrs.get("schema", ""))
    if found != schema:
        raise SchemaError(f"{path}: schema is {found!r}, expected {schema!r}")
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    missing = [k for k in required if k not in attrs]
    if missing:
        kind = schema.split(".")[1].split("/")[0]
        raise SchemaError(f"{path}: {kind} attrs missing {missing}")
    if "coords" not in f or dataset not in f:
        raise SchemaError(f"{path}: needs datasets 'coords' and {dataset!r}")
    return attrs


# --------------------------------------------------------------------------- tiles
@dataclass
class Tiles:
    """The content of a tiles file: region coordinates (level-0 x, y) and their tissue fraction."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def write_tiles(
    path: str | os.PathLike,
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    attrs: Mapping[str, Any],
) -> Path:
    """Write ``tiles/<slide_id>.h5`` atomically.

    ``attrs`` must hold every name in :data:`TILES_REQUIRED_ATTRS`; extra keys (segmentation
    parameters, reader) are kept too. The ``coords`` dataset also gets CLAM's ``patch_level`` and
    ``patch_size`` attrs so CLAM-style tools read it.
    """
    path = Path(path)
    missing = [k for k in TILES_REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise SchemaError(f"{path}: tiles attrs missing {missing}")
    if int(attrs["read_level"]) != 0 and "region_size_read_level" not in attrs:
        # CLAM's patch_size is in read-level pixels; the level-0 size would be wrong there.
        raise SchemaError(f"{path}: tiles read above level 0 need 'region_size_read_level'")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    tissue_fraction = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(tissue_fraction):
        raise SchemaError(
            f"{path}: {len(coords)} coords but {len(tissue_fraction)} tissue fractions"
        )
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = TILES_SCHEMA
            for key, value in attrs.items():
                f.attrs[key] = _encode_attr(value)
            d = f.create_dataset("coords", data=coords)
            d.attrs["patch_level"] = int(attrs["read_level"])
            # CLAM's patch_size is the region's side in pixels of the read level.
            d.attrs["patch_size"] = int(
                attrs.get("region_size_read_level", attrs["region_size_level0"])
            )
            f.create_dataset("tissue_fraction", data=tissue_fraction)
    return path


def read_tiles(path: str | os.PathLike) -> Tiles:
    """Read and check a tiles file; raise :class:`SchemaError` naming the file if it is not valid."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = _checked_header(f, path, TILES_SCHEMA, TILES_REQUIRED_ATTRS, "tissue_fraction")
            coords = f["coords"][()]
            tissue = f["tissue_fraction"][()]
    except OSError as exc:
        raise SchemaError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.int64:
        raise SchemaError(f"{path}: coords must be int64 [N, 2], got {coords.dtype} {coords.shape}")
    if tissue.shape != (coords.shape[0],):
        raise SchemaError(f"{path}: tissue_fraction shape {tissue.shape} != ({coords.shape[0]},)")
    return Tiles(coords=coords, tissue_fraction=tissue, attrs=attrs, path=path)


# ------------------------------------------------------------------------ features
@dataclass
class FeaturesInfo:
    """Header of a features file: its attrs and the number of regions, without loading arrays."""

    path: Path
    attrs: dict[str, Any]
    n_regions: int
    has_patch_features: bool

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])


class FeaturesWriter:
    """Write ``features/<slide_id>.h5`` region by region into a temporary file, renamed on close.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "s1.h5"
    >>> attrs = dict(slide_id="s1", target_mpp=0.5, vit256_sha256="a", vit4k_sha256="b",
    ...              mean=[0.5] * 3, std=[0.5] * 3, hipt_version="0")
    >>> coords = np.zeros((2, 2), dtype=np.int64)
    >>> with FeaturesWriter(out, coords, attrs) as w:
    ...     w.write(0, np.zeros((2, 256, 384)), np.zeros((2, 192)))
    >>> read_features_info(out).n_regions
    2
    """

    def __init__(
        self,
        path: str | os.PathLike,
        coords: np.ndarray,
        attrs: Mapping[str, Any],
        *,
        patch_features: bool = True,
        patch_dim: int = 384,
        region_dim: int = 192,
    ) -> None:
        self.path = Path(path)
        missing = [k for k in FEATURES_REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise SchemaError(f"{self.path}: features attrs missing {missing}")
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.attrs = dict(attrs)
        self.patch_features = patch_features
        self.patch_dim, self.region_dim = patch_dim, region_dim
        self._ctx = None
        self._file: h5py.File | None = None
        self._written = np.zeros(len(self.coords), dtype=bool)

    def __enter__(self) -> FeaturesWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        m = len(self.coords)
        f = h5py.File(tmp, "w")
        try:
            f.attrs["schema"] = FEATURES_SCHEMA
            for key, value in self.attrs.items():
                f.attrs[key] = _encode_attr(value)
            f.create_dataset("coords", data=self.coords)
            if self.patch_features:
                f.create_dataset(
                    "patch_features",
                    shape=(m, 256, self.patch_dim),
                    dtype=np.float16,
                    chunks=(1, 256, self.patch_dim) if m else None,
                )
            f.create_dataset("region_features", shape=(m, self.region_dim), dtype=np.float32)
        except BaseException as exc:
            f.close()
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)  # drops the temporary file
            raise
        self._file = f
        return self

    def write(
        self, start: int, patch_features: np.ndarray | None, region_features: np.ndarray
    ) -> None:
        """Store rows ``start : start + len(region_features)``."""
        assert self._file is not None, "use FeaturesWriter as a context manager"
        stop = start + len(region_features)
        self._file["region_features"][start:stop] = np.asarray(region_features, dtype=np.float32)
        if self.patch_features:
            if patch_features is None:
                raise ValueError("this writer stores patch features; pass them")
            self._file["patch_features"][start:stop] = np.asarray(patch_features, dtype=np.float16)
        self._written[start:stop] = True

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._ctx is not None
        self._file.close()
        if exc_type is not None:
            self._ctx.__exit__(exc_type, exc, tb)  # drops the temporary file
            return
        if not self._written.all():
            err = SchemaError(f"{self.path}: {int((~self._written).sum())} regions never written")
            self._ctx.__exit__(SchemaError, err, None)
            raise err
        self._ctx.__exit__(None, None, None)


def read_features_info(path: str | os.PathLike) -> FeaturesInfo:
    """Check a features file's schema and shapes without loading its arrays."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = _checked_header(
                f, path, FEATURES_SCHEMA, FEATURES_REQUIRED_ATTRS, "region_features"
            )
            coords = f["coords"]
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.int64:
                raise SchemaError(
                    f"{path}: coords must be int64 [M, 2], got {coords.dtype} {coords.shape}"
                )
            m = coords.shape[0]
            if f["region_features"].shape[0] != m or f["region_features"].ndim != 2:
                raise SchemaError(
                    f"{path}: region_features shape {f['region_features'].shape}, expected [{m}, D]"
                )
            has_patch = "patch_features" in f
            if has_patch and (
                f["patch_features"].shape[:2] != (m, 256) or f["patch_features"].ndim != 3
            ):
                raise SchemaError(
                    f"{path}: patch_features shape {f['patch_features'].shape}, expected [{m}, 256, D]"
                )
    except OSError as exc:
        raise SchemaError(f"{path}: not a readable HDF5 file ({exc})") from exc
    return FeaturesInfo(path=path, attrs=attrs, n_regions=m, has_patch_features=has_patch)


def read_features(
    path: str | os.PathLike, *, patch_features: bool = False
) -> dict[str, np.ndarray]:
    """Load a features file's arrays: ``coords``, ``region_features`` and, if asked, ``patch_features``."""
    info = read_features_info(path)
    out: dict[str, np.ndarray] = {}
    with h5py.File(info.path, "r") as f:
        out["coords"] = f["coords"][()]
        out["region_features"] = f["region_features"][()]
        if patch_features:
            if not info.has_patch_features:
                raise SchemaError(
                    f"{info.path}: has no patch_features (embedded with --no-patch-features?)"
                )
            out["patch_features"] = f["patch_features"][()]
    return out
