"""Streaming 4096 px regions of many slides into the embedder: dataset, region ring, DataLoader.

The dataset is map-style over ``(slide, region)`` pairs in slide order, so a DataLoader with
``batch_size=None`` hands the regions back in that same order however many workers read them,
and the writer can close each slide's file as soon as its last region arrives. Each worker opens
its own :class:`hipt.slide.Slide` lazily (OpenSlide handles must not cross a fork), keeps at most
a couple of them open, and reads one region at the target µm/px straight into a slot of a
:class:`RegionRing`: a fixed set of uint8 ``[H, W, 3]`` buffers (channels last, as read) in
shared memory, allocated once per run and pinned for fast device copies where CUDA is present.
Only the slot number travels back to the main process. Allocating a fresh shared segment per
region cost 0.12 s against 0.07 s for a read into a reused buffer (a 2-core machine); the ring
makes that cost zero. Channel order and normalisation are done later on the device, inside the
region encoder. Only ``workers × prefetch`` regions are ever in flight, whatever the slide size.

A slide that cannot be opened or read does not stop the loader: the item carries the error
message instead of pixels, and the worker answers every later region of that slide with the
same error without touching the file again.

Examples
--------
>>> import numpy as np
>>> job = SlideJob("s1", "s1.tiff", np.zeros((2, 2), np.int64), target_mpp=0.5, mpp_level0=0.5)
>>> ds = RegionDataset([job])
>>> len(ds), ds.locate(1)
(2, (0, 1))
>>> RegionRing.slots_needed(workers=3, prefetch=2, batch=4)
11
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from hipt.geometry import REGION_PX

__all__ = ["SlideJob", "RegionItem", "RegionRing", "RegionDataset", "make_region_loader"]


@dataclass(frozen=True)
class SlideJob:
    """One slide to embed: where it is, which regions, and at which µm/px.

    ``coords`` are the level-0 (x, y) of the regions, in the tiles file's order. ``mpp_level0``
    is the value the tiler used (passed to the Slide so the geometry is exactly the tiler's).
    """

    slide_id: str
    slide_path: str | os.PathLike
    coords: np.ndarray
    target_mpp: float = 0.5
    mpp_level0: float | None = None
    region_px: int = REGION_PX

    @property
    def n_regions(self) -> int:
        return int(len(self.coords))


class RegionItem(TypedDict):
    """What the loader yields per region.

    With a ring, ``slot`` is the ring slot holding the uint8 ``[H, W, 3]`` pixels and ``pixels``
    is empty; without one, ``slot`` is -1 and ``pixels`` holds them. On a read error both are
    empty and ``error`` says why. Channels stay last, as the slide is read: turning them first in
    the worker would cost more than reading the region; the encoder's one reordering copy on the
    device does it for free.
    """

    job: int
    row: int
    slot: int
    pixels: torch.Tensor
    error: str
    reader: str


class RegionRing:
    """A fixed ring of region buffers in shared memory that the loader's workers read into.

    Region ``index`` of the dataset goes to slot ``index % slots``. The DataLoader hands out at
    most ``workers × prefetch`` indices beyond the last region the main process received, and
    the main process holds at most one batch, so with :meth:`slots_needed` slots no worker ever
    writes a slot whose region is still waiting to be encoded.

    Parameters
    ----------
    slots : int
        Number of region buffers.
    side : int
        Region side in pixels.
    pin : bool
        Page-lock the ring for asynchronous device copies (only where CUDA is available).
    """

    def __init__(self, slots: int, side: int = REGION_PX, *, pin: bool = False) -> None:
        self.slots, self.side = int(slots), int(side)
        # Made in shared memory directly: its pages are only touched when a region is read in.
        self.buffers = _shared_uint8((self.slots, self.side, self.side, 3))
        self.pinned = False
        if pin and torch.cuda.is_available():
            # Pinned in place (cudaHostRegister) rather than by pin_memory(), which would copy it
            # out of shared memory; the workers must keep writing the same pages.
            ptr, size = self.buffers.data_ptr(), self.buffers.numel()
            self.pinned = torch.cuda.cudart().cudaHostRegister(ptr, size, 0) == 0

    @staticmethod
    def slots_needed(workers: int, prefetch: int, batch: int) -> int:
        """Slots that make reuse safe: regions in flight, one batch, and one spare."""
        return workers * prefetch + batch + 1

    def slot(self, index: int) -> int:
        return index % self.slots

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    def close(self) -> None:
        """Unpin (the memory itself goes with the last reference)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffers.data_ptr())
            self.pinned = False

    def __enter__(self) -> RegionRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory (as DataLoader's own batch collation makes)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _error_text(path: str | os.PathLike, exc: BaseException) -> str:
    # One line that names the file, whether or not the reader's own message already did.
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if str(path) in msg else f"{path}: {msg}"


class RegionDataset(Dataset):
    """Map-style dataset of every region of ``jobs``, flattened in job order.

    Parameters
    ----------
    jobs : sequence of SlideJob
        Slides and their region coordinates.
    reader : str
        Reader for :class:`hipt.slide.Slide` (``"auto"``, ``"openslide"`` or ``"fast"``).
    max_open : int
        Slides each worker keeps open; items come in slide order, so two are plenty.
    ring : RegionRing, optional
        Read into this ring's slots (every job's regions must be ``ring.side`` px); without one,
        each region gets its own buffer.
    """

    def __init__(
        self,
        jobs: list[SlideJob],
        *,
        reader: str = "auto",
        max_open: int = 2,
        ring: RegionRing | None = None,
    ) -> None:
        self.jobs = list(jobs)
        self.reader = reader
        self.ring = ring
        if ring is not None and any(j.region_px != ring.side for j in self.jobs):
            raise ValueError(f"every region must be {ring.side} px to use the ring")
        self.max_open = max(1, int(max_open))
        self._starts = np.cumsum([0] + [j.n_regions for j in self.jobs]).tolist()
        self._pid: int | None = None
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._failed: dict[int, str] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(job, row)`` of flat ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        job = bisect.bisect_right(self._starts, index) - 1
        return job, index - self._starts[job]

    def _reset_if_forked(self) -> None:
        # A worker inherits the parent's cache by fork; those handles belong to the parent.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._open = OrderedDict()
            self._failed = {}

    def _slide(self, job: int) -> Any:
        if job in self._open:
            self._open.move_to_end(job)
            return self._open[job]
        from hipt.slide import Slide  # imported in the worker, where it is used

        spec = self.jobs[job]
        slide = Slide(spec.slide_path, mpp=spec.mpp_level0, reader=self.reader)
        self._open[job] = slide
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return slide

    def read(self, job: int, row: int, out: np.ndarray | None = None) -> np.ndarray:
        """The uint8 ``[H, W, 3]`` RGB region ``row`` of slide ``job`` (raises on a read error).

        ``out``: optional writable uint8 ``[H, W, 3]`` array to read into.
        """
        self._reset_if_forked()
        spec = self.jobs[job]
        x0, y0 = (int(v) for v in spec.coords[row])
        pixels = self._slide(job).read_region(x0, y0, spec.region_px, spec.target_mpp, out=out)
        want = (spec.region_px, spec.region_px, 3)
        if pixels.shape != want or pixels.dtype != np.uint8:
            raise ValueError(
                f"read_region gave {pixels.dtype} {pixels.shape}, expected uint8 {want}"
            )
        return pixels

    def _pixels(self, index: int, job: int, row: int) -> tuple[int, torch.Tensor]:
        """Read region ``(job, row)``: ``(slot, empty)`` into the ring, else ``(-1, pixels)``."""
        if self.ring is not None:
            slot = self.ring.slot(index)
            self.read(job, row, out=self.ring[slot].numpy())
            return slot, torch.empty(0, dtype=torch.uint8)
        side = self.jobs[job].region_px
        if get_worker_info() is not None:
            # In a worker, read straight into shared memory: the tensor then crosses to the
            # main process as a handle, not as a 48 MiB copy made while pickling it.
            hwc = _shared_uint8((side, side, 3))
            self.read(job, row, out=hwc.numpy())
            return -1, hwc
        pixels = self.read(job, row)
        # Contiguous, so the tensor pins and copies to the device in one piece; writable, as
        # torch wants (a region resampled through PIL is read-only).
        return -1, torch.from_numpy(np.require(pixels, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))

    def __getitem__(self, index: int) -> RegionItem:
        self._reset_if_forked()
        job, row = self.locate(index)
        empty = torch.empty(0, dtype=torch.uint8)
        if job in self._failed:
            return RegionItem(
                job=job, row=row, slot=-1, pixels=empty, error=self._failed[job], reader=""
            )
        try:
            slot, hwc = self._pixels(index, job, row)
        except Exception as exc:  # any failure of one slide must not stop the others
            self._failed[job] = _error_text(self.jobs[job].slide_path, exc)
            stale = self._open.pop(job, None)
            if stale is not None:
                with contextlib.suppress(Exception):
                    stale.close()
            return RegionItem(
                job=job, row=row, slot=-1, pixels=empty, error=self._failed[job], reader=""
            )
        reader = str(getattr(self._open[job], "reader_name", self.reader))
        if row == self.jobs[job].n_regions - 1:
            # The last region of a slide: release its handle now rather than at eviction.
            slide = self._open.pop(job, None)
            if slide is not None:
                slide.close()
        return RegionItem(job=job, row=row, slot=slot, pixels=hwc, error="", reader=reader)

    def close(self) -> None:
        """Close the slides this process has open."""
        while self._open:
            _, slide = self._open.popitem()
            slide.close()


def make_region_loader(
    dataset: RegionDataset,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
) -> DataLoader:
    """A DataLoader that yields :class:`RegionItem` one region at a time, in dataset order.

    ``batch_size=None`` keeps each worker on one region at a time, so a batch of regions is read
    by several workers at once rather than by one worker in sequence; the caller groups them.
    At most ``workers × prefetch`` regions (48 MiB each at 4096 px) wait in memory.
    """
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        **kwargs,
    )
