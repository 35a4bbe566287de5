"""The run record of ``hipt embed``: one row per slide in ``embedding.csv``, merged across runs.

Every run (and every process writing the same output folder at the same time) merges its rows
into the file under a lock (:func:`hipt.runlock.locked_file`): it reads the rows on disk right
before writing, replaces only the rows of the slides it handled, and writes atomically. So a
resumed run, a run over one tiles file, or a second task on an overlapping shard never drops
another's rows. A ``locked`` row (the slide was being embedded by another live process) never
replaces a row already there: that process writes the real outcome.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hipt.atomic import write_text_atomic
from hipt.runlock import locked_file
from hipt.shard import Shard

__all__ = [
    "CSV_FIELDS",
    "SlideResult",
    "EmbedSummary",
    "RunRecord",
    "csv_name",
    "read_embedding_csv",
    "write_embedding_csv",
]

CSV_FIELDS = (
    "slide_id",
    "status",
    "n_regions",
    "seconds",
    "regions_per_s",
    "error",
    "features_path",
)
STATUSES = ("ok", "skipped", "failed", "locked")


@dataclass
class SlideResult:
    """One row of ``embedding.csv``: what happened to one slide in this run.

    ``status`` is ``ok``, ``skipped`` (a valid features file was reused), ``failed`` (``error``
    says why) or ``locked`` (another live process was embedding it; ``error`` names it).
    ``seconds`` is wall time from the slide's first region reaching the writer to its file being
    renamed into place; slides that share batches overlap, so per-slide rates do not add up to
    the run's rate. ``features_path`` is relative to the output root.
    """

    slide_id: str
    status: str
    n_regions: int = 0
    seconds: float = 0.0
    regions_per_s: float = 0.0
    error: str = ""
    features_path: str = ""


@dataclass
class EmbedSummary:
    """The result of :func:`hipt.embed.embed_tiles`: one :class:`SlideResult` per slide of this shard."""

    results: list[SlideResult]
    csv_path: Path
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)

    def _count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def n_ok(self) -> int:
        return self._count("ok")

    @property
    def n_skipped(self) -> int:
        return self._count("skipped")

    @property
    def n_failed(self) -> int:
        return self._count("failed")

    @property
    def n_locked(self) -> int:
        return self._count("locked")

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]


def csv_name(shard: Shard | None) -> str:
    """``embedding.csv``, or ``embedding.shard-I-of-N.csv`` for a shard of several."""
    return "embedding.csv" if shard is None or shard.count == 1 else f"embedding.{shard.tag}.csv"


def read_embedding_csv(path: str | os.PathLike) -> list[SlideResult]:
    """Rows of an ``embedding*.csv`` (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                SlideResult(
                    slide_id=row["slide_id"],
                    status=row["status"],
                    n_regions=int(row.get("n_regions") or 0),
                    seconds=float(row.get("seconds") or 0.0),
                    regions_per_s=float(row.get("regions_per_s") or 0.0),
                    error=row.get("error", ""),
                    features_path=row.get("features_path", ""),
                )
            )
    return rows


def _merge(on_disk: Iterable[SlideResult], mine: Iterable[SlideResult]) -> list[SlideResult]:
    merged = {r.slide_id: r for r in on_disk}
    for r in mine:
        if r.status == "locked" and r.slide_id in merged:
            continue  # the process holding the slide records its outcome
        merged[r.slide_id] = r
    return [merged[k] for k in sorted(merged)]


def write_embedding_csv(path: str | os.PathLike, results: Iterable[SlideResult]) -> None:
    """Merge ``results`` into the CSV at ``path`` under its lock, replacing their slides' rows."""
    path = Path(path)
    results = list(results)
    with locked_file(path):
        rows = _merge(read_embedding_csv(path), results)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            row = asdict(r)
            row["seconds"] = f"{row['seconds']:.3f}"
            row["regions_per_s"] = f"{row['regions_per_s']:.4f}"
            writer.writerow(row)
        write_text_atomic(path, buf.getvalue())


class RunRecord:
    """This run's rows: each :meth:`add` updates the CSV at once, from any thread.

    The file is rewritten per slide so that a killed run's record already holds every slide it
    finished.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, SlideResult] = {}
        self._lock = threading.Lock()

    def add(self, result: SlideResult, *, write: bool = True) -> None:
        with self._lock:
            self.results[result.slide_id] = result
            if write:
                write_embedding_csv(self.path, [result])

    def flush(self) -> None:
        """Write every row of this run (after :meth:`add` calls with ``write=False``)."""
        with self._lock:
            if self.results:
                write_embedding_csv(self.path, self.results.values())
