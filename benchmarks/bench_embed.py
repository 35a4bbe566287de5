"""End-to-end embedding throughput: ``hipt embed`` against an original-style HIPT loop, one run.

Both paths embed the same regions of the same generated slide (JPEG-tiled pyramidal TIFF at
0.5 µm/px) with the same full-size encoders (ViT-256 depth 12, ViT-4K depth 6, random seeded
weights, so no download is needed):

* ``original``: the way the original HIPT code works. One region per call: OpenSlide
  ``read_region`` → PIL RGB → torchvision ``ToTensor`` + ``Normalize`` (fp32, on the CPU) →
  ``unfold`` into 256 patches → ViT-256 on the 256 patches → ViT-4K, all in fp32. Reading and
  the model run one after the other, so their times add up.
* ``hipt``: :func:`hipt.embed.embed_tiles`, the engine of ``hipt embed``: DataLoader workers
  read uint8 regions (``--reader``, default ``auto``), the main process batches regions, the
  region encoder normalises on the device (bf16 autocast on CUDA), and the HDF5 features file
  is written. Measured end to end, plus its two halves alone: reading (the same DataLoader, no
  model) and the model (the region encoder on regions already in memory).

The table gives seconds per region and regions/s of each. When the end-to-end rate of ``hipt``
is close to its model-alone rate, the device is not waiting for input. ``--readers`` runs the
``hipt`` end-to-end and read-only rows once per slide reader. On CUDA, the GPU utilisation is
sampled (NVML, through ``torch.cuda.utilization``) every 0.1 s while ``hipt`` runs end to end;
its mean and the share of samples at 90 % or more are printed per reader ("n/a" without NVML).

The loader goal (``--loader-only`` runs just these rows): with a no-op model, ``hipt embed``
must deliver regions to the main process at >= 90 % of the rate of the same number of reading
processes alone (each reading its share of regions into one reused buffer, no DataLoader, no
shared memory, no HDF5). Both are measured in the same run, beside the loader as it was before
the region ring (a fresh shared-memory segment per region) as the baseline.

Sizing a short run:

* ``--slide-regions M`` writes a slide with only M distinct regions (writing the JPEG pyramid
  takes far longer than reading it); when ``--regions`` is larger, the tiles file repeats those
  M regions in turn. Every read still decodes the whole region from the file (no reader keeps
  decoded regions; OpenSlide's tile cache is smaller than one region), so the rates stay
  throughput figures, only the pixels repeat.
* ``--original-regions N`` runs the slow original-style loop on the first N regions only; all
  rates are per region, so they remain comparable.
* The seconds each phase took (slide writing, encoder set-up, each run) are printed at the end.

Usage::

    python benchmarks/bench_embed.py                     # CPU, 2 regions per method
    python benchmarks/bench_embed.py --device cuda --regions 64 --slide-regions 16 \
        --original-regions 4 --workers 15 --batch-regions 8 --readers fast openslide
    python benchmarks/bench_embed.py --loader-only --regions 8 --slide-regions 4 --workers 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hipt.embed import embed_tiles
from hipt.embed.data import RegionDataset, SlideJob, make_region_loader
from hipt.geometry import REGION_PX
from hipt.h5schema import write_tiles
from hipt.models.region_encoder import RegionEncoder, build_region_encoder
from hipt.synthetic import write_generic_tiff

TARGET_MPP = 0.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_slide(
    workdir: Path, n_regions: int, n_distinct: int | None = None
) -> tuple[Path, Path, np.ndarray]:
    """A slide of ``n_distinct`` whole regions side by side (2 rows when more than 4).

    The tiles file lists ``n_regions`` regions: the distinct ones in turn, repeated as needed.
    """
    n_distinct = min(n_distinct or n_regions, n_regions)
    cols = n_distinct if n_distinct <= 4 else int(np.ceil(n_distinct / 2))
    rows = int(np.ceil(n_distinct / cols))
    slide = write_generic_tiff(
        workdir / "bench.tiff", cols * REGION_PX, rows * REGION_PX, mpp=TARGET_MPP, seed=7
    )
    coords = np.array(
        [[(i % cols) * REGION_PX, (i // cols) * REGION_PX] for i in range(n_distinct)], np.int64
    )
    coords = coords[np.arange(n_regions) % n_distinct]
    attrs = dict(
        slide_id="bench",
        slide_path=str(slide.path),
        slide_size=[cols * REGION_PX, rows * REGION_PX],
        mpp_level0=TARGET_MPP,
        mpp_source="openslide.mpp-x",
        target_mpp=TARGET_MPP,
        region_size=REGION_PX,
        region_size_level0=REGION_PX,
        read_level=0,
        patch_size=256,
        token_size=16,
    )
    tiles = write_tiles(workdir / "tiles" / "bench.h5", coords, np.ones(n_regions), attrs)
    return slide.path, tiles, coords


class UtilSampler:
    """Samples NVML GPU utilisation (% of time a kernel ran) in a background thread.

    ``torch.cuda.utilization`` needs NVML (``pynvml``); without it, or off CUDA, :attr:`error`
    says why and :meth:`summary` returns ``"n/a"``.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.1) -> None:
        self.device, self.interval_s = device, interval_s
        self.samples: list[int] = []
        self.error: str | None = None if device.type == "cuda" else "not a CUDA device"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilSampler:
        if self.error is None:
            try:
                torch.cuda.utilization(self.device)
            except Exception as exc:  # NVML missing or refusing: report, never fail the run
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:80]
        if self.error is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(int(torch.cuda.utilization(self.device)))
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:80]
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return f"n/a ({self.error or 'no samples'})"
        u = np.asarray(self.samples)
        return f"mean {u.mean():.0f} %, {np.mean(u >= 90):.0%} of {len(u)} samples at >= 90 %"


# ----------------------------------------------------------------------------- original
def original_loop(
    slide_path: Path, coords: np.ndarray, encoder: RegionEncoder, device: torch.device
) -> dict[str, float]:
    """The original HIPT procedure, region by region; returns summed read and model seconds."""
    import openslide
    from torchvision import transforms

    vit256, vit4k = encoder.vit256, encoder.vit4k
    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    read_s = model_s = 0.0
    slide = openslide.OpenSlide(str(slide_path))
    try:
        for x, y in coords:
            t0 = time.perf_counter()
            region = slide.read_region((int(x), int(y)), 0, (REGION_PX, REGION_PX)).convert("RGB")
            x_img = to_tensor(region).unsqueeze(0)  # [1, 3, 4096, 4096] fp32
            t1 = time.perf_counter()
            with torch.no_grad():
                x_dev = x_img.to(device)
                patches = x_dev.unfold(2, 256, 256).unfold(3, 256, 256)  # [1, 3, 16, 16, 256, 256]
                patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 256, 256)
                feats = torch.cat([vit256(patches[i : i + 256]) for i in range(0, 256, 256)])
                grid = feats.reshape(16, 16, 384).permute(2, 0, 1).unsqueeze(0)  # [1, 384, 16, 16]
                vit4k(grid).cpu()
            sync(device)
            t2 = time.perf_counter()
            read_s += t1 - t0
            model_s += t2 - t1
    finally:
        slide.close()
    return {"read": read_s, "model": model_s, "total": read_s + model_s}


# --------------------------------------------------------------------------------- hipt
def hipt_read_only(
    slide_path: Path, coords: np.ndarray, workers: int, reader: str, pin: bool
) -> float:
    """Seconds for the embedder's DataLoader to deliver every region, without the model."""
    job = SlideJob("bench", slide_path, coords, target_mpp=TARGET_MPP, mpp_level0=TARGET_MPP)
    dataset = RegionDataset([job], reader=reader)
    loader = make_region_loader(dataset, workers=min(workers, len(coords)), pin_memory=pin)
    t0 = time.perf_counter()
    n = 0
    for item in loader:
        if item["error"]:
            raise RuntimeError(item["error"])
        n += 1
    assert n == len(coords)
    return time.perf_counter() - t0


def _read_share(args: tuple[str, np.ndarray, str]) -> int:
    from hipt.slide import Slide

    slide_path, coords, reader = args
    buf = np.empty((REGION_PX, REGION_PX, 3), np.uint8)
    with Slide(slide_path, mpp=TARGET_MPP, reader=reader) as slide:
        for x, y in coords:
            slide.read_region(int(x), int(y), REGION_PX, TARGET_MPP, out=buf)
    return len(coords)


def _one_decode_thread() -> None:
    # As in a DataLoader worker, where the fast reader decodes on one thread per process.
    os.environ["HIPT_READER_THREADS"] = "1"


def reader_alone(slide_path: Path, coords: np.ndarray, workers: int, reader: str) -> float:
    """Seconds for ``workers`` plain processes (0: this one) to read every region once.

    Each process decodes on one thread, as the loader's workers do, so the two differ only by
    the loader itself (queues, shared memory, the main process's batching and writing).
    """
    t0 = time.perf_counter()
    if workers == 0:
        _read_share((str(slide_path), coords, reader))
    else:
        shares = [(str(slide_path), coords[i::workers], reader) for i in range(workers)]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers, initializer=_one_decode_thread) as pool:
            assert sum(pool.map(_read_share, shares)) == len(coords)
    return time.perf_counter() - t0


class NoOpEncoder(torch.nn.Module):
    """Outputs of the right shapes and no work: what is left of ``hipt embed`` is the loader."""

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = regions.shape[0]
        return torch.zeros(b, 256, 384), torch.zeros(b, 192)


def loader_rows(
    tiles: Path, slide_path: Path, coords: np.ndarray, workers: int, batch: int, reader: str,
    workdir: Path, repeats: int = 2,
) -> list[tuple[str, float]]:  # fmt: skip
    """Reader alone, the old loader (a segment per region), and ``hipt embed`` with a no-op model."""
    provenance = dict(vit256_sha256="noop", vit4k_sha256="noop", mean=[0.5] * 3, std=[0.5] * 3)
    out = workdir / "out_noop"
    best: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, best of each: a shared machine's noise hits all rows
        best["alone"] = min(
            best.get("alone", 1e9), reader_alone(slide_path, coords, workers, reader)
        )
        t = hipt_read_only(slide_path, coords, workers, reader, False)
        best["before"] = min(best.get("before", 1e9), t)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = embed_tiles(
            tiles, out, encoder=NoOpEncoder(), provenance=provenance, device="cpu",
            batch_regions=batch, workers=workers, reader=reader, progress=False,
        )  # fmt: skip
        best["noop"] = min(best.get("noop", 1e9), time.perf_counter() - t0)
        assert summary.n_ok == 1, summary.results
    return [
        (f"reader alone, {reader} ({workers} proc x 1 thread)", best["alone"]),
        ("loader before the ring (segment per region)", best["before"]),
        ("hipt embed, no-op model (ring + writer)", best["noop"]),
    ]


def print_loader_goal(rows: list[tuple[str, float]], n: int) -> None:
    head = f"{'loader goal row':<48}{'s/region':>10}{'regions/s':>11}{'vs alone':>10}"
    print(head)
    print("-" * len(head))
    alone = rows[0][1]
    for label, seconds in rows:
        print(f"{label:<48}{seconds / n:>10.3f}{n / seconds:>11.3f}{alone / seconds:>10.0%}")
    share = alone / rows[-1][1]
    print(f"goal: hipt embed with a no-op model at >= 90% of the reader-alone rate: "
          f"{share:.0%} ({'met' if share >= 0.9 else 'NOT met'})")  # fmt: skip
    print()


def hipt_model_only(
    encoder: RegionEncoder, n_regions: int, batch: int, device: torch.device
) -> float:
    """Seconds for the region encoder alone on ``n_regions`` uint8 regions already on the device."""
    gen = torch.Generator().manual_seed(0)
    regions = torch.randint(
        0, 256, (batch, 3, REGION_PX, REGION_PX), dtype=torch.uint8, generator=gen
    )
    regions = regions.to(device)
    done = 0
    sync(device)
    t0 = time.perf_counter()
    while done < n_regions:
        b = min(batch, n_regions - done)
        patch, region = encoder.encode(regions[:b])
        patch.cpu(), region.cpu()
        done += b
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--regions", type=int, default=2, help="4096 px regions per hipt run")
    p.add_argument(
        "--slide-regions",
        type=int,
        default=None,
        help="distinct regions written to the slide (default --regions); the tiles file "
        "repeats them in turn up to --regions",
    )
    p.add_argument(
        "--original-regions",
        type=int,
        default=None,
        help="regions for the slow original-style loop (default all, 0 skips it)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="hipt DataLoader workers (default CPUs-1)"
    )
    p.add_argument(
        "--batch-regions",
        type=int,
        default=None,
        help="hipt regions per call (default 1 on CPU, 8 on CUDA)",
    )
    readers = ["auto", "openslide", "fast"]
    p.add_argument("--reader", default="auto", choices=readers)
    p.add_argument(
        "--readers",
        nargs="+",
        default=None,
        choices=readers,
        help="run hipt end to end and read-only once per reader (default: --reader)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the slide is written")
    p.add_argument(
        "--loader-only",
        action="store_true",
        help="only the loader goal rows (reader alone, old loader, no-op model)",
    )
    p.add_argument(
        "--depth",
        default="12,6",
        help="ViT-256,ViT-4K blocks (default the real 12,6; less only to smoke-test)",
    )
    args = p.parse_args()
    if args.regions < 1 or (args.slide_regions is not None and args.slide_regions < 1):
        p.error("--regions and --slide-regions must be at least 1")
    if args.original_regions is not None and args.original_regions < 0:
        p.error("--original-regions must be 0 or more")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_regions or (8 if cuda else 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers if args.workers is not None else max(1, min(16, (cpus or 2) - 1))
    reader_list = list(dict.fromkeys(args.readers or [args.reader]))
    n = args.regions
    n_distinct = min(args.slide_regions or n, n)
    n_orig = n if args.original_regions is None else min(args.original_regions, n)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_embed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    slide_path, tiles, coords = make_slide(workdir, n, n_distinct)
    phases["write slide"] = time.perf_counter() - t
    repeat = f", each read {n / n_distinct:.3g} times on average" if n > n_distinct else ""
    print(
        f"slide: {n_distinct} distinct regions of 4096 px at {TARGET_MPP} µm/px "
        f"({phases['write slide']:.1f} s to write); hipt reads {n} regions{repeat}"
    )
    if args.loader_only:
        print(f"loader: {n} regions, workers {workers}, batch_regions {batch}, "
              f"CPU {platform.processor() or 'x86-64'} ({cpus} cores)")  # fmt: skip
        for reader in reader_list:
            t = time.perf_counter()
            rows = loader_rows(tiles, slide_path, coords, workers, batch, reader, workdir, 3)
            phases[f"loader rows, {reader}"] = time.perf_counter() - t
            print_loader_goal(rows, n)
        print("phase seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    t = time.perf_counter()
    d256, d4k = (int(v) for v in args.depth.split(","))
    encoder, provenance = build_region_encoder(
        None, None, random_weights=True, device=device,
        vit256_kwargs=dict(depth=d256), vit4k_kwargs=dict(depth=d4k),
    )  # fmt: skip
    provenance = dict(provenance, seed=0)
    # One small pass each way so one-time setup (kernels, allocator) is not timed.
    with torch.inference_mode():
        encoder.vit256(torch.zeros(2, 3, 256, 256, device=device))
        encoder.encode(torch.zeros(1, 3, 4096, 4096, dtype=torch.uint8, device=device))
    sync(device)
    phases["build + warm up encoder"] = time.perf_counter() - t

    orig = None
    if n_orig:
        t = time.perf_counter()
        orig = original_loop(slide_path, coords[:n_orig], encoder, device)
        phases[f"original loop ({n_orig} regions)"] = time.perf_counter() - t

    e2e: dict[str, float] = {}
    read_s: dict[str, float] = {}
    util: dict[str, str] = {}
    for reader in reader_list:
        out = workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        with UtilSampler(device) as sampler:
            t0 = time.perf_counter()
            summary = embed_tiles(
                tiles, out, encoder=encoder, provenance=provenance, device=device,
                batch_regions=batch, workers=workers, reader=reader, progress=False,
            )  # fmt: skip
            sync(device)
            e2e[reader] = time.perf_counter() - t0
        assert summary.n_ok == 1, summary.results
        util[reader] = sampler.summary()
        phases[f"hipt end to end, {reader}"] = e2e[reader]
        read_s[reader] = hipt_read_only(slide_path, coords, workers, reader, cuda)
        phases[f"hipt read-only, {reader}"] = read_s[reader]
    t = time.perf_counter()
    model_s = hipt_model_only(encoder, n, batch, device)
    phases["hipt model-only"] = time.perf_counter() - t

    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.processor() or 'CPU'} ({cpus} cores)"
    )
    print(
        f"device: {device} [{name}], torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"encoders: ViT-256 depth {d256}, ViT-4K depth {d4k} (random weights)")
    print(f"hipt: {n} regions, workers {workers}, batch_regions {batch}, "
          f"readers {' '.join(reader_list)}, precision {'bf16 autocast' if cuda else 'fp32'}")  # fmt: skip
    orig_note = f"{n_orig} regions" if n_orig else "skipped (--original-regions 0)"
    print(f"original: fp32, 1 region per call, {orig_note}")
    print()
    head = f"{'path':<44}{'s/region':>10}{'regions/s':>11}"
    print(head)
    print("-" * len(head))
    rows: list[tuple[str, float, int]] = []
    if orig is not None:
        rows += [
            ("original: read+decode (OpenSlide+PIL)", orig["read"], n_orig),
            ("original: model (fp32, 1 region)", orig["model"], n_orig),
            ("original: end to end", orig["total"], n_orig),
        ]
    for reader in reader_list:
        rows.append((f"hipt: read+decode, {reader} ({workers} workers)", read_s[reader], n))
    rows.append((f"hipt: model alone (batch {batch})", model_s, n))
    for reader in reader_list:
        rows.append((f"hipt: end to end, {reader} (hipt embed)", e2e[reader], n))
    for label, seconds, count in rows:
        print(f"{label:<44}{seconds / count:>10.3f}{count / seconds:>11.3f}")
    print()
    for reader in reader_list:
        share = model_s / e2e[reader]
        if cuda:
            verdict = "the GPU waits for input" if share < 0.9 else "the GPU is the limit"
        else:
            verdict = "on a CPU, readers and model share the cores"
        speedup = (
            f"{(orig['total'] / n_orig) / (e2e[reader] / n):.2f}x the original per region"
            if orig is not None
            else "no original run"
        )
        print(f"hipt end to end, {reader}: {share:.0%} of its model-alone rate ({verdict}); "
              f"{speedup}; GPU utilisation {util[reader]}")  # fmt: skip
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory allocated: {peak:.1f} GiB")
    print()
    print("phase seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
