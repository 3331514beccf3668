"""Lock files shared by every process on a data dir: one per instance, job or secret.

A lock is an `flock` on a file that is checked to be still the one at its
path once held, so a lock file removed (by a stop) while someone waited is
taken again, not held in vain. `locked` waits for a busy lock in a thread,
so the event loop goes on meanwhile.
"""

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path


def lock(path: Path, wait: bool) -> int | None:
    """flock `path` (again, if it was replaced meanwhile); None if it is busy and not `wait`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # removed by a stop while we waited
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.asynccontextmanager
async def locked(path: Path) -> AsyncIterator[Path]:
    """Hold the lock file `path` (shared by every process on the data dir); wait in a thread."""
    import asyncio

    fd = lock(path, wait=False)
    if fd is None:
        task = asyncio.ensure_future(asyncio.to_thread(lock, path, True))
        try:
            fd = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_release_later)
            raise
    try:
        yield path
    finally:
        os.close(fd)


def _release_later(task: "asyncio.Future") -> None:  # noqa: F821
    """Close a lock whose waiter was cancelled before the lock came."""
    if not task.cancelled() and task.exception() is None:
        os.close(task.result())
