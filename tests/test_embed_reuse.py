"""The reuse check of ``hipt embed`` and the per-item lock, without running an encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hipt.embed import check_features, features_attrs, tiles_sha256
from hipt.embed.records import SlideResult, read_embedding_csv, write_embedding_csv
from hipt.h5schema import FeaturesWriter, Tiles
from hipt.runlock import ItemLock

ROOT = Path(__file__).resolve().parents[1]
ATTRS = dict(
    slide_id="s1", slide_path="/data/s1.svs", slide_size=[9000, 9000], slide_file_bytes=123,
    mpp_level0=0.25, mpp_source="openslide.mpp-x", target_mpp=0.5, region_size=4096,
    region_size_level0=8192, region_size_read_level=8192, read_level=0, patch_size=256,
    token_size=16, reader="openslide", verified=0, seg_threshold=0.12, hipt_version="0.1.0",
)  # fmt: skip
PROV = dict(vit256_sha256="a" * 64, vit4k_sha256="b" * 64, mean=[0.5] * 3, std=[0.5] * 3)
COORDS = np.array([[0, 0], [8192, 0]], np.int64)


def _tiles(coords=COORDS, **attrs) -> Tiles:
    return Tiles(coords=np.asarray(coords, np.int64), tissue_fraction=np.ones(len(coords)),
                 attrs=dict(ATTRS, **attrs))  # fmt: skip


def _features(path: Path, attrs: dict, coords=COORDS) -> Path:
    with FeaturesWriter(path, coords, attrs, patch_features=False) as w:
        w.write(0, None, np.zeros((len(coords), 192)))
    return path


def test_tiles_hash_covers_what_decides_the_regions_only() -> None:
    base = tiles_sha256(_tiles())
    # Re-tiling with --verify, another reader, version or a threshold that finds the same grid.
    for incidental in (dict(verified=1), dict(reader="fast"), dict(hipt_version="0.2.0"),
                       dict(seg_threshold=0.2), dict(slide_path="/moved/s1.svs")):  # fmt: skip
        assert tiles_sha256(_tiles(**incidental)) == base, incidental
    for decisive in (dict(mpp_level0=0.26), dict(target_mpp=1.0), dict(slide_size=[9000, 9001]),
                     dict(slide_file_bytes=124), dict(read_level=1), dict(slide_id="s2")):  # fmt: skip
        assert tiles_sha256(_tiles(**decisive)) != base, decisive
    assert tiles_sha256(_tiles(coords=COORDS[::-1])) != base  # row order matters


def test_check_features_compares_rows_coords_and_reader(tmp_path: Path) -> None:
    tiles = _tiles()
    expected = features_attrs(tiles, PROV, reader="openslide")
    good = _features(tmp_path / "good.h5", expected)
    assert check_features(good, expected, patch_features=False, tiles=tiles) is None
    # Same tiles hash in the attrs, but the rows are not the tiling's.
    short = _features(tmp_path / "short.h5", expected, COORDS[:1])
    why = check_features(short, expected, patch_features=False, tiles=tiles)
    assert why == "1 rows, the tiling has 2 regions"
    moved = _features(tmp_path / "moved.h5", expected, COORDS + [[0, 16]])
    why = check_features(moved, expected, patch_features=False, tiles=tiles)
    assert why == "coords row 0 is [0, 16], the tiling has [0, 0]"
    # Features made by one reader are not reused by a run that reads with the other.
    fast = features_attrs(tiles, PROV, reader="fast")
    why = check_features(good, fast, patch_features=False, tiles=tiles)
    assert why == "made by the 'openslide' reader, this run reads with 'fast'"


def test_features_of_hipt_0_1_tiles_hash_are_still_reused(tmp_path: Path) -> None:
    import hashlib

    tiles = _tiles()
    h = hashlib.sha256()  # the 0.1.0 hash: coords and every attr
    c = np.ascontiguousarray(tiles.coords.astype("<i8"))
    h.update(f"coords{c.shape}".encode())
    h.update(c.tobytes())
    h.update(json.dumps(tiles.attrs, sort_keys=True, default=str).encode())
    old = _features(tmp_path / "old.h5", features_attrs(tiles, PROV, tiles_hash=h.hexdigest()))
    assert (
        check_features(old, features_attrs(tiles, PROV), patch_features=False, tiles=tiles) is None
    )


def test_records_merge_and_locked_rows_never_replace_a_real_one(tmp_path: Path) -> None:
    path = tmp_path / "embedding.csv"
    write_embedding_csv(path, [SlideResult("a", "ok", 2), SlideResult("b", "failed", error="x")])
    write_embedding_csv(path, [SlideResult("a", "locked", error="being embedded by h pid 1"),
                               SlideResult("c", "locked"), SlideResult("b", "ok", 1)])  # fmt: skip
    rows = {r.slide_id: r.status for r in read_embedding_csv(path)}
    assert rows == {"a": "ok", "b": "ok", "c": "locked"}


_CONTEND = """
import sys, time
from hipt.runlock import ItemLock
from hipt.embed.records import SlideResult, write_embedding_csv
lock = ItemLock(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
print("won" if lock.acquire() else "lost", flush=True)
for i in range(40):  # many read-merge-writes at once: no row may be lost
    write_embedding_csv(sys.argv[3], [SlideResult(f"{sys.argv[4]}{i}", "ok", i)])
time.sleep(0.5)
"""


def test_two_processes_started_together_one_lock_winner_and_no_lost_rows(tmp_path: Path) -> None:
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = str(time.time() + 3)
    lock, csv_path = tmp_path / ".s1.lock", tmp_path / "embedding.csv"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTEND, str(lock), start, str(csv_path), tag],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for tag in ("x", "y")
    ]
    answers = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert answers == ["lost", "won"]
    assert len(read_embedding_csv(csv_path)) == 80
    assert ItemLock(lock).acquire()  # both ended: the winner's lock is dead, taken over


def test_lock_of_a_reused_pid_is_taken_over(tmp_path: Path) -> None:
    # Our own PID, but another start time: the process that took the lock is gone.
    me = os.uname().nodename
    path = tmp_path / ".s1.lock"
    path.write_text(json.dumps(dict(host=me, pid=os.getpid(), started="1")))
    lock = ItemLock(path)
    assert lock.acquire() and lock.took_over is not None
    lock.release()
    assert not path.exists()
    path.write_text(json.dumps(dict(host="elsewhere", pid=1)))
    assert not ItemLock(path).acquire()  # another host's lock cannot be checked: held


@pytest.mark.parametrize("bad", ["not json", ""])
def test_unreadable_lock_is_taken_over(tmp_path: Path, bad: str) -> None:
    path = tmp_path / ".s1.lock"
    path.write_text(bad)
    assert ItemLock(path).acquire()


def test_a_bit_flip_in_reused_features_is_noticed(tmp_path: Path) -> None:
    import h5py

    tiles = _tiles()
    expected = features_attrs(tiles, PROV)
    path = _features(tmp_path / "s1.h5", expected)
    assert check_features(path, expected, patch_features=False, tiles=tiles) is None
    with h5py.File(path) as f:
        info = f["region_features"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 100)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x04]))
    why = check_features(path, expected, patch_features=False, tiles=tiles)
    assert why is not None and "region_features rows 0-1 are damaged" in why


def test_a_slide_id_that_would_make_an_unsafe_path_fails_that_slide(tmp_path: Path) -> None:
    from hipt.embed.plan import PlanSettings, plan_slide
    from hipt.h5schema import write_tiles

    path = write_tiles(tmp_path / "a..b.h5", COORDS, np.ones(2), dict(ATTRS, slide_id="a..b"))
    decision = plan_slide(path, PlanSettings(tmp_path / "features", PROV))
    assert decision.status == "failed" and "slide id 'a..b'" in decision.error
    assert str(path) in decision.error
