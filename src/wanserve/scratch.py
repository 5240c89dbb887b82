"""Scratch space for what a worker writes before it stores it (each job's MP4 and thumbnail).

Each process owns one folder, `<tmp>/wanserve-scratch-*/`, and holds an exclusive `flock` on its `.lock` for as
long as it lives; jobs get sub-folders. The kernel drops the lock when the process dies, however it dies
(kill -9, the OOM killer), so a folder whose lock can be taken belongs to no one, and a starting worker
removes it. A pid in the name could not tell: pids are reused, and in a container every restart is PID 1.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "wanserve-scratch-"
_STARTING = ".wanserve-scratch-starting-"  # not yet locked: never taken for an orphan
_LOCK = ".lock"
_STARTING_MAX_AGE_S = 60.0

_guard = threading.Lock()
_root: Path | None = None
_lock_fd: int | None = None  # kept open, and so locked, until the process ends
_owner = 0  # the pid that made the folder


def job_folder(job_id: str) -> Path:
    """A new, empty folder for one job's files, inside this process's scratch folder."""
    return Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=_own_root()))


def _own_root() -> Path:
    global _root, _lock_fd, _owner
    with _guard:
        here = Path(tempfile.gettempdir())
        if _root is not None and _root.parent == here and _root.is_dir():
            return _root
        starting = Path(tempfile.mkdtemp(prefix=_STARTING, dir=here))
        fd = os.open(starting / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        root = here / (PREFIX + starting.name.removeprefix(_STARTING))
        starting.rename(root)  # the lock is on the file, not its path: it is held across the rename
        if _lock_fd is not None:
            os.close(_lock_fd)  # the previous folder (another tmp dir, or removed by a cleaner) is let go
        else:
            atexit.register(_remove_own)  # a clean exit leaves nothing; a killed process, its starting successor
        _root, _lock_fd, _owner = root, fd, os.getpid()
        return root


def _remove_own() -> None:
    # Only by the process that made it (a forked child inherits this hook), and only when no job folder is in it:
    # a daemon worker thread may still be writing one as the interpreter exits; the next start's sweep takes it.
    if _root is None or _owner != os.getpid():
        return
    with contextlib.suppress(OSError):
        if any(entry.is_dir() for entry in _root.iterdir()):
            return
        shutil.rmtree(_root, ignore_errors=True)


def remove_orphaned() -> None:
    """Delete the scratch folders of processes that are gone; a live process's folder stays, whoever owns it."""
    here = Path(tempfile.gettempdir())
    for starting in here.glob(f"{_STARTING}*"):
        # A process killed between creating its folder and locking it; a live one takes microseconds there.
        with contextlib.suppress(OSError):
            if time.time() - starting.stat().st_mtime > _STARTING_MAX_AGE_S:
                shutil.rmtree(starting, ignore_errors=True)
    for folder in here.glob(f"{PREFIX}*"):
        if folder == _root:
            continue
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR)
        except OSError:  # no lock file: not a scratch folder of ours
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its process is alive
                continue
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a worker process that is gone", folder)
        finally:
            os.close(fd)
