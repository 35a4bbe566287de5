"""``hipt inspect FILE.h5``: what a tiles or features file holds, where it came from, and whether it is valid.

Prints the schema, every dataset with its shape and dtype, the provenance attrs and a validity
verdict. An invalid file makes the command exit with status 1 and a one-line reason naming the
file, so the output can go straight into a bug report.

Examples
--------
>>> import tempfile, pathlib, numpy as np
>>> from hipt.h5schema import FeaturesWriter
>>> out = pathlib.Path(tempfile.mkdtemp()) / "s1.h5"
>>> attrs = dict(slide_id="s1", target_mpp=0.5, vit256_sha256="a", vit4k_sha256="b",
...              mean=[0.5] * 3, std=[0.5] * 3, hipt_version="0")
>>> with FeaturesWriter(out, np.zeros((1, 2), np.int64), attrs) as w:
...     w.write(0, np.zeros((1, 256, 384)), np.zeros((1, 192)))
>>> report = inspect_file(out)
>>> report.kind, report.valid
('features', True)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hipt.h5schema import (
    FEATURES_SCHEMA,
    TILES_SCHEMA,
    SchemaError,
    _attr,
    read_features_info,
    read_tiles,
)

__all__ = ["DatasetInfo", "InspectReport", "inspect_file", "format_report", "add_arguments", "main"]

# Per-dataset dtype and trailing shape the schema fixes; the first axis is the region count.
_FEATURES_LAYOUT = {
    "coords": (np.int64, (2,)),
    "patch_features": (np.float16, (256, 384)),
    "region_features": (np.float32, (192,)),
}
_TILES_LAYOUT = {
    "coords": (np.int64, (2,)),
    "tissue_fraction": (np.float32, ()),
}
# Rows of patch_features checked per read when scanning values: bounded memory (~200 KB a row).
_SCAN_ROWS = 64


@dataclass
class DatasetInfo:
    """Name, shape, dtype and attrs of one HDF5 dataset."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class InspectReport:
    """What :func:`inspect_file` found.

    ``kind`` is ``"tiles"``, ``"features"`` or ``"unknown"``; ``problem`` is the one-line reason
    when ``valid`` is False.
    """

    path: str
    kind: str
    schema: str
    n_regions: int | None
    datasets: list[DatasetInfo]
    attrs: dict[str, Any]
    valid: bool
    problem: str | None = None


def _walk(f: h5py.File) -> list[DatasetInfo]:
    found: list[DatasetInfo] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append(
                DatasetInfo(
                    name=name,
                    shape=tuple(int(s) for s in obj.shape),
                    dtype=str(obj.dtype),
                    attrs={k: _attr(v) for k, v in obj.attrs.items()},
                )
            )

    f.visititems(visit)
    return found


def _check_layout(path: Path, f: h5py.File, layout: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
    m = None
    for name, (dtype, tail) in layout.items():
        if name not in f:
            continue  # presence of the required datasets is the schema reader's job
        d = f[name]
        if d.dtype != np.dtype(dtype):
            raise SchemaError(f"{path}: {name} is {d.dtype}, expected {np.dtype(dtype)}")
        if tuple(d.shape[1:]) != tail:
            want = ", ".join(["M", *map(str, tail)])
            raise SchemaError(f"{path}: {name} shape {tuple(d.shape)}, expected [{want}]")
        if m is None:
            m = d.shape[0]
        elif d.shape[0] != m:
            raise SchemaError(f"{path}: {name} has {d.shape[0]} rows, coords has {m}")


def _scan_values(path: Path, f: h5py.File) -> None:
    for name in ("region_features", "patch_features", "tissue_fraction"):
        if name not in f:
            continue
        d = f[name]
        for start in range(0, d.shape[0], _SCAN_ROWS):
            block = d[start : start + _SCAN_ROWS]
            if not np.isfinite(block).all():
                bad = start + int(
                    np.argwhere(~np.isfinite(block).reshape(len(block), -1).all(1))[0, 0]
                )
                raise SchemaError(f"{path}: {name} row {bad} holds NaN or inf")


def inspect_file(path: str | os.PathLike, *, check_values: bool = False) -> InspectReport:
    """Describe and validate a tiles or features file.

    Parameters
    ----------
    path : path-like
        A ``tiles/<slide_id>.h5`` or ``features/<slide_id>.h5`` file.
    check_values : bool
        Also scan the feature arrays for NaN/inf (reads the whole file in bounded blocks).

    Returns
    -------
    InspectReport
        Never raises for a bad file; ``valid`` and ``problem`` say what is wrong.
    """
    path = Path(path)
    if not path.exists():
        return InspectReport(str(path), "unknown", "", None, [], {}, False, f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            datasets = _walk(f)
    except OSError as exc:
        msg = f"{path}: not a readable HDF5 file ({exc})"
        return InspectReport(str(path), "unknown", "", None, [], {}, False, msg)

    schema = str(attrs.get("schema", ""))
    names = {d.name for d in datasets}
    if schema == TILES_SCHEMA or (not schema and "tissue_fraction" in names):
        kind = "tiles"
    elif schema == FEATURES_SCHEMA or (not schema and "region_features" in names):
        kind = "features"
    else:
        kind = "unknown"
    coords = next((d for d in datasets if d.name == "coords"), None)
    n_regions = coords.shape[0] if coords is not None and coords.shape else None
    report = InspectReport(str(path), kind, schema, n_regions, datasets, attrs, True)

    try:
        if kind == "tiles":
            read_tiles(path)
            layout = _TILES_LAYOUT
        elif kind == "features":
            read_features_info(path)
            layout = _FEATURES_LAYOUT
        else:
            raise SchemaError(
                f"{path}: schema is {schema!r}; expected {TILES_SCHEMA!r} or {FEATURES_SCHEMA!r}"
            )
        with h5py.File(path, "r") as f:
            _check_layout(path, f, layout)
            if check_values:
                _scan_values(path, f)
    except SchemaError as exc:
        report.valid, report.problem = False, str(exc)
    return report


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    return str(value)


def format_report(report: InspectReport) -> str:
    """The human-readable text ``hipt inspect`` prints."""
    lines = [f"file:     {report.path}"]
    lines.append(
        f"kind:     {report.kind}" + (f" (schema {report.schema})" if report.schema else "")
    )
    if report.n_regions is not None:
        lines.append(f"regions:  {report.n_regions}")
    if report.datasets:
        lines.append("datasets:")
        width = max(len(d.name) for d in report.datasets)
        for d in report.datasets:
            shape = "[" + ", ".join(map(str, d.shape)) + "]"
            extra = ""
            if d.attrs:
                extra = (
                    "  ("
                    + ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(d.attrs.items()))
                    + ")"
                )
            lines.append(f"  {d.name:<{width}}  {d.dtype:<8} {shape}{extra}")
    if report.attrs:
        lines.append("attrs:")
        width = max(len(k) for k in report.attrs)
        for key in sorted(report.attrs):
            lines.append(f"  {key:<{width}} = {_fmt_value(report.attrs[key])}")
    lines.append("valid:    yes" if report.valid else f"valid:    NO: {report.problem}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hipt inspect``."""
    parser.add_argument(
        "files", nargs="+", type=Path, metavar="FILE.h5", help="tiles or features file(s)"
    )
    parser.add_argument(
        "--check-values",
        action="store_true",
        help="also scan the feature arrays for NaN/inf (reads the whole file)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")


def main(args: argparse.Namespace) -> int:
    """Run ``hipt inspect``; exit status 1 when any file is invalid."""
    status = 0
    for i, path in enumerate(args.files):
        report = inspect_file(path, check_values=args.check_values)
        if args.json:
            print(json.dumps(asdict(report), default=str))
        else:
            if i:
                print()
            print(format_report(report))
        if not report.valid:
            print(f"error: {report.problem}", file=sys.stderr)
            status = 1
    return status
