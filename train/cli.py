"""Command line: ``python -m train validate|fit|migrate|eval|extract-features ...``.

Each command lives in its own module and exposes ``cli_main(argv) -> int``.  Exit codes:
0 ok, 1 problems found in valid input, 2 unusable input (one clear line, no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from train.errors import UserError

COMMANDS = {
    "validate": ("train.validate", "check configs and print every finding with its fix"),
    "fit": ("train.fit", "train a model from a config"),
    "migrate": ("train.migrate", "convert a legacy config and checkpoint into this tool"),
    "eval": ("train.evaluate", "reconstruction metrics of a checkpoint on a data set"),
    "extract-features": ("train.features", "cache DINO teacher features for DinoVQ"),
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
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.cli_main(rest) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
