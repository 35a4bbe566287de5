"""``hipt inspect FILE.h5``: what a tiles or features file holds, where it came from, and whether it is valid.

Prints the schema, every dataset with its shape and dtype, the provenance attrs and a validity
verdict. Every row is read, so damaged data (a checksum mismatch) makes the file invalid. An invalid file makes the command exit with status 1 and a one-line reason naming the
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
import errno
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py

from hipt.h5schema import (
    FEATURES_SCHEMA,
    TILES_SCHEMA,
    SchemaError,
    _attr,
    read_features_info,
    read_tiles,
    verify_data,
)

__all__ = ["DatasetInfo", "InspectReport", "inspect_file", "format_report", "add_arguments", "main"]


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
    # By link name, so a hard link (features -> region_features) is listed under both names.
    found: list[DatasetInfo] = []

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            obj = group[name]
            if isinstance(obj, h5py.Group):
                visit(obj, f"{prefix}{name}/")
            elif isinstance(obj, h5py.Dataset):
                found.append(
                    DatasetInfo(
                        name=f"{prefix}{name}",
                        shape=tuple(int(s) for s in obj.shape),
                        dtype=str(obj.dtype),
                        attrs={k: _attr(v) for k, v in obj.attrs.items()},
                    )
                )

    visit(f, "")
    return found


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (None when it is a regular file)."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: a symlink loop (it points back to itself)"
        if path.is_symlink():
            return f"{path}: a dangling symlink (to {os.readlink(path)})"
        return f"{path}: no such file"
    if stat.S_ISDIR(st.st_mode):
        return f"{path}: is a directory; pass the .h5 files in it (e.g. {path}/*.h5)"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    return None


def inspect_file(
    path: str | os.PathLike, *, check_values: bool = False, verify: bool = True
) -> InspectReport:
    """Describe and validate a tiles or features file.

    Every check is :mod:`hipt.h5schema`'s, so a file valid here is one every stage reads.

    Parameters
    ----------
    path : path-like
        A ``tiles/<slide_id>.h5`` or ``features/<slide_id>.h5`` file.
    check_values : bool
        Also scan the arrays for NaN/inf.
    verify : bool
        Read every row so that damaged data (a checksum mismatch) is found (default).

    Returns
    -------
    InspectReport
        Never raises for a bad file; ``valid`` and ``problem`` say what is wrong.
    """
    path = Path(path)
    why = _not_a_file(path)
    if why is not None:
        return InspectReport(str(path), "unknown", "", None, [], {}, False, why)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            datasets = _walk(f)
    except OSError as exc:
        msg = f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())})"
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
        elif kind == "features":
            read_features_info(path)
        else:
            raise SchemaError(
                f"{path}: schema is {schema!r}; expected {TILES_SCHEMA!r} or {FEATURES_SCHEMA!r}"
            )
        if verify or check_values:
            verify_data(path, finite=check_values)
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
        help="also scan the arrays for NaN/inf",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="check the header and shapes only, without reading the data (no checksum check)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")


def main(args: argparse.Namespace) -> int:
    """Run ``hipt inspect``; exit status 1 when any file is invalid."""
    status = 0
    for i, path in enumerate(args.files):
        report = inspect_file(path, check_values=args.check_values, verify=not args.no_verify)
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
