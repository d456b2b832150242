"""The one way a command gets its config: load, normalise, apply overrides, validate, type.

Every entry point (``fit``, ``fit --resume``, ``eval``, ``demo``, ``extract-features``,
``migrate``) calls :func:`load_run_config` with a config file, or
:func:`load_stored_config` with the resolved config a run recorded (``config.yaml`` text
inside a checkpoint).  Both run the same rules as ``python -m train validate``; any error
stops here, all errors at once, each with its fix::

    run = load_run_config("configs/legacy/taming_emavq_nogan.json", ["train.max_steps=100"])
    run.cfg            # the typed ExperimentConfig (DictConfig)
    run.findings       # every finding, warnings and notes included
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from train.config import (ConfigFileError, Normalized, apply_overrides, canonicalize, load_yaml_text, normalize,
                          normalize_document, to_structured)
from train.errors import ERROR, Finding, UserError
from train.validate import collect


@dataclass
class RunConfig:
    cfg: DictConfig
    findings: List[Finding] = field(default_factory=list)
    origin: str = ""


# What a command builds decides which findings stop it: ``eval``, ``encode`` and ``decode``
# build the model only, so a loss or training setting they never use does not stop them.
SCOPES = {"train": None, "model": ("model_type", "model_variant", "model_args", "data")}
# Training-crop findings that a model-only command checks itself on its own images: eval
# compares each reconstruction's size with its input and names both sizes.
TRAINING_ONLY = ("crop_not_divisible",)


def _checked(norm: Normalized, overrides: Sequence[str], origin: str, fix_hint: Optional[str],
             scope: str = "train") -> RunConfig:
    if overrides:
        norm.data = apply_overrides(norm.data, overrides)
    findings = collect(norm)
    heads = SCOPES[scope]
    errors = [f for f in findings if f.level == ERROR and (heads is None or (
        f.path.split(".")[0] in heads and f.code not in TRAINING_ONLY))]
    if errors:
        lines = "; ".join(f"{f.path}: {f.message} (fix: {f.fix})" for f in errors)
        hint = f". {fix_hint}" if fix_hint else ""
        raise UserError(f"{origin}: {len(errors)} config error(s): {lines}{hint}")
    return RunConfig(to_structured(canonicalize(norm.data)), findings, origin)


def load_run_config(path: str, overrides: Sequence[str] = (), scope: str = "train") -> RunConfig:
    """A config file + ``key=value`` overrides -> a checked, typed config.

    ``scope="model"`` (commands that only build the model) stops on model and data errors
    only; every finding is still returned.

    Unusable files raise ``ConfigFileError``; any validation error raises ``UserError``
    (exit 2) listing each error and its fix, e.g. the ``vqvae2`` + ``EMAVQ`` mismatch,
    instead of training the wrong model.
    """
    return _checked(normalize(path), overrides, path,
                    f"`python -m train validate {path} --fix OUT` writes a corrected copy", scope)


def load_stored_config(text: str, origin: str, overrides: Sequence[str] = (), scope: str = "train") -> RunConfig:
    """The resolved config a run recorded (YAML text) + overrides -> a checked, typed config."""
    try:
        # The bounded reader config files use: a checkpoint's text is input like any other.
        doc, duplicates = load_yaml_text(text, origin)
    except ConfigFileError as exc:
        raise UserError(f"{origin}: the stored config is not readable ({exc})") from None
    norm = normalize_document(doc, origin, keep_source=True)
    norm.duplicates = duplicates
    return _checked(norm, overrides, origin, None, scope)


__all__ = ["RunConfig", "load_run_config", "load_stored_config"]
