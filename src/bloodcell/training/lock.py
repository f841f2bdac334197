"""A run folder is used by one process at a time: an OS file lock that dies with its process.

``flock`` on ``RUN/.lock`` is released by the kernel when the holder exits or is killed, so a killed run never
leaves a stale lock; the file records the holder's pid for the message the second process prints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from bloodcell.errors import BloodcellError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the block; a second holder gets a one-line error naming the first."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there are not protected against a second start
        yield
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise BloodcellError(f"{run_dir}: cannot write to the run folder ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BloodcellError(f"{run_dir}: in use by another bloodcell process (pid {holder}); wait for it "
                                 "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
