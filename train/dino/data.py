"""What DINO trains on, and in which order: resumable sharded batches, and the two data sources.

Every sample is a pure function of ``(seed, epoch, position)``: the batch sampler draws a
permutation per epoch from the seed, hands each process its contiguous share of each global
batch, and names every sample by its key; the dataset seeds torch's generator (and its own patch
draws) from that key. So the crops do not depend on how many processes or DataLoader workers
read them, and a resumed run that starts the sampler at its saved step sees exactly the batches
an uninterrupted run would have seen.

- Stage 1 (:class:`SlidePatches`): 256 px patches of the kept regions of ``tiles/*.h5``, read at
  the tiles' µm/px with :class:`hipt.slide.Slide` (the fast JPEG reader where it applies) inside
  DataLoader workers, each passing a tissue test; or (:class:`ImageFolderPatches`) a folder of
  patch images.
- Stage 2 (:class:`FeatureGrids`): the ``patch_features`` [256, 384] of one region of a
  ``features/*.h5`` at a time, as the [384, 16, 16] grid ViT-4K reads.

Examples
--------
>>> sampler = ResumableBatchSampler(10, batch_size=4, seed=0, epoch=0, rank=1, world_size=2)
>>> len(sampler), [len(b) for b in sampler]
(2, [2, 2])
"""

from __future__ import annotations

import bisect
import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hipt.geometry import PATCH_PX, patch_grid_to_vit4k_input

__all__ = [
    "DataError",
    "FeatureGrids",
    "ImageFolderPatches",
    "MultiCropDataset",
    "ResumableBatchSampler",
    "SampleKey",
    "SlidePatches",
    "tissue_fraction",
]

LOWRES_CELL_PX = 16  # a patch's side in the low-power view used to find tissue patches
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class DataError(ValueError):
    """Training data that cannot be used; the message says what and where."""


class SampleKey(NamedTuple):
    """One sample of one epoch: ``position`` in the epoch's order, ``index`` into the source."""

    epoch: int
    position: int
    index: int


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample, independent of processes and workers."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, position]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class ResumableBatchSampler(Sampler[list[SampleKey]]):
    """This process's share of each global batch of one epoch, from step ``start_step`` on.

    The epoch's order is a permutation of ``n_items`` seeded by ``(seed, epoch)``; global batch
    ``s`` is positions ``[s*B, (s+1)*B)`` and process ``rank`` takes its ``B / world_size``
    contiguous positions of it, so the processes together see exactly the one-process batch.
    The incomplete last batch is dropped.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise DataError(
                f"train.batch_size {batch_size} does not split evenly over {world_size} processes"
            )
        if n_items < batch_size:
            raise DataError(
                f"train.batch_size {batch_size} is larger than the data ({n_items} samples)"
            )
        self.n_items, self.batch_size = n_items, batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step
        self.steps_per_epoch = n_items // batch_size

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 0x5A4D])
        order = rng.permutation(self.n_items)
        share = self.batch_size // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * share
            yield [
                SampleKey(self.epoch, pos, int(order[pos])) for pos in range(first, first + share)
            ]


def tissue_fraction(
    rgb: np.ndarray,
    min_saturation: float = 0.07,
    dark_max_value: float = 0.2,
    pen_min_saturation: float = 0.3,
    pen_hue_range: tuple[float, float] = (70.0, 250.0),
) -> float:
    """Share of the pixels of a uint8 RGB patch that look like stained tissue.

    Tissue is saturated (HSV saturation above ``min_saturation``: glass is grey-white), not dark
    (ink, folds, debris) and not ink-coloured (saturated blue or green, away from H&E's
    pink-purple hues).

    >>> glass = np.full((8, 8, 3), 235, np.uint8)
    >>> pink = np.tile(np.array([220, 140, 190], np.uint8), (8, 8, 1))
    >>> tissue_fraction(glass), tissue_fraction(pink)
    (0.0, 1.0)
    """
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    ok = (sat > min_saturation) & (mx >= dark_max_value)
    inky = sat >= pen_min_saturation
    if inky.any():
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        delta = np.maximum(mx - mn, 1e-6)
        hue = np.where(
            mx == r,
            (g - b) / delta % 6,
            np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4),
        )
        hue = hue * 60.0
        ok &= ~(inky & (hue >= pen_hue_range[0]) & (hue <= pen_hue_range[1]))
    return float(ok.mean())


# --------------------------------------------------------------------------- stage 1 sources
@dataclass(frozen=True)
class SlideRegions:
    """The kept regions of one tiled slide (from its tiles file)."""

    slide_id: str
    slide_path: Path
    coords: np.ndarray  # level-0 (x, y) of each region
    mpp_level0: float
    target_mpp: float
    region_px: int

    @property
    def grid(self) -> int:
        return self.region_px // PATCH_PX


def _warn_once(marker_dir: Path | None, key: str, message: str) -> None:
    """Print ``message`` once across every process that shares ``marker_dir``."""
    if marker_dir is None:
        print(message, file=sys.stderr, flush=True)
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(key.encode()).hexdigest()[:16] + ".txt"
    try:
        fd = os.open(marker_dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(message + "\n")
    print(message, file=sys.stderr, flush=True)


class SlidePatches:
    """Every 256 px patch of the kept regions of ``tiles/*.h5``, read lazily per process.

    A slide that cannot be opened or read is reported once (``skip_dir`` holds one marker file
    per skipped slide, shared by all processes) and its patches are skipped from then on.
    """

    def __init__(
        self,
        tiles_dir: str | os.PathLike,
        *,
        slides_dir: str | os.PathLike | None = None,
        reader: str = "auto",
        skip_dir: str | os.PathLike | None = None,
    ) -> None:
        from hipt.embed import resolve_slide_path
        from hipt.h5schema import SchemaError, read_tiles

        tiles_dir = Path(tiles_dir)
        if not tiles_dir.is_dir():
            raise DataError(f"data.tiles_dir {tiles_dir}: no such folder")
        files = sorted(tiles_dir.glob("*.h5"))
        if not files:
            raise DataError(f"data.tiles_dir {tiles_dir}: no tiles/*.h5 files (run hipt tile)")
        self.slides: list[SlideRegions] = []
        problems = []
        for f in files:
            try:
                t = read_tiles(f)
            except SchemaError as exc:
                problems.append(str(exc))
                continue
            path, places = resolve_slide_path(t, slides_dir)
            if path is None:
                problems.append(f"{f}: slide not found (looked at {', '.join(map(str, places))})")
                continue
            if len(t) == 0:
                continue
            self.slides.append(
                SlideRegions(
                    slide_id=t.slide_id,
                    slide_path=path,
                    coords=t.coords,
                    mpp_level0=float(t.attrs["mpp_level0"]),
                    target_mpp=float(t.attrs["target_mpp"]),
                    region_px=int(t.attrs["region_size"]),
                )
            )
        for line in problems:
            print(f"hipt pretrain: skipping {line}", file=sys.stderr)
        if not self.slides:
            raise DataError(f"data.tiles_dir {tiles_dir}: no usable tiled slide with regions")
        counts = [len(s.coords) * s.grid * s.grid for s in self.slides]
        self._starts = np.cumsum([0] + counts).tolist()
        self.reader = reader
        self.skip_dir = Path(skip_dir) if skip_dir is not None else None
        self._pid: int | None = None
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._lowres: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(slide, region, patch)`` of flat ``index``; patch ``k`` sits at row k // grid."""
        s = bisect.bisect_right(self._starts, index) - 1
        rest = index - self._starts[s]
        per_region = self.slides[s].grid ** 2
        return s, rest // per_region, rest % per_region

    def slide_of(self, index: int) -> int:
        return bisect.bisect_right(self._starts, index) - 1

    def _slide(self, s: int) -> Any:
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._pid, self._open, self.failed = os.getpid(), OrderedDict(), set()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        from hipt.slide import Slide

        spec = self.slides[s]
        handle = Slide(spec.slide_path, mpp=spec.mpp_level0, reader=self.reader)
        self._open[s] = handle
        while len(self._open) > 8:
            _, old = self._open.popitem(last=False)
            old.close()
        return handle

    def tissue_candidates(self, index: int, tissue: Any) -> np.ndarray:
        """Flat indices of the patches of ``index``'s region that look like tissue at low power.

        The region is read once per process at 1/16 of its resolution (16 px per patch) and
        every patch's tissue share is measured there, so a glass patch is replaced by a tissue
        patch of the same region instead of a blind redraw. Empty if the region has none or
        its slide cannot be read.
        """
        s, region, _ = self.locate(index)
        key = (s, region)  # a cache of pure values: a forked worker may keep its parent's
        shares = self._lowres.get(key)
        if shares is None:
            spec = self.slides[s]
            x0, y0 = (int(v) for v in spec.coords[region])
            try:
                small = self._slide(s).read_region(
                    x0, y0, spec.grid * LOWRES_CELL_PX, spec.target_mpp * PATCH_PX / LOWRES_CELL_PX
                )
            except Exception:
                return np.zeros(0, np.int64)
            cells = small.reshape(spec.grid, LOWRES_CELL_PX, spec.grid, LOWRES_CELL_PX, 3)
            cells = cells.transpose(0, 2, 1, 3, 4).reshape(-1, LOWRES_CELL_PX, LOWRES_CELL_PX, 3)
            shares = np.array(
                [
                    tissue_fraction(
                        c, tissue.min_saturation, tissue.dark_max_value,
                        tissue.pen_min_saturation, tissue.pen_hue_range,
                    )
                    for c in cells
                ]
            )  # fmt: skip
            self._lowres[key] = shares
            while len(self._lowres) > 4096:
                self._lowres.popitem(last=False)
        base = index - index % (self.slides[s].grid ** 2)
        return base + np.flatnonzero(shares >= tissue.min_fraction)

    def read(self, index: int) -> np.ndarray | None:
        """uint8 ``[256, 256, 3]`` patch ``index``, or None if its slide cannot be read."""
        s, region, k = self.locate(index)
        if s in self.failed and self._pid == os.getpid():
            return None
        spec = self.slides[s]
        step = PATCH_PX * spec.target_mpp / spec.mpp_level0  # patch side in level-0 px
        x0, y0 = (int(v) for v in spec.coords[region])
        x = x0 + int(round((k % spec.grid) * step))
        y = y0 + int(round((k // spec.grid) * step))
        try:
            return self._slide(s).read_region(x, y, PATCH_PX, spec.target_mpp)
        except Exception as exc:  # one unreadable slide must not stop the run
            self.failed.add(s)
            stale = self._open.pop(s, None)
            if stale is not None:
                stale.close()
            msg = " ".join(str(exc).split()) or type(exc).__name__
            _warn_once(
                self.skip_dir,
                str(spec.slide_path),
                f"hipt pretrain: skipping slide {spec.slide_id} ({spec.slide_path}): {msg}",
            )
            return None


class ImageFolderPatches:
    """Every image under a folder (ImageFolder-style class subfolders or flat), as RGB patches."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"data.image_folder {folder}: no such folder")
        self.paths = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.paths:
            raise DataError(f"data.image_folder {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.slides: list[Any] = []

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray | None:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as exc:
            print(f"hipt pretrain: skipping image {path}: {exc}", file=sys.stderr)
            return None


# --------------------------------------------------------------------------- stage 2 source
class FeatureGrids:
    """The [384, 16, 16] patch-embedding grid of every region of ``features/*.h5``.

    Only each file's header is read up front; a grid is read from HDF5 when it is asked for
    (one region, 196 KiB in float16), with a few files kept open per process.
    """

    def __init__(self, features_dir: str | os.PathLike) -> None:
        from hipt.h5schema import SchemaError, read_features_info

        features_dir = Path(features_dir)
        if not features_dir.is_dir():
            raise DataError(f"data.features_dir {features_dir}: no such folder")
        files = sorted(features_dir.glob("*.h5"))
        if not files:
            raise DataError(
                f"data.features_dir {features_dir}: no features/*.h5 files (run hipt embed)"
            )
        self.files: list[Path] = []
        counts: list[int] = []
        for f in files:
            try:
                info = read_features_info(f)
            except SchemaError as exc:
                print(f"hipt pretrain: skipping {exc}", file=sys.stderr)
                continue
            if not info.has_patch_features:
                print(
                    f"hipt pretrain: skipping {f}: no patch_features (embedded with "
                    "--no-patch-features?)",
                    file=sys.stderr,
                )
                continue
            if info.n_regions:
                self.files.append(f)
                counts.append(info.n_regions)
        if not self.files:
            raise DataError(f"data.features_dir {features_dir}: no file with patch_features")
        self._starts = np.cumsum([0] + counts).tolist()
        self._pid: int | None = None
        self._open: OrderedDict[int, Any] = OrderedDict()
        self.slides: list[Any] = []

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _file(self, i: int) -> Any:
        import h5py

        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), OrderedDict()
        if i not in self._open:
            self._open[i] = h5py.File(self.files[i], "r")
            while len(self._open) > 16:
                _, old = self._open.popitem(last=False)
                old.close()
        return self._open[i]

    def read(self, index: int) -> torch.Tensor:
        i = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[i]
        feats = np.asarray(self._file(i)["patch_features"][row], dtype=np.float32)
        return patch_grid_to_vit4k_input(torch.from_numpy(feats)[None])[0].contiguous()


# --------------------------------------------------------------------------- the dataset
class MultiCropDataset(Dataset):
    """Keys → multi-crop views of one sample, with a tissue test for pixel patches.

    A patch whose tissue share is below ``min_tissue`` (or that cannot be read) is replaced by
    another patch drawn from the sample's own generator, up to ``max_tries`` draws; then the
    most tissue-rich draw is used.
    """

    def __init__(
        self,
        source: SlidePatches | ImageFolderPatches | FeatureGrids,
        transform: Callable[[torch.Tensor], list[torch.Tensor]],
        *,
        seed: int,
        tissue: Any | None = None,
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.tissue = tissue

    def __len__(self) -> int:
        return len(self.source)

    def _pixels(self, index: int, rng: np.random.Generator) -> np.ndarray:
        t = self.tissue
        tries = 1 if t is None else t.max_tries
        best, best_share = None, -1.0
        for _ in range(tries * 4):  # unreadable draws do not count as tries
            rgb = self.source.read(index)
            if rgb is not None:
                share = 1.0 if t is None or t.min_fraction <= 0 else self._share(rgb)
                if share > best_share:
                    best, best_share = rgb, share
                tries -= 1
                if share >= (t.min_fraction if t is not None else 0.0) or tries <= 0:
                    break
            index = self._redraw(index, rng)
        if best is None:
            raise DataError("no readable patch in many draws: are all slides unreadable?")
        return best

    def _redraw(self, index: int, rng: np.random.Generator) -> int:
        # A tissue patch of the same region if the source can tell, else any patch at all.
        find = getattr(self.source, "tissue_candidates", None)
        if find is not None and self.tissue is not None:
            found = find(index, self.tissue)
            if len(found):
                return int(rng.choice(found))
        return int(rng.integers(len(self.source)))

    def _share(self, rgb: np.ndarray) -> float:
        t = self.tissue
        return tissue_fraction(
            rgb, t.min_saturation, t.dark_max_value, t.pen_min_saturation, t.pen_hue_range
        )

    def __getitem__(self, key: SampleKey | Sequence[int]) -> list[torch.Tensor]:
        epoch, position, index = key
        seed = sample_seed(self.seed, int(epoch), int(position))
        with torch.random.fork_rng(devices=[]):
            # Seeded per sample, restored after: the caller's generator (drop-path) is untouched.
            torch.manual_seed(seed)
            if isinstance(self.source, FeatureGrids):
                return self.transform(self.source.read(int(index)))
            rgb = self._pixels(int(index), np.random.default_rng(seed))
            rgb = np.require(rgb, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # PIL's may be read-only
            patch = torch.from_numpy(rgb).permute(2, 0, 1)
            return self.transform(patch)
