"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every file the tool writes for later use (checkpoints, weights, configs, reports, caches,
images) goes through here::

    from train import atomic
    atomic.write_text("run/config.yaml", text)
    atomic.save_torch(state, "run/checkpoints/last.ckpt")
    atomic.save_safetensors(model.state_dict(), "run/checkpoints/last.safetensors", metadata={...})
    with atomic.replacing("grid.png") as tmp:   # any writer that takes a path
        image.save(tmp, format="PNG")

The data goes to a temporary file in the destination's folder (same file system, so the
rename is atomic), is flushed and fsync'd, then ``os.replace``-d over the destination; the
folder is fsync'd too, so the rename itself survives a power loss.  On any failure,
KeyboardInterrupt included, the temporary file is removed and the old file stays.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Optional

import torch


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


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary path beside ``path``; when the block ends normally, its file is fsync'd
    and moved over ``path``.  The folder must exist."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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

    # safetensors refuses tensors that share memory: a tensor that is a view of a larger
    # storage, or shares one with an earlier entry, is written as its own copy.
    plain: Dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.nbytes != storage.nbytes():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[key] = t
    with replacing(path) as tmp:
        save_file(plain, tmp, metadata=metadata)


__all__ = ["replacing", "write_bytes", "write_text", "save_torch", "save_safetensors"]
