"""Locks that let overlapping runs share one output folder: per-item locks and merged records.

Two tasks that write the same output folder (a requeued Slurm task beside its predecessor, two
arrays with overlapping shards) must not redo each other's work, delete each other's temporary
files, or lose each other's rows in a run record. Two helpers, for any stage:

* :class:`ItemLock`: a lock file per item (a slide, a run), created with ``O_EXCL`` and holding
  the owner's host, PID and the process start time. An item whose lock is held by a live
  process is left alone; a lock whose process is dead (same host, PID gone or reused) is taken
  over. Only the lock holder may delete the item's temporary files, so a live process's files
  are never touched. A lock from another host cannot be checked and counts as held; its line
  says which host to look at. One exception, so that a requeued Slurm job never waits for
  itself: the lock also records the job's ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT``, and a
  lock written by an earlier start of this very job (same job id, lower restart count) is dead
  wherever it was taken, since Slurm ends every process of a job before starting it again.
* :func:`locked_file`: an exclusive ``flock`` on a side file for a read-modify-write of a shared
  record (``embedding.csv``): read the latest rows, merge, write atomically, unlock.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> lock = ItemLock(d / ".s1.lock")
>>> lock.acquire()
True
>>> ItemLock(d / ".s1.lock").acquire()  # a second holder in this live process is refused
False
>>> lock.release()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LockOwner", "ItemLock", "locked_file", "process_alive"]

# A takeover of a dead owner's lock is serialised by a side file; one older than this was left by
# a process killed mid-takeover (which takes microseconds) and is removed.
_TAKEOVER_STALE_S = 60.0


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` ("" when unknown): tells a reused PID from its owner."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Field 22 (starttime), after the parenthesised command name, which may hold spaces.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _slurm_job() -> tuple[str, int]:
    """This process's Slurm job id and restart count (``("", 0)`` outside Slurm)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restart = 0
    return job, restart


def process_alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` of this host runs (and, if ``started`` is given, is that process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return not started or not _start_time(pid) or _start_time(pid) == started


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: host, PID, process start time, when it was taken, and its Slurm job.

    ``job`` and ``restart`` are the owner's ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT`` (empty
    and 0 outside Slurm).
    """

    host: str
    pid: int
    started: str = ""
    since: float = 0.0
    job: str = ""
    restart: int = 0

    @classmethod
    def me(cls) -> LockOwner:
        pid = os.getpid()
        job, restart = _slurm_job()
        return cls(socket.gethostname(), pid, _start_time(pid), time.time(), job, restart)

    def alive(self) -> bool:
        """True unless the owner is known to be dead (see the module docstring for how)."""
        my_job, my_restart = _slurm_job()
        if self.job and self.job == my_job and self.restart < my_restart:
            return False  # an earlier start of this requeued job: Slurm ended it before this one
        if self.host != socket.gethostname():
            return True
        return process_alive(self.pid, self.started)

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    def __str__(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"{self.host} pid {self.pid}{job}"


class ItemLock:
    """An exclusive lock on one item, as a file holding its owner (see the module docstring).

    Parameters
    ----------
    path : path-like
        The lock file, e.g. ``features/.<slide_id>.lock`` (a dot-file, so no reader lists it).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.held = False
        self.took_over: LockOwner | None = None

    def owner(self) -> LockOwner | None:
        """The current owner recorded in the lock file (None when there is none or it is unreadable)."""
        try:
            data = json.loads(self.path.read_text())
            return LockOwner(str(data["host"]), int(data["pid"]), str(data.get("started", "")),
                             float(data.get("since", 0.0)), str(data.get("job", "")),
                             int(data.get("restart", 0)))  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> bool:
        """Take the lock; False when a live process holds it. A dead owner's lock is taken over."""
        if self.held:
            return True
        if self._create():
            return True
        owner = self.owner()
        if owner is None:
            # Being written this instant, or left empty by a kill between create and write.
            time.sleep(0.05)
            owner = self.owner()
        if owner is not None and owner.alive():
            return False  # includes another ItemLock of this very process
        return self._take_over(owner)

    def _create(self) -> bool:
        text = LockOwner.me().as_json()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        self.held = True
        return True

    def _take_over(self, dead: LockOwner | None) -> bool:
        # Two processes may find the same dead owner at once; a side file created with O_EXCL
        # lets one of them replace the lock, and the other then sees a live owner.
        guard = self.path.with_name(self.path.name + ".takeover")
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                guard.unlink()
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        try:
            if self.owner() != dead:
                return False  # someone else took it over meanwhile
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if self._create():
                self.took_over = dead
                return True
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def release(self) -> None:
        """Drop the lock if this object holds it (safe to call more than once)."""
        if not self.held:
            return
        self.held = False
        me = LockOwner.me()
        owner = self.owner()
        if owner is not None and (owner.host, owner.pid) == (me.host, me.pid):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> ItemLock:
        if not self.acquire():
            raise RuntimeError(f"{self.path}: held by {self.owner()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked_file(path: str | os.PathLike, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` for a read-modify-write of ``path``.

    The kernel drops the lock when its holder dies, so a killed process never blocks others.

    Raises
    ------
    TimeoutError
        When another process holds it for longer than ``timeout_s``.
    """
    side = Path(path).with_name(f".{Path(path).name}.lock")
    side.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(side, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{side}: still locked after {timeout_s:.0f} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
