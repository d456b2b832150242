"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file the tool writes for later use (checkpoints, weights, configs, reports, caches,
images) goes through here::

    from train import atomic
    atomic.write_text("run/config.yaml", text)
    atomic.save_torch(state, "run/checkpoints/last.ckpt")
    atomic.save_safetensors(model.state_dict(), "run/checkpoints/last.safetensors", metadata={...})
    atomic.copy_file("run/checkpoints/last.ckpt", "run/checkpoints/step-100.ckpt")
    with atomic.replacing("grid.png") as tmp:   # any writer that takes a path
        image.save(tmp, format="PNG")

The data goes to a temporary file ``<name>.tmp.<pid>`` in the destination's folder (same
file system, so the rename is atomic), is flushed and fsync'd, then ``os.replace``-d over
the destination; the folder is fsync'd too, so the rename itself survives a power loss.  On
any failure, KeyboardInterrupt included, the temporary file is removed and the old file
stays.  A temporary left by a killed process is removed by :func:`clean_stale_temporaries`
(the trainer runs it when it opens a run folder).

What is refused, as one :class:`~train.errors.UserError` line (exit 2):

* a destination that exists and is not a regular file (a FIFO, socket, device node or
  folder): replacing it would destroy it (``validate --fix /dev/stdout`` as root used to
  replace the device node with a file).  A symlink is followed: its target is rewritten and
  the link stays;
* a write the operating system refuses (disk full, quota, read-only or unwritable folder):
  the message names the file and the fix, and the previous file is unchanged.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import zlib
from typing import Any, Dict, Iterator, List, Optional

import torch

from train.errors import UserError

# <name>.tmp.<pid>: the pid says whether the writer may still be alive.
_TMP = re.compile(r"^(?P<name>.+)\.tmp\.(?P<pid>\d+)$")

# What a refused write tells the user to do, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space or write to another disk",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "you may not write there; fix the folder's permissions or choose another location",
    errno.EPERM: "you may not write there; fix the folder's permissions or choose another location",
    errno.ENOENT: "its folder does not exist; create it or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another location",
    errno.EISDIR: "it is a folder; name a file",
    errno.EIO: "the disk reported an I/O error; check the device and write elsewhere",
}


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def target_of(path: str) -> str:
    """The file a write to ``path`` replaces: ``path`` itself, or the final target of a
    symlink (so the link survives and what it names is rewritten).

    UserError when that exists and is not a regular file: a device node, FIFO, socket or
    folder is never replaced."""
    path = os.fspath(path)
    real = os.path.realpath(path) if os.path.islink(path) else path
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise write_error(path, exc) from None
    if not stat.S_ISREG(mode):
        shown = path if real == path else f"{path} (-> {real})"
        raise UserError(f"{shown} is {_kind(mode)}, not a regular file: refusing to replace it; "
                        "name a regular file to write to (e.g. out.yaml)")
    return real


def write_error(path: str, exc: OSError) -> UserError:
    """One line for a write the operating system refused."""
    reason = exc.strerror or str(exc)
    fix = _WRITE_FIXES.get(exc.errno, "check the location and free space, or choose another location")
    kept = " (the previous file is unchanged)" if os.path.isfile(path) else ""
    return UserError(f"cannot write {path}: {reason}{kept}; {fix}")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: str) -> None:
    # A directory fsync makes the rename durable; some file systems cannot open folders.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        # An unremovable temporary is cleaned by the next clean_stale_temporaries; the
        # error the caller is already handling matters more.
        pass


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary path beside ``path``; when the block ends normally, its file is fsync'd
    and moved over ``path``.  The folder must exist.  An OSError inside the block (the
    writer's disk full, say) becomes one UserError naming ``path``."""
    path = os.fspath(path)
    real = target_of(path)
    tmp = f"{real}.tmp.{os.getpid()}"
    try:
        yield tmp
        _fsync_file(tmp)
        # Checked again right before the rename: a FIFO made meanwhile is still not replaced.
        target_of(real)
        os.replace(tmp, real)
        _fsync_dir(os.path.dirname(os.path.abspath(real)))
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if os.path.lexists(tmp):
            _remove_quietly(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with replacing(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: str, text: str) -> None:
    """``text`` as UTF-8 (newlines as given)."""
    write_bytes(path, text.encode("utf-8"))


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """A ``.safetensors`` file of CPU copies of ``tensors``, atomically."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(plain_tensors(tensors), tmp, metadata=metadata)


def plain_tensors(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their memory: what safetensors writes (it refuses
    tensors that share memory: a view of a larger storage, or one shared with an earlier
    entry, becomes its own copy)."""
    plain: Dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.nbytes != storage.nbytes():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[key] = t
    return plain


# ----------------------------------------------------------------------------------------
# Copies

_FICLONE = 0x40049409   # linux/fs.h: _IOW(0x94, 9, int), share the source's blocks


def _clone_or_copy(src_fh, dst_fh) -> None:
    """``dst`` gets ``src``'s bytes: a reflink (shared blocks, copy-on-write: free and still
    an independent file) where the file system can, else a kernel copy, else a plain one."""
    try:
        import fcntl

        fcntl.ioctl(dst_fh.fileno(), _FICLONE, src_fh.fileno())
        return
    except (ImportError, OSError):
        pass
    size = os.fstat(src_fh.fileno()).st_size
    if hasattr(os, "copy_file_range"):
        try:
            done = 0
            while done < size:
                n = os.copy_file_range(src_fh.fileno(), dst_fh.fileno(), size - done, done, done)
                if n == 0:
                    break
                done += n
            if done == size:
                return
        except OSError as exc:
            # Out of space is a real failure; anything else (EXDEV, ENOSYS...) means "not here".
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
        dst_fh.seek(0)
        dst_fh.truncate()
        src_fh.seek(0)
    shutil.copyfileobj(src_fh, dst_fh, 1 << 20)


def copy_file(src: str, dst: str) -> None:
    """``dst`` becomes an independent copy of ``src`` (damage to one never shows in the
    other, unlike a hard link), written atomically."""
    with replacing(dst) as tmp:
        with open(src, "rb") as src_fh, open(tmp, "wb") as dst_fh:
            _clone_or_copy(src_fh, dst_fh)


# ----------------------------------------------------------------------------------------
# Checksums of saved tensors and stale temporaries

CHECKSUM = "crc32"      # zlib's: ~3 GB/s, catches any scribble with odds 2^-32 of missing it


def tensor_checksum(t: torch.Tensor) -> str:
    """crc32 of the tensor's bytes (in memory order of a contiguous CPU copy), as 8 hex digits."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (weights files, encoded code shards)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False    # ours from an earlier process with this pid: nothing of ours is mid-write yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # someone else's live process
    return True


def clean_stale_temporaries(folder: str) -> List[str]:
    """Remove ``<name>.tmp.<pid>`` files in ``folder`` whose writer is no longer running (a
    run killed mid-write); returns what was removed.  Call it only while holding the
    folder's lock, so no other writer of the folder can be mid-write with a reused pid."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TMP.match(name)
        path = os.path.join(folder, name)
        if match and not _pid_alive(int(match.group("pid"))) and os.path.isfile(path) \
                and not os.path.islink(path):
            _remove_quietly(path)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


__all__ = ["sha256_file", "replacing", "write_bytes", "write_text", "save_torch", "save_safetensors", "plain_tensors",
           "copy_file", "target_of", "write_error", "tensor_checksum", "CHECKSUM", "clean_stale_temporaries"]
