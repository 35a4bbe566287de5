"""The streaming loop of ``hipt embed``: read, batch, encode, write.

Regions arrive from the loader in dataset order, in the slots of a :class:`RegionRing`; the main
thread groups them into batches (a batch may span several small slides) and runs the encoder;
one writer thread (:class:`FeaturesFiles`) writes each run of rows of one slide into its
features file and commits the file when its last row is in. Writing batch n overlaps reading
and encoding batch n + 1; at most one batch waits for the writer, and h5py is used from that
thread only.

A slide whose regions cannot be read, whose file cannot be created or written fails alone. A
full disk stops the run (:class:`hipt.faults.DiskFull`): every later write would fail too. On
any exception, Ctrl-C or SIGTERM (:class:`hipt.faults.Terminated`), the loader's workers are
stopped and every unfinished temporary file is dropped before the exception propagates.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from hipt.embed.data import RegionDataset, RegionRing, make_region_loader
from hipt.embed.plan import EmbedJob, features_rel
from hipt.embed.records import SlideResult
from hipt.faults import DiskFull, disk_full_message
from hipt.h5schema import FeaturesWriter

__all__ = ["StreamSettings", "FeaturesFiles", "stream_regions"]


@dataclass(frozen=True)
class StreamSettings:
    """How regions stream: batch size, reading processes, reader, and what is stored."""

    batch_regions: int = 4
    workers: int = 0
    reader: str = "auto"
    patch_features: bool = True
    prefetch: int = 2


@dataclass
class _Open:
    """A slide whose features file is being written."""

    writer: FeaturesWriter
    started: float


def _runs(slides: list[int], rows: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """``(slide, first row, i, j)`` for each run ``i:j`` of consecutive rows of one slide."""
    i = 0
    while i < len(slides):
        j = i + 1
        while j < len(slides) and slides[j] == slides[i] and rows[j] == rows[j - 1] + 1:
            j += 1
        yield slides[i], rows[i], i, j
        i = j


class FeaturesFiles:
    """The features files of a run, written by one background thread.

    Parameters
    ----------
    jobs : list of EmbedJob
        The slides; a slide is referred to by its index here.
    patch_features : bool
        Whether files store ``patch_features``.
    bar : progress bar with ``update(n)`` and ``write(line)``
    record : callable
        Called with each slide's :class:`SlideResult` as it finishes (from the writer thread).
    """

    def __init__(
        self,
        jobs: list[EmbedJob],
        patch_features: bool,
        bar: Any,
        record: Callable[[SlideResult], None],
    ) -> None:
        self.jobs, self.patch_features = jobs, patch_features
        self.bar, self.record = bar, record
        self.failed: set[int] = set()  # read by the main thread to skip a failed slide's regions
        self._open: dict[int, _Open] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hipt-features")
        self._pending: Future | None = None

    # -- main thread
    def write(
        self, slides: list[int], rows: list[int], patch: Any, region: Any, readers: list[str]
    ) -> None:
        """Queue encoded rows; waits for the batch before (re-raising its DiskFull)."""
        self._submit(self._write_rows, slides, rows, patch, region, readers)

    def fail(self, k: int, message: str) -> None:
        """Fail slide ``k`` (its regions could not be read)."""
        if k not in self.failed:
            self.failed.add(k)
            self._submit(self._fail, k, message)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        previous, self._pending = self._pending, self._pool.submit(fn, *args)
        if previous is not None:
            previous.result()

    def __enter__(self) -> FeaturesFiles:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                self._submit(self._fail_unfinished)
                self._pending.result()
        finally:
            # Let a running write end (h5py must not be left mid-call), drop what was queued,
            # then drop every file not committed: nothing partial is ever renamed into place.
            self._pool.shutdown(wait=True, cancel_futures=True)
            for k in list(self._open):
                self._drop(k)

    # -- writer thread
    def _write_rows(self, slides, rows, patch, region, readers) -> None:
        for k, start, i, j in _runs(slides, rows):
            if k in self.failed:
                continue
            target = self.jobs[k].target
            try:
                state = self._open.get(k) or self._create(k, readers[i])
                state.writer.write(start, None if patch is None else patch[i:j], region[i:j])
                self.bar.update(j - i)
                if state.writer.n_written == self.jobs[k].job.n_regions:
                    self._commit(k)
            except Exception as exc:  # this slide fails, the others go on
                if disk_full_message(exc) is None:
                    self._fail(k, f"{target}: writing failed: {' '.join(str(exc).split())}")
                    continue
                # Every later write would fail too: stop the run. The record may not fit either.
                with contextlib.suppress(Exception):
                    self._fail(k, f"no space left on device: {target}")
                raise DiskFull(str(target)) from exc

    def _create(self, k: int, reader: str) -> _Open:
        ej = self.jobs[k]
        # The reader actually used ("auto" resolves per slide) is known once a region is read.
        attrs = dict(ej.attrs, reader=reader or ej.attrs["reader"])
        writer = FeaturesWriter(ej.target, ej.job.coords, attrs, patch_features=self.patch_features)
        try:
            writer.open()
        except Exception as exc:
            raise OSError(f"cannot create the features file: {exc}") from exc
        self._open[k] = _Open(writer, time.perf_counter())
        return self._open[k]

    def _commit(self, k: int) -> None:
        ej, state = self.jobs[k], self._open.pop(k)
        state.writer.commit()  # fsync + rename onto the final name
        if ej.lock is not None:
            ej.lock.release()
        seconds = time.perf_counter() - state.started
        n = ej.job.n_regions
        rate = n / seconds if seconds > 0 else 0.0
        self.record(
            SlideResult(ej.job.slide_id, "ok", n, seconds, rate, "", features_rel(ej.target))
        )
        self.bar.write(f"{ej.job.slide_id}: {n} region(s) in {seconds:.1f} s ({rate:.2f}/s)")

    def _drop(self, k: int) -> float:
        """Abort slide ``k``'s file (if open) and release its lock; the seconds it was open."""
        state = self._open.pop(k, None)
        if state is not None:
            state.writer.abort()
        lock = self.jobs[k].lock
        if lock is not None:
            lock.release()
        return time.perf_counter() - state.started if state is not None else 0.0

    def _fail(self, k: int, message: str) -> None:
        self.failed.add(k)
        ej = self.jobs[k]
        written = self._open[k].writer.n_written if k in self._open else 0
        seconds = self._drop(k)
        # Its regions will never be written; count them as done so the bar reaches the end.
        self.bar.update(ej.job.n_regions - written)
        self.record(SlideResult(ej.job.slide_id, "failed", ej.job.n_regions, seconds, 0.0, message))
        self.bar.write(f"{ej.job.slide_id}: FAILED: {message}")

    def _fail_unfinished(self) -> None:
        # Only if the loader ended early; a partial file is never trusted.
        for k in list(self._open):
            n = self.jobs[k].job.n_regions
            self._fail(
                k,
                f"{self.jobs[k].target}: only {self._open[k].writer.n_written} of {n} regions written",
            )


class _Batch:
    """Regions waiting for the encoder; :meth:`flush` encodes them and hands them to the writer.

    On the CPU, a batch whose regions sit in consecutive ring slots is encoded straight from the
    ring (a view, no copy); otherwise its regions are copied into one reused batch buffer. A
    fresh ``torch.stack`` per batch cost 0.12 s per region on a 2-core machine, most of it page
    faults of the new 192 MiB. On CUDA each region is copied to the device as it arrives (from
    the pinned ring, asynchronously), so the copies overlap the wait for the next region.
    """

    def __init__(self, encoder: torch.nn.Module, device: torch.device, ring: RegionRing | None,
                 files: FeaturesFiles, size: int, patch_features: bool) -> None:  # fmt: skip
        self.encoder, self.device, self.ring, self.files = encoder, device, ring, files
        self.size, self.patch_features = size, patch_features
        self.cuda = device.type == "cuda"
        self.slides: list[int] = []
        self.rows: list[int] = []
        self.slots: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.readers: list[str] = []
        self._buffer: torch.Tensor | None = None

    def add(self, item: dict) -> None:
        slot = int(item.get("slot", -1))
        pixels = self.ring[slot] if slot >= 0 and self.ring is not None else item["pixels"]
        if self.cuda:
            pixels = pixels.to(self.device, non_blocking=True)  # from the pinned ring slot
        self.slides.append(int(item["job"]))
        self.rows.append(int(item["row"]))
        self.slots.append(slot)
        self.pixels.append(pixels)
        self.readers.append(str(item["reader"]))
        if len(self.slides) >= self.size:
            self.flush()

    def _regions(self, keep: list[int]) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 of the kept rows, with as few copies as possible."""
        if self.cuda:
            return torch.stack([self.pixels[i] for i in keep])
        slots = [self.slots[i] for i in keep]
        if (
            self.ring is not None
            and slots[0] >= 0
            and slots == list(range(slots[0], slots[0] + len(slots)))
        ):
            return self.ring.buffers[slots[0] : slots[0] + len(slots)]
        first = self.pixels[keep[0]]
        if self._buffer is None or self._buffer.shape[1:] != first.shape:
            self._buffer = torch.empty((self.size, *first.shape), dtype=torch.uint8)
        out = self._buffer[: len(keep)]
        for j, i in enumerate(keep):
            out[j].copy_(self.pixels[i])
        return out

    def flush(self) -> None:
        keep = [i for i, k in enumerate(self.slides) if k not in self.files.failed]
        if keep:
            # The channels-first view costs no copy (the encoder's patch reordering copies once).
            regions = self._regions(keep).permute(0, 3, 1, 2)
            with torch.inference_mode():
                patch, region = self.encoder(regions)
            region_np = region.float().cpu().numpy()
            patch_np = patch.to(torch.float16).cpu().numpy() if self.patch_features else None
            self.files.write([self.slides[i] for i in keep], [self.rows[i] for i in keep],
                             patch_np, region_np, [self.readers[i] for i in keep])  # fmt: skip
        self.slides, self.rows, self.slots, self.pixels, self.readers = [], [], [], [], []


def _stop_workers(items: Any) -> None:
    # A DataLoader iterator stops its worker processes when garbage-collected, but an exception
    # in flight keeps it referenced from the traceback; stop them now so that no worker outlives
    # a SIGTERM. _shutdown_workers is the iterator's own (private) shutdown routine.
    shutdown = getattr(items, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def stream_regions(
    jobs: list[EmbedJob],
    encoder: torch.nn.Module,
    device: torch.device,
    settings: StreamSettings,
    bar: Any,
    record: Callable[[SlideResult], None],
) -> None:
    """Read, batch, encode and write every region of ``jobs`` (slides with regions)."""
    n_regions = sum(j.job.n_regions for j in jobs)
    if not n_regions:
        return
    workers = min(settings.workers, n_regions)
    slots = RegionRing.slots_needed(workers, settings.prefetch, settings.batch_regions)
    # A multiple of the batch size: batches of consecutive regions then never wrap around the
    # ring's end, so the encoder reads them in place.
    slots = -(-slots // settings.batch_regions) * settings.batch_regions
    side = max(j.job.region_px for j in jobs)
    with contextlib.ExitStack() as stack:
        ring = stack.enter_context(RegionRing(slots, side, pin=device.type == "cuda"))
        dataset = RegionDataset([j.job for j in jobs], reader=settings.reader, ring=ring)
        stack.callback(dataset.close)
        files = stack.enter_context(FeaturesFiles(jobs, settings.patch_features, bar, record))
        loader = make_region_loader(dataset, workers=workers, prefetch=settings.prefetch)
        items = iter(loader)
        stack.callback(_stop_workers, items)
        batch = _Batch(
            encoder, device, ring, files, settings.batch_regions, settings.patch_features
        )
        for item in items:
            k = int(item["job"])
            if k in files.failed:
                continue
            if item["error"]:
                files.fail(k, item["error"])
            else:
                batch.add(item)
        batch.flush()
