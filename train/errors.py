"""The one exception type for unusable user input (exit code 2, one clear line)."""


class UserError(Exception):
    """Bad input: a config, checkpoint, image or command-line value the tool cannot use.

    The message names the problem and the fix.  The CLI prints it as one line and exits 2.
    """

    exit_code = 2


class TrainingStopped(Exception):
    """Training cannot go on (e.g. too many non-finite steps).  CLI exit code 1."""

    exit_code = 1


# ----------------------------------------------------------------------------------------
# Findings: what a validation rule reports.  They live in this leaf module because the
# rules live next to what they check (each model type's rules in its adapter, the loss and
# train rules in ``train/validate.py``), and every layer may import this file.

from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Dict, List, Tuple  # noqa: E402

ERROR, WARNING, INFO = "error", "warning", "info"
LEVEL_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}


class _Delete:
    """A ``--fix`` operation value meaning "remove the key"."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


@dataclass
class Finding:
    """One validation finding (pydantic's loc/msg/type, OmegaConf's full_key)."""

    level: str        # error | warning | info
    path: str         # dotted key path in the normalized config
    code: str         # machine-readable code
    message: str
    fix: str = ""
    # operations that --fix applies: (normalized dotted path, new value or DELETE)
    ops: List[Tuple[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self) -> Dict[str, str]:
        return {"level": self.level, "path": self.path, "code": self.code, "message": self.message,
                "fix": self.fix}


def raise_for_errors(findings: List[Finding], what: str) -> None:
    """Turn error findings into one :class:`UserError` (for builders that run the rules).

    ``what`` names the thing being built, e.g. ``"TamingVQGAN model_args"``.
    """
    errors = [f for f in findings if f.level == ERROR]
    if errors:
        raise UserError(f"{what}: " + "; ".join(f"{f.path}: {f.message} (fix: {f.fix})" if f.fix else
                                                f"{f.path}: {f.message}" for f in errors))


# Small helpers the rules share.

def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def near(value: str, choices) -> "str | None":
    """The closest of ``choices`` to ``value`` (difflib, cutoff 0.6), or None."""
    import difflib

    hits = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return hits[0] if hits else None


def coerce_like(value, default):
    """Best-effort conversion of ``value`` to the type of ``default`` (for --fix), or None."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            return None
        if isinstance(default, int):
            f = float(value)
            return int(f) if f == int(f) else None
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def type_finding(out: List[Finding], path: str, value, default, what: str) -> None:
    """A ``bad_type`` error for ``path``, with a --fix that converts the value when it can."""
    fixed = coerce_like(value, default)
    out.append(Finding(ERROR, path, "bad_type", f"{path} is {value!r} ({type(value).__name__}); expected {what}",
                       f"write {path.split('.')[-1]}: {fixed!r}" if fixed is not None else f"write {what}",
                       [(path, fixed)] if fixed is not None else [(path, DELETE)]))
