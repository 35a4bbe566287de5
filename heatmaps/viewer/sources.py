"""What ``hipt view`` may serve: the slides, heatmaps and run named on its command line.

The catalogue is built once at start-up. URLs name slides by id, never by path, so a request can
only reach a file listed here, and every listed file resolves (symlinks followed) inside one of
the folders the user named. A slide or heatmap folder whose real path lies elsewhere is left out
with a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from heatmaps.viewer.attention import GEOJSON_NAME, HEATMAP_JSON, ZARR_NAME
from hipt.names import is_safe_name

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
)  # fmt: skip


def inside(path: Path, root: Path) -> bool:
    """True when ``path``'s real location (symlinks resolved) is ``root`` or lies under it."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real == root or real.is_relative_to(root)


@dataclass
class SlideEntry:
    """One slide the viewer lists: its file, its heatmap folder and what a run says about it."""

    slide_id: str
    path: Path
    heatmap_dir: Path | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def zarr_path(self) -> Path | None:
        return self._heatmap_file(ZARR_NAME)

    @property
    def geojson_path(self) -> Path | None:
        return self._heatmap_file(GEOJSON_NAME)

    def _heatmap_file(self, name: str) -> Path | None:
        if self.heatmap_dir is None:
            return None
        p = self.heatmap_dir / name
        return p if inside(p, self.heatmap_dir.resolve()) else None

    def version(self) -> str:
        """Changes whenever the slide or its heatmap is rewritten (part of tile ETags)."""
        parts = [self.path]
        if self.heatmap_dir is not None:
            parts += [self.heatmap_dir / ZARR_NAME, self.heatmap_dir / GEOJSON_NAME]
        stamps = []
        for p in parts:
            try:
                st = p.stat()
                stamps.append(f"{st.st_mtime_ns:x}{st.st_size:x}")
            except OSError:
                stamps.append("0")
        return hashlib.sha1("|".join(stamps).encode()).hexdigest()[:12]


def _warn(message: str) -> None:
    print(f"hipt view: {message}", file=sys.stderr)


def _slide_files(source: Path) -> tuple[Path, list[Path]]:
    """The allowed root and the slide files under it (a folder's, or the one file named)."""
    if source.is_file():
        return source.resolve(), [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such slide or folder")
    files = sorted(
        p
        for p in source.iterdir()
        if p.suffix.lower() in SLIDE_EXTENSIONS and not p.name.startswith(".")
    )
    return source.resolve(), files


def _run_rows(run: Path) -> dict[str, dict[str, object]]:
    """Per slide id, what ``hipt train``'s ``predictions.csv`` files in ``run`` say about it."""
    files = sorted(run.glob("fold_*/predictions.csv")) or sorted(run.glob("predictions.csv"))
    if not files:
        raise FileNotFoundError(f"{run}: no fold_*/predictions.csv (is it a hipt train run?)")
    out: dict[str, dict[str, object]] = {}
    for f in files:
        fold = f.parent.name.removeprefix("fold_") if f.parent != run else ""
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                info = _prediction_info(row, fold)
                for slide_id in (row.get("slide_ids") or "").split(";"):
                    if slide_id:
                        out[slide_id] = info
    return out


def _number(value: str | None) -> float | str | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else None  # "nan" in a CSV: no value


def _prediction_info(row: dict[str, str], fold: str) -> dict[str, object]:
    info: dict[str, object] = {"case_id": row.get("case_id"), "fold": fold}
    if "pred" in row:  # subtyping
        probs = {
            k.removeprefix("prob_"): _number(v) for k, v in row.items() if k.startswith("prob_")
        }
        info.update(label=row.get("label"), prediction=row.get("pred"))
        if row.get("pred") in probs:
            info["probability"] = probs[row["pred"]]
    if "risk" in row:  # survival
        info.update(
            risk=_number(row.get("risk")),
            survival_months=_number(row.get("survival_months")),
            event=_number(row.get("event")),
        )
    return info


class Catalogue:
    """The slides ``hipt view`` serves, keyed by slide id.

    Parameters
    ----------
    source : path-like
        A slide file or a folder of slides.
    heatmaps : path-like, optional
        The folder holding ``<slide_id>/attention.ome.zarr`` (and ``attention.geojson``).
    run : path-like, optional
        A ``hipt train`` output folder; its predictions label the slides in the cohort list.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        heatmaps: str | os.PathLike | None = None,
        run: str | os.PathLike | None = None,
    ) -> None:
        root, files = _slide_files(Path(source))
        heat_root = Path(heatmaps).resolve() if heatmaps is not None else None
        if heat_root is not None and not heat_root.is_dir():
            raise FileNotFoundError(f"{heatmaps}: no such heatmaps folder")
        predictions = _run_rows(Path(run)) if run is not None else {}
        self.slides: dict[str, SlideEntry] = {}
        for path in files:
            slide_id = path.stem
            if not is_safe_name(slide_id):
                _warn(f"{path}: skipped, its name is not a safe slide id")
            elif not inside(path, root):
                _warn(f"{path}: skipped, it is a link to a file outside {root}")
            elif slide_id in self.slides:
                _warn(f"{path}: skipped, slide id {slide_id!r} already taken")
            else:
                entry = SlideEntry(slide_id, path.resolve())
                entry.heatmap_dir = self._heatmap_dir(heat_root, slide_id)
                entry.info = dict(predictions.get(slide_id, {}))
                self.slides[slide_id] = entry
        self.has_run = run is not None

    @staticmethod
    def _heatmap_dir(heat_root: Path | None, slide_id: str) -> Path | None:
        if heat_root is None:
            return None
        d = heat_root / slide_id
        if not d.is_dir():
            return None
        if not inside(d, heat_root):
            _warn(f"{d}: skipped, it is a link to a folder outside {heat_root}")
            return None
        return d.resolve()

    def get(self, slide_id: str) -> SlideEntry | None:
        return self.slides.get(slide_id)

    def heatmap_meta(self, entry: SlideEntry) -> dict:
        """``heatmap.json`` of a slide (run, fold, hashes), or ``{}``."""
        if entry.heatmap_dir is None:
            return {}
        p = entry.heatmap_dir / HEATMAP_JSON
        if not inside(p, entry.heatmap_dir):
            return {}
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}
