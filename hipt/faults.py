"""Faults every command meets the same way: a full disk and SIGTERM.

* A full file system surfaces as ``OSError(ENOSPC)`` from Python, but h5py and other libraries
  wrap it in their own messages. :func:`disk_full_message` recognises both and names the file;
  ``hipt`` (:mod:`hipt.cli`) prints ``no space left on device: FILE`` and exits 1 for every
  command, so no traceback reaches a Slurm log.
* SIGTERM (Slurm's preemption and time limit, ``kill``) kills a Python process at once, with no
  cleanup. Inside :func:`raise_on_sigterm` it raises :class:`Terminated` in the main thread
  instead, so ``finally`` blocks stop workers and drop temporary files; ``hipt`` then exits
  :data:`EXIT_TERMINATED` (143, what a shell reports for a SIGTERM death), which Slurm's
  ``--requeue`` treats as a preemption.

Examples
--------
>>> disk_full_message(OSError(28, "No space left on device", "/out/features/.s1.h5.tmp-1"))
'no space left on device: /out/features/.s1.h5.tmp-1'
>>> disk_full_message(ValueError("bad")) is None
True
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import threading
from collections.abc import Iterator

__all__ = ["EXIT_TERMINATED", "Terminated", "raise_on_sigterm", "disk_full_message", "DiskFull"]

EXIT_TERMINATED = 128 + signal.SIGTERM

# h5py reports a failed write of the HDF5 library as text: "... filename = '/x/y.h5', ...,
# errno = 28, error message = 'No space left on device' ...".
_H5_FILENAME = re.compile(r"filename = '([^']*)'")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM inside :func:`raise_on_sigterm`.

    A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` blocks that let one
    slide fail and the batch go on must not swallow it.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


class DiskFull(OSError):
    """The file system of ``filename`` is full (raised where the writer knows the file)."""

    def __init__(self, filename: str | None) -> None:
        super().__init__(errno.ENOSPC, "No space left on device", filename)


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` instead of killing the process.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_message(exc: BaseException) -> str | None:
    """``"no space left on device: FILE"`` when ``exc`` (or its cause) is a full disk, else None."""
    for e in _chain(exc):
        text = str(e)
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
            "No space left on device" in text or "errno = 28," in text
        )
        if not full:
            continue
        filename = getattr(e, "filename", None)
        if not filename:
            found = _H5_FILENAME.search(text)
            filename = found.group(1) if found else None
        return f"no space left on device: {filename or '(file not named by the system)'}"
    return None
