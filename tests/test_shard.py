"""The ``--shard I/N`` split: every slide in exactly one shard, stable, and strict about bad specs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hipt.shard import Shard, parse_shard, resolve_shard, shard_from_slurm, shard_items, shard_of

IDS = [f"TCGA-{i:02d}-{i * 7 % 13:04d}" for i in range(40)] + ["a", "b", "c", "slide one"]


def test_three_shards_cover_every_slide_exactly_once() -> None:
    parts = [shard_items(IDS, Shard(i, 3)) for i in range(3)]
    flat = [s for part in parts for s in part]
    assert sorted(flat) == sorted(IDS)
    assert len(flat) == len(set(flat)) == len(IDS)
    # With 44 slides no shard should be empty; a hash split is balanced on average.
    assert all(len(p) >= 5 for p in parts), [len(p) for p in parts]


def test_owner_depends_on_the_id_only() -> None:
    # A task that sees fewer slides (folder changed between starts) claims the same ones.
    full = shard_items(IDS, Shard(1, 4))
    partial = shard_items(IDS[::2], Shard(1, 4))
    assert set(partial) == set(full) & set(IDS[::2])
    # Order within a shard follows the input order.
    assert full == [s for s in IDS if s in set(full)]


def test_shard_of_is_stable_across_processes() -> None:
    # Python's own hash() is salted per process; ours must not be.
    code = "from hipt.shard import shard_of; print([shard_of(s, 7) for s in ['x', 'TCGA-AB', 'slide 9']])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([shard_of(s, 7) for s in ["x", "TCGA-AB", "slide 9"]])


def test_single_shard_and_none_keep_everything() -> None:
    assert shard_items(IDS, None) == IDS
    assert shard_items(IDS, Shard(0, 1)) == IDS


def test_key_function() -> None:
    rows = [{"slide_id": s} for s in IDS]
    got = shard_items(rows, Shard(2, 3), key=lambda r: r["slide_id"])
    assert [r["slide_id"] for r in got] == shard_items(IDS, Shard(2, 3))


@pytest.mark.parametrize("spec", ["3/3", "-1/3", "1", "a/b", "1/0", "1/2/3", ""])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        parse_shard(spec)


def test_parse_and_tag() -> None:
    s = parse_shard(" 2/5 ")
    assert s == Shard(2, 5) and str(s) == "2/5" and s.tag == "shard-2-of-5"


def test_slurm_environment() -> None:
    env = {
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "8",
        "SLURM_ARRAY_TASK_COUNT": "8",
    }
    assert shard_from_slurm(env) == Shard(4, 8)
    assert resolve_shard("slurm", env) == Shard(4, 8)
    assert shard_from_slurm({}) is None
    assert resolve_shard(None) is None
    with pytest.raises(ValueError, match="not set"):
        resolve_shard("slurm", {})
    stepped = dict(env, SLURM_ARRAY_TASK_MAX="15", SLURM_ARRAY_TASK_MIN="0")
    with pytest.raises(ValueError, match="contiguous"):
        shard_from_slurm(stepped)


def test_shard_of_range() -> None:
    assert {shard_of(s, 5) for s in IDS} <= set(range(5))
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_command_line_prints_the_shard_by_file_stem() -> None:
    files = [f"slides/{s}.svs" for s in IDS]
    got = []
    for i in range(3):
        out = subprocess.run(
            [sys.executable, "-m", "hipt.shard", f"{i}/3", *files], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        # Same owner as hipt embed gives tiles/<stem>.h5: the key is the stem.
        assert lines == [f"slides/{s}.svs" for s in shard_items(IDS, Shard(i, 3))]
        got += lines
    assert sorted(got) == sorted(files)
    bad = subprocess.run(
        [sys.executable, "-m", "hipt.shard", "5/3", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "shard" in bad.stderr
