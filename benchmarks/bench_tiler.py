"""Tiling time and memory: a small slide vs a 100,000 × 100,000 px slide.

The tiler reads only low-resolution levels, so its wall time and peak memory should not grow with
the slide. Goal: under 3 s and under 1 GiB for the huge slide, on a 2-core machine.

Each measurement runs ``tile_slide`` in a fresh Python process and reports that process's wall
time for tiling (imports excluded) and its peak RSS (``resource.getrusage``), so generating the
slides does not pollute the numbers. Generated slides are cached in a temporary folder.

Usage::

    python benchmarks/bench_tiler.py [--size 100000] [--repeats 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 3.0
GOAL_RSS_MIB = 1024.0

CHILD = r"""
import json, resource, sys, tempfile, time
from preprocessing.tiler import TileSettings, tile_slide
path, reader = sys.argv[1], sys.argv[2]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    r = tile_slide(path, out, TileSettings(reader=reader))
    seconds = time.perf_counter() - t
print(json.dumps(dict(status=r.status, error=r.error, n_regions=r.n_regions, seconds=seconds,
                      rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      rss_imports_mib=rss_before)))
"""


def make_slides(cache: Path, size: int) -> dict[str, Path]:
    from hipt import synthetic

    cache.mkdir(parents=True, exist_ok=True)
    slides = {
        "small 8192² SVS 0.25": (cache / "bench_small_8192.svs", 8192),
        f"huge {size:,}² SVS 0.25": (cache / f"bench_huge_{size}.svs", size),
    }
    out = {}
    for name, (path, side) in slides.items():
        done = path.with_suffix(".done")
        if not done.exists():
            t = time.perf_counter()
            print(
                f"generating {path.name} ({side:,} px square; cached for later runs)...", flush=True
            )
            synthetic.write_svs(
                path, side, side, mpp=0.25, seed=7, n_blobs=5, nuclei=False, reuse_interior=True
            )
            done.write_text("ok\n")
            print(
                f"  {time.perf_counter() - t:.0f} s, {path.stat().st_size / 2**20:.0f} MiB",
                flush=True,
            )
        out[name] = path
    return out


def measure(path: Path, reader: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), reader], cwd=root, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000, help="side of the huge slide in px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hipt-bench-slides")
    ap.add_argument("--readers", nargs="+", default=["openslide", "auto"])
    args = ap.parse_args()

    slides = make_slides(args.cache, args.size)
    rows = []
    for name, path in slides.items():
        for reader in args.readers:
            runs = [measure(path, reader) for _ in range(args.repeats)]
            if any(r["status"] != "ok" for r in runs):
                raise RuntimeError(f"{name}: {runs[0]['error']}")
            secs = sorted(r["seconds"] for r in runs)
            rows.append(
                dict(
                    slide=name,
                    reader=reader,
                    regions=runs[0]["n_regions"],
                    median_s=secs[len(secs) // 2],
                    max_s=secs[-1],
                    rss=max(r["rss_mib"] for r in runs),
                    rss_imports=max(r["rss_imports_mib"] for r in runs),
                )
            )

    head = f"{'slide':<26} {'reader':<10} {'regions':>7} {'median s':>9} {'max s':>7} {'peak RSS MiB':>13} {'after imports':>14}"
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['slide']:<26} {r['reader']:<10} {r['regions']:>7} {r['median_s']:>9.3f} {r['max_s']:>7.3f} "
            f"{r['rss']:>13.0f} {r['rss_imports']:>14.0f}"
        )
    huge = [r for r in rows if r["slide"].startswith("huge")]
    small = {r["reader"]: r for r in rows if r["slide"].startswith("small")}
    print()
    ok = True
    for r in huge:
        base = small[r["reader"]]
        ratio = r["median_s"] / max(base["median_s"], 1e-9)
        good = r["median_s"] < GOAL_SECONDS and r["rss"] < GOAL_RSS_MIB
        ok &= good
        print(
            f"{r['reader']}: huge/small time ratio {ratio:.2f}; goal < {GOAL_SECONDS:g} s and "
            f"< {GOAL_RSS_MIB:.0f} MiB: {'met' if good else 'NOT met'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
