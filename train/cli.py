"""Command line: ``python -m train validate|fit|migrate|eval|extract-features ...``.

Each command lives in its own module and exposes ``cli_main(argv) -> int``.  Exit codes:
0 ok, 1 problems found in valid input, 2 unusable input (one clear line, no traceback),
130 Ctrl-C, 143 SIGTERM before the command could finish (``fit`` handles SIGTERM itself
once training runs: it saves and exits 0).

:func:`main` turns what the environment refuses into the same one line: a
:class:`~train.errors.UserError` (also one raised inside a DataLoader worker, which torch
re-raises wrapped in the worker's traceback) and an ``OSError`` (disk full, a path through
a file, no permission) exit 2.  The helpers below check what several commands take:
``--device`` values (:func:`parse_device`) and output paths (:func:`check_out_path`).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
import threading
from typing import List, Optional, Tuple

from train.errors import UserError

COMMANDS = {
    "validate": ("train.validate", "check configs and print every finding with its fix"),
    "fit": ("train.fit", "train a model from a config"),
    "migrate": ("train.migrate", "convert a legacy config and checkpoint into this tool"),
    "eval": ("train.evaluate", "reconstruction metrics of a checkpoint on a data set"),
    "encode": ("train.encode", "images -> code indices of a tokenizer (sharded .npy files + index)"),
    "decode": ("train.decode", "code indices -> PNG images"),
    "extract-features": ("train.features", "cache DINO teacher features for DinoVQ"),
    "write-shards": ("train.shards", "write images into WebDataset tar shards for fit --data PATTERN"),
    "demo": ("train.demo", "train a small EMAVQ on built-in photos for a few minutes (make demo)"),
}

class CommandParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one UserError line (exit 2), not usage text."""

    def error(self, message):
        command = self.prog.replace("python -m train ", "")
        raise UserError(f"{command}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def positionals(items: List[str], command: str, count: int, what: str, usage: str) -> Tuple[List[str], List[str]]:
    """Split a command's free items into ``count`` positional arguments (``what``, e.g. "one
    SOURCE") and ``key=value`` overrides (an item with '=' is an override); a wrong count is
    one line naming what it got and the usage."""
    positional = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if len(positional) != count:
        got = f"got {', '.join(positional)}" if positional else "got none"
        raise UserError(f"{command}: {what} expected ({got}); usage: {usage}")
    return positional, overrides


def parse_device(text: str, command: str):
    """``--device`` as a ``torch.device`` this machine has; UserError otherwise.

    torch accepts names of devices that are not here (``mps``, ``xpu``, ``meta``,
    ``cuda:7`` on a one-GPU machine) and fails much later with a traceback; and a name it
    does not know (``gpu``, ``eval``) raises a RuntimeError listing twenty backends.
    """
    import torch

    usable = "cpu" + (", cuda, cuda:0" if torch.cuda.is_available() else "")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{command}: --device {text!r} is not a device name; use one of {usable}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{command}: --device {text}: no CUDA device here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{command}: --device {text}: this machine has {count} CUDA device(s) "
                            f"(cuda:0 to cuda:{count - 1}); pick one of them")
        return device
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and mps is not None and mps.is_available():
        return device
    raise UserError(f"{command}: --device {text}: no {device.type} device here; use one of {usable}")


def check_out_path(path: str, want: str, command: str, flag: str = "--out") -> str:
    """Refuse, before any work is done, an output path the command could not write.

    ``want`` is ``"folder"`` (a run folder, a migrated folder) or ``"file"`` (a report, a
    cache).  Refused: an empty value, an existing path of the other kind, a FIFO, socket or
    device where a file goes (the atomic writer would replace it with a regular file), and a
    path whose nearest existing parent is a file or not writable.  An existing regular file
    where a file goes is allowed: it is replaced atomically.  Returns the absolute path.
    """
    if not str(path).strip():
        raise UserError(f"{command}: {flag} is empty; name a {want}")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        if want == "file":
            raise UserError(f"{command}: {flag} {path} is a folder; name a file inside it or elsewhere")
    elif os.path.exists(full):
        if want == "folder":
            raise UserError(f"{command}: {flag} {path} exists and is not a folder; name a new or existing folder")
        if not os.path.isfile(full):
            raise UserError(f"{command}: {flag} {path} is not a regular file (a FIFO, socket or device); "
                            "name a regular file")
    # The folder that will receive new entries: the output folder itself, or the file's folder.
    holder = full if want == "folder" else os.path.dirname(full)
    while not os.path.exists(holder):
        holder = os.path.dirname(holder)
    if not os.path.isdir(holder):
        raise UserError(f"{command}: {flag} {path}: {holder} is a file, so nothing can be created under it; "
                        "choose another path")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise UserError(f"{command}: {flag} {path}: {holder} is not writable; choose a writable place")
    return full


class Terminated(BaseException):
    """SIGTERM arrived before the command installed its own handling (``fit`` does once
    training runs).  A BaseException, like KeyboardInterrupt, so that code skipping
    unreadable files with ``except Exception`` cannot swallow it."""


def _on_sigterm(main_pid: int):
    def handle(signum, frame):
        if os.getpid() != main_pid:
            # A forked DataLoader worker inherited this handler: die by the signal, as before.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()
    return handle


# torch re-raises a worker's exception as ``type(message)`` where the message is
# "Caught UserError in DataLoader worker process 0.\nOriginal Traceback ...\n  File ...
# \ntrain.errors.UserError: <the message>": the user needs only the last part.  Traceback
# lines are indented, so the exception line is the one that starts a line with the name.
_WORKER_EXCEPTION_LINE = re.compile(r"^[\w.]*UserError: (.*)\Z", re.MULTILINE | re.DOTALL)


def user_message(exc: BaseException) -> str:
    """The one-line message of a UserError, also when torch re-raised it from a worker."""
    text = str(exc)
    if text.startswith("Caught ") and "Traceback" in text:
        found = _WORKER_EXCEPTION_LINE.search(text)
        if found:
            return found.group(1).strip()
    return text


# What to do about an OSError, by errno (the OS already says what went wrong).
_OS_FIXES = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EACCES: "choose a place you may write to",
    errno.EPERM: "choose a place you may write to",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "the path is a folder where a file was expected; check the path",
    errno.EEXIST: "something already exists there; choose another path",
    errno.ENOENT: "check that the path exists",
}


def os_error_message(command: str, exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno, "check the path and the free space")
    return f"{command}: cannot use{where}: {exc.strerror or exc}; {fix}"


USAGE = "usage: python -m train {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
    f"  {name:<17} {help_}" for name, (_, help_) in COMMANDS.items())


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        print(f"error: unknown command {name!r}.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # From here on SIGTERM is reported rather than killing the process silently: start-up
    # (importing torch, building the model, listing files) takes seconds to minutes.
    on_main = threading.current_thread() is threading.main_thread()   # signal() works there only
    saved = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid())) if on_main else None
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli_main(rest) or 0)
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # Disk full, a path through a file, no permission: the input (a path) or the place
        # is unusable; outputs are written atomically, so nothing is left half-written.
        print(f"error: {os_error_message(name, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        during = " before training started (nothing was trained)" if name == "fit" else ""
        print(f"error: {name}: stopped by SIGTERM{during}, exit code 143; outputs are written atomically, so "
              "nothing is half-written; run the command again", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, saved)
