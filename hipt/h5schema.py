"""The HDF5 file formats that join the stages (schema version 1): one module, every reader and writer.

``tiles/<slide_id>.h5`` holds the region grid of a slide; ``features/<slide_id>.h5`` holds its
patch and region embeddings. Both are written to a temporary name and renamed, so a file with the
final name is always complete; readers still check the schema string, the type of every attr,
the dtype and shape of every dataset, and name the file and the attr or dataset when something is
wrong. Every check of the formats lives here: ``hipt inspect``, the embedding's reuse check and
the readers of every stage call these functions, so they never disagree on what is valid.

Datasets are written with HDF5's Fletcher-32 checksum, so a read of damaged data fails loudly
(:func:`verify_data` reads a whole file to find out). Files written before checksums (still
schema 1) read as before, unchecked.

Features files also carry ``features``, an HDF5 hard link to ``region_features`` (the same data,
no copy), and a ``name`` attr on ``coords``: the names CLAM's training and stitching code read.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hipt.atomic import atomic_path
from hipt.faults import DiskFull

TILES_SCHEMA = "hipt.tiles/1"
FEATURES_SCHEMA = "hipt.features/1"
PATCH_DIM = 384  # ViT-256 [CLS] width
REGION_DIM = 192  # ViT-4K [CLS] width
CLAM_FEATURES = "features"  # the hard link CLAM's loaders read

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
# Rows read per block when a whole dataset is checked: bounded memory (~200 KB a patch row).
_BLOCK_ROWS = 64


class SchemaError(ValueError):
    """A file does not follow the hipt schema; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------- attr types
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return None if ok and math.isfinite(value) and value > 0 else "a finite number > 0"


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if _is_int(value) and value >= low else f"an integer >= {low}"

    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _numbers(n: int, check: Callable[[Any], str | None], each: str) -> Callable[[Any], str | None]:
    def check_list(value: Any) -> str | None:
        if isinstance(value, list) and len(value) == n and all(check(v) is None for v in value):
            return None
        return f"a list of {n} {each}"

    return check_list


def _any_number(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "a finite number"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) or value in (0, 1) else "true/false (or 0/1)"


# What each attr must hold; optional attrs are checked only when present. A writer that adds an
# attr (edge fill, upsampling factor) adds its line here, and every reader checks it.
TILES_ATTR_TYPES: dict[str, Callable[[Any], str | None]] = {
    "slide_id": _text,
    "slide_path": _text,
    "slide_size": _numbers(2, _int_at_least(1), "integers >= 1"),
    "mpp_level0": _positive_number,
    "mpp_source": _text,
    "target_mpp": _positive_number,
    "region_size": _int_at_least(1),
    "region_size_level0": _int_at_least(1),
    "region_size_read_level": _int_at_least(1),
    "read_level": _int_at_least(0),
    "patch_size": _int_at_least(1),
    "token_size": _int_at_least(1),
    "slide_file_bytes": _int_at_least(0),
}
FEATURES_ATTR_TYPES: dict[str, Callable[[Any], str | None]] = {
    "slide_id": _text,
    "target_mpp": _positive_number,
    "mpp_level0": _positive_number,
    "vit256_sha256": _text,
    "vit4k_sha256": _text,
    "tiles_sha256": _text,
    "mean": _numbers(3, _any_number, "finite numbers"),
    "std": _numbers(3, _positive_number, "finite numbers > 0"),
    "hipt_version": _text,
    "region_size": _int_at_least(1),
    "region_dim": _int_at_least(1),
    "reader": _text,
    "random_weights": _flag,
}


def _check_attr_types(path: Path, attrs: Mapping[str, Any], types: Mapping[str, Any]) -> None:
    for key, check in types.items():
        if key in attrs:
            wanted = check(attrs[key])
            if wanted is not None:
                raise SchemaError(f"{path}: attr {key} is {attrs[key]!r}; expected {wanted}")


def _attr(value: Any) -> Any:
    """Turn numpy scalars into plain Python values (h5py returns numpy types)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_attr(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
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
    """The root attrs of ``f`` after checking its schema string, attrs and required datasets."""
    found = _attr(f.attrs.get("schema", ""))
    if found != schema:
        raise SchemaError(f"{path}: schema is {found!r}, expected {schema!r}")
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    missing = [k for k in required if k not in attrs]
    if missing:
        kind = schema.split(".")[1].split("/")[0]
        raise SchemaError(f"{path}: {kind} attrs missing {missing}")
    types = TILES_ATTR_TYPES if schema == TILES_SCHEMA else FEATURES_ATTR_TYPES
    _check_attr_types(path, attrs, types)
    if "coords" not in f or dataset not in f:
        raise SchemaError(f"{path}: needs datasets 'coords' and {dataset!r}")
    return attrs


def _check_datasets(path: Path, f: h5py.File, layout: Mapping[str, tuple[Any, tuple]]) -> int:
    """Check dtype and trailing shape of each dataset in ``layout``; return the common row count."""
    rows = None
    for name, (dtype, tail) in layout.items():
        if name not in f:
            continue  # presence of the required datasets is checked by _checked_header
        d = f[name]
        if not isinstance(d, h5py.Dataset):
            raise SchemaError(f"{path}: {name} is not a dataset")
        if d.dtype != np.dtype(dtype):
            raise SchemaError(f"{path}: {name} is {d.dtype}, expected {np.dtype(dtype)}")
        if d.ndim != 1 + len(tail) or tuple(d.shape[1:]) != tail:
            want = ", ".join(["M", *map(str, tail)])
            raise SchemaError(f"{path}: {name} shape {tuple(d.shape)}, expected [{want}]")
        if rows is None:
            rows = int(d.shape[0])
        elif d.shape[0] != rows:
            raise SchemaError(f"{path}: {name} has {d.shape[0]} rows, coords has {rows}")
    return int(rows or 0)


def verify_data(path: str | os.PathLike, *, finite: bool = False) -> None:
    """Read every dataset of ``path`` in blocks: checksums (and, if asked, NaN/inf) are checked.

    Raises
    ------
    SchemaError
        Naming the file, the dataset and the first bad block: damaged data (a Fletcher-32
        checksum mismatch or an unreadable chunk) or, with ``finite``, a row holding NaN or inf.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for name, d in _datasets(f).items():
                _verify_dataset(path, name, d, finite)
    except OSError as exc:
        raise SchemaError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    # Root datasets by link name; a hard link ("features") is the same data, read once.
    seen: set[Any] = set()
    found = {}
    for name in sorted(f, key=lambda n: (n == CLAM_FEATURES, n)):
        obj = f[name]
        if isinstance(obj, h5py.Dataset) and obj.id not in seen:
            seen.add(obj.id)
            found[name] = obj
    return found


def _verify_dataset(path: Path, name: str, d: h5py.Dataset, finite: bool) -> None:
    n = d.shape[0] if d.shape else 1
    for start in range(0, n, _BLOCK_ROWS):
        try:
            block = d[start : start + _BLOCK_ROWS] if d.shape else d[()]
        except OSError as exc:
            raise SchemaError(
                f"{path}: {name} rows {start}-{min(n, start + _BLOCK_ROWS) - 1} are damaged "
                f"({' '.join(str(exc).split())})"
            ) from exc
        if finite and block.dtype.kind == "f" and not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block).reshape(len(block), -1).all(1))[0, 0])
            raise SchemaError(f"{path}: {name} row {bad} holds NaN or inf")


def _chunked(n_rows: int, row_shape: tuple[int, ...], row_bytes: int) -> dict[str, Any]:
    # Checksums need chunked storage. About 1 MiB per chunk; a features row of patch features
    # (196 KB) is its own chunk so that a region can be written alone.
    rows = max(1, min(max(n_rows, 1), (1 << 20) // max(1, row_bytes)))
    return dict(chunks=(rows, *row_shape), fletcher32=True, maxshape=(None, *row_shape))


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


TILES_LAYOUT = {"coords": (np.int64, (2,)), "tissue_fraction": (np.float32, ())}


def write_tiles(
    path: str | os.PathLike,
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    attrs: Mapping[str, Any],
) -> Path:
    """Write ``tiles/<slide_id>.h5`` atomically.

    ``attrs`` must hold every name in :data:`TILES_REQUIRED_ATTRS` with the types of
    :data:`TILES_ATTR_TYPES`; extra keys (segmentation parameters, reader) are kept too. The
    ``coords`` dataset also gets CLAM's ``patch_level`` and ``patch_size`` attrs so CLAM-style
    tools read it.
    """
    path = Path(path)
    missing = [k for k in TILES_REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise SchemaError(f"{path}: tiles attrs missing {missing}")
    _check_attr_types(path, {k: _attr(v) for k, v in attrs.items()}, TILES_ATTR_TYPES)
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
            d = f.create_dataset("coords", data=coords, **_chunked(len(coords), (2,), 16))
            d.attrs["patch_level"] = int(attrs["read_level"])
            # CLAM's patch_size is the region's side in pixels of the read level.
            d.attrs["patch_size"] = int(
                attrs.get("region_size_read_level", attrs["region_size_level0"])
            )
            d.attrs["name"] = str(attrs["slide_id"])
            chunks = _chunked(len(coords), (), 4)
            f.create_dataset("tissue_fraction", data=tissue_fraction, **chunks)
    return path


def read_tiles(path: str | os.PathLike) -> Tiles:
    """Read and check a tiles file; raise :class:`SchemaError` naming the file if it is not valid."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = _checked_header(f, path, TILES_SCHEMA, TILES_REQUIRED_ATTRS, "tissue_fraction")
            _check_datasets(path, f, TILES_LAYOUT)
            coords = f["coords"][()]
            tissue = f["tissue_fraction"][()]
    except OSError as exc:
        raise SchemaError(
            f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())})"
        ) from exc
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


def features_layout(attrs: Mapping[str, Any]) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Dtype and trailing shape of each features dataset.

    ``region_features`` is ``REGION_DIM`` wide unless the file declares another width in its
    ``region_dim`` attr (slide-level features of other encoders, test cohorts).
    """
    region_dim = int(attrs.get("region_dim", REGION_DIM))
    return {
        "coords": (np.int64, (2,)),
        "patch_features": (np.float16, (256, PATCH_DIM)),
        "region_features": (np.float32, (region_dim,)),
        CLAM_FEATURES: (np.float32, (region_dim,)),
    }


class FeaturesWriter:
    """Write ``features/<slide_id>.h5`` region by region into a temporary file, renamed on commit.

    As a context manager, a block that ends normally commits (every row must have been written)
    and one that raises aborts (drops the temporary file). :meth:`open`, :meth:`commit` and
    :meth:`abort` do the same by hand, for a driver that keeps many files open at once; both
    :meth:`commit` and :meth:`abort` may be called after a failed :meth:`open`.

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
        patch_dim: int = PATCH_DIM,
        region_dim: int = REGION_DIM,
    ) -> None:
        self.path = Path(path)
        missing = [k for k in FEATURES_REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise SchemaError(f"{self.path}: features attrs missing {missing}")
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.attrs = dict(attrs)
        if region_dim != REGION_DIM:
            self.attrs["region_dim"] = int(region_dim)
        self.patch_features = patch_features
        self.patch_dim, self.region_dim = patch_dim, region_dim
        self.tmp: Path | None = None
        self._file: h5py.File | None = None
        self._written = np.zeros(len(self.coords), dtype=bool)

    def bytes_needed(self) -> int:
        """About how large the finished file will be (data plus HDF5's bookkeeping)."""
        m = len(self.coords)
        patch = 256 * self.patch_dim * 2 if self.patch_features else 0
        return m * (patch + 4 * self.region_dim + 16) + (64 << 10)

    def open(self) -> FeaturesWriter:
        """Create the temporary file beside the final name; on failure nothing is left.

        Raises
        ------
        DiskFull
            When the file system has less room than the finished file needs: refused before
            HDF5 writes anything, because the library does not recover from a full disk
            mid-write (its objects can then crash the interpreter as they are freed).
        """
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.urandom(4).hex()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.path.parent).free < self.bytes_needed():
                raise DiskFull(str(self.path))
            self._file = h5py.File(self.tmp, "w")
            self._create_datasets(self._file)
        except BaseException:
            self.abort()
            raise
        return self

    def _create_datasets(self, f: h5py.File) -> None:
        m = len(self.coords)
        f.attrs["schema"] = FEATURES_SCHEMA
        for key, value in self.attrs.items():
            f.attrs[key] = _encode_attr(value)
        coords = f.create_dataset("coords", data=self.coords, **_chunked(m, (2,), 16))
        coords.attrs["name"] = str(self.attrs["slide_id"])  # CLAM's stitching reads it
        if self.patch_features:
            row = (256, self.patch_dim)
            f.create_dataset(
                "patch_features", shape=(m, *row), dtype=np.float16, **_chunked(1, row, 1 << 20)
            )
        row_bytes = 4 * self.region_dim
        f.create_dataset(
            "region_features",
            shape=(m, self.region_dim),
            dtype=np.float32,
            **_chunked(m, (self.region_dim,), row_bytes),
        )
        f[CLAM_FEATURES] = f["region_features"]  # a hard link: the same data under CLAM's name

    def write(
        self, start: int, patch_features: np.ndarray | None, region_features: np.ndarray
    ) -> None:
        """Store rows ``start : start + len(region_features)``."""
        if self._file is None:
            raise RuntimeError("FeaturesWriter.write before open (use it as a context manager)")
        stop = start + len(region_features)
        self._file["region_features"][start:stop] = np.asarray(region_features, dtype=np.float32)
        if self.patch_features:
            if patch_features is None:
                raise ValueError("this writer stores patch features; pass them")
            self._file["patch_features"][start:stop] = np.asarray(patch_features, dtype=np.float16)
        self._written[start:stop] = True

    @property
    def n_written(self) -> int:
        return int(self._written.sum())

    def commit(self) -> Path:
        """Close, fsync and rename onto the final name; every row must have been written."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: commit of a features file that is not open")
        if not self._written.all():
            self.abort()
            raise SchemaError(f"{self.path}: {int((~self._written).sum())} regions never written")
        try:
            self._file.close()
            self._file = None
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.tmp = None
        return self.path

    def abort(self) -> None:
        """Close and drop the temporary file (nothing under the final name changes)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: S110 - the file is dropped anyway; keep the first error
                pass
            self._file = None
        if self.tmp is not None:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
            self.tmp = None

    def __enter__(self) -> FeaturesWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.commit()


def read_features_info(path: str | os.PathLike, *, verify: bool = False) -> FeaturesInfo:
    """Check a features file's schema, attr types and shapes; ``verify`` also reads every row.

    ``verify`` checks the data's checksums (see :func:`verify_data`), so damaged data is found
    before it is trusted; without it no array is loaded.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = _checked_header(
                f, path, FEATURES_SCHEMA, FEATURES_REQUIRED_ATTRS, "region_features"
            )
            m = _check_datasets(path, f, features_layout(attrs))
            has_patch = "patch_features" in f
    except OSError as exc:
        raise SchemaError(
            f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())})"
        ) from exc
    if verify:
        verify_data(path)
    return FeaturesInfo(path=path, attrs=attrs, n_regions=m, has_patch_features=has_patch)


def read_features(
    path: str | os.PathLike, *, patch_features: bool = False
) -> dict[str, np.ndarray]:
    """Load a features file's arrays: ``coords``, ``region_features`` and, if asked, ``patch_features``.

    Raises
    ------
    SchemaError
        The file breaks the schema (the same checks as ``hipt inspect``) or its data is damaged.
    """
    info = read_features_info(path)
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(info.path, "r") as f:
            out["coords"] = f["coords"][()]
            out["region_features"] = f["region_features"][()]
            if patch_features:
                if not info.has_patch_features:
                    raise SchemaError(
                        f"{info.path}: has no patch_features (embedded with --no-patch-features?)"
                    )
                out["patch_features"] = f["patch_features"][()]
    except OSError as exc:
        raise SchemaError(f"{info.path}: damaged data ({' '.join(str(exc).split())})") from exc
    return out
