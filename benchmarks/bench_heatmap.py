"""`hipt heatmap` time and peak memory: a small slide (baseline) vs a 100,000 × 100,000 px slide.

Both slides are generated (:mod:`heatmaps.planted`, a little tissue on glass, so generation takes
minutes), with every 4096 px region on the grid tiled and features written directly (random
full-size encoders recorded: ViT-4K of 6 blocks scores the patches), and a fold folder holding
an ``abmil`` slide model. Each case runs ``hipt heatmap --levels slide,region --top-k 5`` in its
own process; the table gives wall time, the phases from ``heatmap.json`` and the peak resident
memory of that process (``wait4`` maxrss). ``--tokens`` adds a row with the token level (the
12-block ViT-256 over the top regions: the encoder's own time).

Usage::

    python benchmarks/bench_heatmap.py [--size 100000] [--cache DIR] [--tokens]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGION_L0 = 4096  # level-0 px of a region at 0.5 µm/px on a 0.5 µm/px scan


def make_case(cache: Path, name: str, side: int) -> Path:
    """A planted run of a ``side``² px slide at 0.5 µm/px, cached in ``cache/name``."""
    from heatmaps.planted import make_planted_run

    root = cache / name
    if (root / "ready").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    n = side // REGION_L0
    print(
        f"generating {name}: {side:,}² px, {n * n} regions (cached for later runs)...", flush=True
    )
    t0 = time.perf_counter()
    make_planted_run(
        root,
        grid=(n, n),
        mpp_level0=0.5,
        slide_size=(side, side),
        encoders="random",
        planted_region=(n // 2) * n + n // 2,
        seed=7,
        # Little tissue keeps generation to minutes (glass tiles are encoded once); the slide's
        # pixels do not change the work of the slide and region levels, which read features.
        n_blobs=2,
        blob_scale=0.35,
        nuclei=False,
    )
    (root / "ready").write_text("ok\n")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def run_case(root: Path, out: Path, levels: str) -> dict:
    """Run ``hipt heatmap`` on a cached case; wall seconds, peak RSS and the record's phases."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "hipt.cli",
        "heatmap",
        "--run",
        str(root / "runs" / "planted" / "fold_0"),
        "--features",
        str(root / "features" / "planted.h5"),
        "--levels",
        levels,
        "--top-k",
        "5",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hipt heatmap failed on {root}:\n{err}")
    record = json.loads((out / "planted" / "heatmap.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load": load,
        "render_s": record["seconds"],
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "regions": record["features"]["n_regions"],
        "timings": record["timings_s"],
        "zarr": record["outputs"]["zarr"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000, help="side of the huge slide in px")
    ap.add_argument("--small", type=int, default=16_384, help="side of the baseline slide in px")
    ap.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "hipt_bench_heatmap"
    )
    ap.add_argument("--tokens", action="store_true", help="also time the token level (slow on CPU)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    cases = [("small", make_case(args.cache, f"small_{args.small}", args.small), "slide,region")]
    huge = make_case(args.cache, f"huge_{args.size}", args.size)
    cases.append(("huge", huge, "slide,region"))
    if args.tokens:
        cases.append(("huge + tokens", huge, "slide,region,token"))
    rows = []
    for label, root, levels in cases:
        r = run_case(root, args.cache / "out" / label.replace(" ", ""), levels)
        rows.append((label, levels, r))
        print(f"{label}: {r['wall_s']:.1f} s, {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs; load average (1 min) before each case in the table")
    phases = ["score", "top_regions", "slide_png", "top_regions_png", "zarr", "geojson"]
    head = "| slide | levels | regions | load | wall s | CPU s | render s | " + " | ".join(phases)
    print("\n" + head + " | peak RSS MiB | zarr base px |")
    print("|" + "---|" * (len(phases) + 9))
    for label, levels, r in rows:
        t = " | ".join(f"{r['timings'].get(p, 0):.2f}" for p in phases)
        side = {"small": args.small}.get(label, args.size)
        base = -(-side // int(r["zarr"]["downsample_level0"]))
        print(
            f"| {label} {side:,}² | {levels} | {r['regions']} | {r['load']:.1f} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | "
            f"{r['render_s']:.1f} | {t} | {r['peak_rss_mib']:.0f} | {base:,}² |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
