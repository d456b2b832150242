"""What a path on the command line names, answered once for ``fit --resume``, ``eval`` and
``migrate --export``.

    python -m train fit --resume RUN_DIR | CKPT | MIGRATED_DIR
    python -m train eval RUN_DIR | CKPT | WEIGHTS.safetensors | MIGRATED_DIR
    python -m train migrate --export RUN_DIR | CKPT | MIGRATED_DIR --out model.ckpt

:func:`locate` recognises

* a **run folder** of ``python -m train fit`` (``checkpoints/last.ckpt``, else
  ``checkpoints/last.safetensors``; its ``checkpoints/`` folder itself is accepted too);
* a **trainer checkpoint** (``last.ckpt``, ``step-N.ckpt``: the resolved config is inside);
* a **migrated folder** of ``python -m train migrate`` (``config.yaml``,
  ``model.safetensors``, optional ``discriminator.safetensors`` and ``train_state.pt``);
* an **upstream** Lightning / taming ``.ckpt`` (any other torch file: it needs
  ``python -m train migrate`` first);
* a bare **weights** file (``.safetensors``, e.g. ``checkpoints/last.safetensors``);

and says what it is (:class:`Source`).  :func:`read_state` reads any of them into the
shape of :func:`train.checkpoint.load_state`'s dict.  Each command then decides which kinds
it can use.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from train.checkpoint import FORMAT, LAST, LAST_WEIGHTS, VERSION, load_migrated, load_state, safetensors_problem
from train.errors import UserError
from train.safe_load import load_safetensors

KINDS = ("run", "checkpoint", "migrated", "upstream", "weights")
CONFIG = "config.yaml"
MIGRATED_WEIGHTS = "model.safetensors"


@dataclass
class Source:
    """What a path names."""

    kind: str                    # one of KINDS
    path: str                    # what the user named
    weights: str                 # the file the weights (and a trainer's state) are read from
    config_path: Optional[str]   # config.yaml next to it (the run's or the migrated folder's), if any
    run_dir: Optional[str]       # the run folder a resumed run keeps writing to (None: a new one)

    @property
    def train_state(self) -> bool:
        """A complete trainer checkpoint: a resume continues it exactly."""
        return self.kind in ("run", "checkpoint") and not self.weights.endswith(".safetensors")

    @property
    def state_path(self) -> str:
        """The file (trainer checkpoint) or folder (migrated) the training state comes from."""
        return self.path if self.kind == "migrated" else self.weights


def _existing(path: Optional[str]) -> Optional[str]:
    return path if path and os.path.isfile(path) else None


def _run_dir_of(file_path: str) -> Optional[str]:
    """The run folder of a file inside its ``checkpoints/`` folder."""
    folder = os.path.dirname(os.path.abspath(file_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def _config_next_to(file_path: str) -> Optional[str]:
    """config.yaml of the folder holding ``file_path``, or of the run folder when it sits in
    checkpoints/."""
    folder = os.path.dirname(os.path.abspath(file_path))
    return _existing(os.path.join(folder, CONFIG)) or \
        (_existing(os.path.join(_run_dir_of(file_path), CONFIG)) if _run_dir_of(file_path) else None)


def is_trainer_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint written by ``python -m train fit``, by its pickle's
    format tag (a look at the small ``data.pkl`` record, nothing unpickled).  The trainer
    writes zip checkpoints only; anything else is taken for an upstream file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            # The trainer's pickle is small (tensors are separate records); a huge one is not ours.
            return bool(records) and records[0].file_size < (64 << 20) and FORMAT.encode() in archive.read(records[0])
    except (OSError, zipfile.BadZipFile):
        return False


def locate(path: str, flag: str) -> Source:
    """What ``path`` names (see the module docstring); ``flag`` is how the command calls the
    argument in messages (``--resume``, ``eval:``, ``--export``).  UserError when it names
    nothing usable."""
    if os.path.isdir(path):
        config = _existing(os.path.join(path, CONFIG))
        for folder in (os.path.join(path, "checkpoints"), path):
            # last.ckpt is written before last.safetensors: it is never the older of the two.
            ckpt = _existing(os.path.join(folder, LAST))
            if ckpt:
                run_dir = path if folder != path else _run_dir_of(ckpt)
                return Source("run", path, ckpt, config or _config_next_to(ckpt), run_dir)
        migrated = _existing(os.path.join(path, MIGRATED_WEIGHTS))
        if migrated:
            return Source("migrated", path, migrated, config, None)
        weights = _existing(os.path.join(path, "checkpoints", LAST_WEIGHTS))
        if weights:
            return Source("run", path, weights, config, path)
        raise UserError(f"{flag} {path} holds no checkpoint (neither checkpoints/{LAST}, "
                        f"checkpoints/{LAST_WEIGHTS} nor {MIGRATED_WEIGHTS}); name a run folder, a checkpoint "
                        "file or a folder written by `python -m train migrate`")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return Source("weights", path, path, _config_next_to(path), _run_dir_of(path))
        kind = "checkpoint" if is_trainer_checkpoint(path) else "upstream"
        run_dir = _run_dir_of(path)
        config = _existing(os.path.join(run_dir, CONFIG)) if run_dir else None
        return Source(kind, path, path, config, run_dir)
    raise UserError(f"{flag} {path}: no such file or folder; name a run folder, a checkpoint file written by "
                    "`python -m train fit`, or a folder written by `python -m train migrate`")


def safetensors_metadata(path: str) -> Dict[str, str]:
    """A weights file's metadata (``{}`` when it has none or cannot be read: reading the
    weights reports bad files)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - see the docstring
        return {}


def safetensors_step(path: str) -> Optional[int]:
    """The ``global_step`` the trainer records in a weights file's metadata, if any."""
    step = safetensors_metadata(path).get("global_step")
    try:
        return int(step) if step is not None else None
    except ValueError:
        return None


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors, checked against the checksums the trainer records
    in its metadata (files without them are read as they are)."""
    tensors = load_safetensors(path)
    problem = safetensors_problem(path, tensors, safetensors_metadata(path))
    if problem:
        ckpt = os.path.join(os.path.dirname(os.path.abspath(path)), LAST)
        other = f"; the full checkpoint {ckpt} holds the same weights" if os.path.isfile(ckpt) else ""
        raise UserError(f"{path} is damaged: {problem}{other}; use an intact copy")
    return tensors


def read_state(source: Source) -> Dict[str, Any]:
    """The source as :func:`train.checkpoint.load_state` returns a trainer checkpoint:
    ``{"model", "loss"?, "global_step", "epoch", "optimizers", "config"?, ...}``.

    Upstream files raise load_state's UserError (it says to run ``migrate`` first); a bare
    weights file gives the model only (``global_step`` from its metadata, or None).
    """
    if source.kind == "migrated":
        return load_migrated(source.path)
    if source.weights.endswith(".safetensors"):
        from train.weight_ema import split_ema

        # a run's last.safetensors holds the weight EMA (train.ema_decay) as model_ema.* keys
        model, ema = split_ema(read_weights(source.weights))
        return {"format": FORMAT, "version": VERSION, "model": model, "model_ema": ema or None,
                "global_step": safetensors_step(source.weights), "epoch": None, "optimizers": {}}
    return load_state(source.weights)


__all__ = ["Source", "KINDS", "locate", "read_state", "read_weights", "is_trainer_checkpoint", "safetensors_step",
           "safetensors_metadata"]
