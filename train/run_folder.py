"""Opening a run folder for writing: one writer at a time, no leftovers of killed runs.

    python -m train fit CONFIG --out runs/a        # holds runs/a/.lock while it runs
    python -m train fit CONFIG --out runs/a        # a second one: exit 2, naming the first

:func:`open_run_folder` creates the folder, takes an exclusive ``flock`` on
``RUN_DIR/.lock`` and writes the holder (pid, host, start time, command) into it.  A second
writer is refused with a message naming that process.  The lock belongs to the open file,
so the kernel drops it when its process ends in any way, ``kill -9`` included: a crashed
run never leaves a lock that blocks the next one (the file stays; only the lock matters,
and deleting it would let two processes lock two different files of the same name).
``flock`` also works across machines on NFSv4 and Lustre (as a POSIX lock).

Then stale temporaries (``*.tmp.<pid>`` of writes a killed process left) are removed from
the folder and its ``checkpoints/`` and ``images/``.

Under torchrun only rank 0 opens the folder; every rank calls :func:`open_run_folder` and
gets rank 0's verdict, so when rank 0 is refused all ranks stop with the same message
instead of the others waiting in their first collective.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from typing import List, Optional

from train import atomic
from train.errors import UserError

LOCK = ".lock"
# Where writes land inside a run folder (and so where temporaries can be left).
WRITTEN_FOLDERS = ("", "checkpoints", "images")


class RunFolderLock:
    """The held lock of one run folder; :meth:`release` (or the process's end) frees it."""

    def __init__(self, run_dir: str, fd: Optional[int], cleaned: List[str]):
        self.run_dir, self._fd, self.cleaned = run_dir, fd, cleaned

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)     # closing the file frees the flock

    def __del__(self):
        self.release()


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)[:500]})


def _describe_holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(raw)
        return (f"process {int(info['pid'])} on {info['host']} (started {info['started']}: "
                f"{str(info.get('command', ''))[:200]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"    # it is still writing its details, or wrote none


def _folder_error(run_dir: str, exc: OSError) -> UserError:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        return UserError(f"run folder {run_dir} exists and is not a folder; choose a folder path with --out")
    return UserError(f"cannot use {run_dir} as the run folder: {exc.strerror or exc}; "
                     "choose a folder you can write to with --out")


def _lock(run_dir: str) -> RunFolderLock:
    import fcntl

    try:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, LOCK)
        # O_NOFOLLOW: a symlink planted as .lock is not followed to some other file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _folder_error(run_dir, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _describe_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run folder {run_dir} is in use by {holder}; two runs writing one folder would mix "
                            "their checkpoints: wait for it to finish (or stop it), or choose another --out"
                            ) from None
        raise UserError(f"cannot lock run folder {run_dir} ({exc.strerror or exc}); choose a folder on a "
                        "file system that supports locks with --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode("utf-8"), 0)
    except OSError as exc:
        os.close(fd)
        raise atomic.write_error(os.path.join(run_dir, LOCK), exc) from None
    cleaned = [p for sub in WRITTEN_FOLDERS for p in atomic.clean_stale_temporaries(os.path.join(run_dir, sub))]
    return RunFolderLock(run_dir, fd, cleaned)


def open_run_folder(run_dir: str, is_main: bool = True) -> RunFolderLock:
    """Lock ``run_dir`` for this run (creating it) and clean what killed runs left.

    A collective under torchrun (every rank calls it; rank 0 locks, the others share its
    verdict).  UserError when another process holds the folder or it cannot be used."""
    from train.rank_sync import agreed

    lock = agreed(lambda: _lock(run_dir) if is_main else None, main_only=True)
    return lock if lock is not None else RunFolderLock(run_dir, None, [])


__all__ = ["open_run_folder", "RunFolderLock", "LOCK"]
