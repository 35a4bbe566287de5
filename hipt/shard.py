"""Deterministic ``--shard I/N`` split of a slide list, for Slurm job arrays of any stage.

A slide goes to shard ``int(sha256(slide_id)[:16], 16) % N``. The owner of a slide depends on its
id alone, not on which other slides a task happens to see, so two array tasks never claim the
same slide even when the input folder changes between their starts (a late tiling run, a slide
added by hand). The price is that shards are balanced only on average (about ``n / N`` slides
each, ± ``sqrt(n / N)``), which is what a cluster array of many slides needs.

Examples
--------
>>> ids = [f"slide{i}" for i in range(10)]
>>> parts = [shard_items(ids, Shard(i, 3)) for i in range(3)]
>>> sorted(sum(parts, [])) == sorted(ids)
True
>>> parse_shard("1/3")
Shard(index=1, count=3)

From a shell (any stage's array script), the files of this task's shard, keyed by file stem::

    python -m hipt.shard slurm slides/*.svs      # or: python -m hipt.shard 2/8 slides/*.svs
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypeVar

T = TypeVar("T")

__all__ = ["Shard", "parse_shard", "shard_of", "shard_items", "shard_from_slurm", "resolve_shard"]


class Shard(NamedTuple):
    """Shard ``index`` of ``count`` (0-based, ``0 <= index < count``)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """File-name-safe label, e.g. ``shard-1-of-3``."""
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(spec: str) -> Shard:
    """Parse ``"I/N"`` (0-based ``I``).

    Raises
    ------
    ValueError
        With a one-line message when ``spec`` is not ``I/N`` with ``0 <= I < N``.
    """
    text = str(spec).strip()
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"shard {spec!r}: expected I/N, e.g. 0/4")
    try:
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"shard {spec!r}: I and N must be integers, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {spec!r}: need N >= 1 and 0 <= I < N")
    return Shard(index, count)


def shard_of(key: str, count: int) -> int:
    """The shard (``0 .. count-1``) that owns ``key``; stable across runs, machines and Pythons."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    digest = hashlib.sha256(str(key).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % count


def shard_items(items: Iterable[T], shard: Shard | None, key: Callable[[T], str] = str) -> list[T]:
    """Items whose ``key`` falls in ``shard``, in their input order; all of them when ``shard`` is None.

    Examples
    --------
    >>> shard_items(["a", "b", "c"], None)
    ['a', 'b', 'c']
    """
    items = list(items)
    if shard is None or shard.count == 1:
        return items
    return [item for item in items if shard_of(key(item), shard.count) == shard.index]


def shard_from_slurm(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this Slurm array task, or None outside an array.

    Uses ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` as the index and
    ``SLURM_ARRAY_TASK_COUNT`` as the count, so ``--array=1-8`` works as well as ``--array=0-7``.
    Arrays with a step (``0-15:2``) are not contiguous and are refused.
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    high = int(env.get("SLURM_ARRAY_TASK_MAX", str(low + count - 1)))
    if high - low + 1 != count:
        raise ValueError(
            f"Slurm array {low}-{high} has {count} tasks: use a contiguous array (no step) "
            "or pass --shard I/N explicitly"
        )
    return Shard(task - low, count)


def resolve_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """``None`` → no sharding; ``"slurm"`` → :func:`shard_from_slurm`; otherwise :func:`parse_shard`."""
    if spec is None or str(spec).strip() == "":
        return None
    if str(spec).strip().lower() == "slurm":
        shard = shard_from_slurm(environ)
        if shard is None:
            raise ValueError(
                "--shard slurm: SLURM_ARRAY_TASK_ID is not set (not a Slurm array task)"
            )
        return shard
    return parse_shard(spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m hipt.shard I/N|slurm ITEM...``: print the items of that shard, one a line.

    An item's key is its file stem (``slides/TCGA-01.svs`` → ``TCGA-01``), the same key
    ``hipt embed --shard`` uses for ``tiles/TCGA-01.h5``, so every stage agrees on the owner.
    """
    import argparse
    from pathlib import PurePath

    p = argparse.ArgumentParser(
        prog="python -m hipt.shard", description=main.__doc__.split("\n")[0]
    )
    p.add_argument("shard", help="I/N (0-based) or 'slurm' for this array task")
    p.add_argument("items", nargs="*", help="paths or ids")
    args = p.parse_args(argv)
    try:
        shard = resolve_shard(args.shard)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for item in shard_items(args.items, shard, key=lambda s: PurePath(s).stem):
        print(item)
    return 0


if __name__ == "__main__":
    sys.exit(main())
