"""Training-state checkpoints: written atomically, read without running code from the file.

A run folder holds::

    checkpoints/last.ckpt           full training state (below), rewritten every ckpt_every steps
    checkpoints/last.safetensors    model weights only (for eval / export)
    checkpoints/step-N.ckpt         kept copies (hard links to the last.ckpt of step N)

``last.ckpt`` is a ``torch.save`` dict of plain data and tensors (so torch's weights-only
loader, :func:`train.safe_load.load_weights_file`, reads it)::

    {"format": "vqtok-train-state", "version": 1, "global_step", "epoch",
     "model": model state dict, "loss": {"discriminator.*": ...} (the LossCalculator's
     trainable state, keys as in calc.state_dict()), "optimizers": {"generator",
     "discriminator"?}, "scalers": {...}, "rng": {python, numpy, torch, cuda},
     "data": {"next_step", "images_per_step", "seed"}, "counters": {...},
     "world_size", "config": resolved YAML text}

Every file is written through :mod:`train.atomic` (a temporary name in the same folder,
fsync'd, then ``os.replace``-d over the old one), so a kill at any moment leaves the
previous ``last`` intact.

``--resume`` also accepts a folder written by ``python -m train migrate``: ``config.yaml``,
``model.safetensors``, optional ``discriminator.safetensors`` (``discriminator.*`` keys)
and ``train_state.pt`` (``{"global_step", "epoch", "optimizer_states": {...}}``).
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from train.errors import UserError
from train.safe_load import UnreadableFile, load_weights_file

FORMAT = "vqtok-train-state"
VERSION = 1
LAST = "last.ckpt"
LAST_WEIGHTS = "last.safetensors"


# ----------------------------------------------------------------------------------------
# Kept copies

def keep_copy(src: str, dst: str) -> None:
    """``dst`` becomes a kept copy of ``src`` (a hard link: free, and later replacements of
    ``src`` by ``os.replace`` leave it untouched); a real copy where links are impossible."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------------------
# RNG state as plain data (weights_only-loadable: no numpy objects)

def capture_rng() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuple(value):
    # The weights-only loader may hand tuples back as lists; random.setstate needs tuples throughout.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------
# Reading

def load_state(path: str) -> Dict[str, Any]:
    """Read a ``last.ckpt`` / ``step-N.ckpt`` written by the trainer."""
    try:
        state = load_weights_file(path)
    except UnreadableFile as exc:  # truncated file, wrong format, pickled code
        raise UserError(f"{path}: not a readable training checkpoint ({exc.reason}); resume from another "
                        "checkpoint (e.g. checkpoints/step-N.ckpt) or convert old files with "
                        "`python -m train migrate`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a training checkpoint written by `python -m train fit`; "
                        "for a Lightning/taming .ckpt run `python -m train migrate` first and resume "
                        "from its output folder")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{path}: written by a newer version of this tool (format {state['version']})")
    return state


def load_migrated(folder: str) -> Dict[str, Any]:
    """A ``python -m train migrate`` output folder -> a state dict shaped like ``load_state``'s.

    Missing RNG / data / scaler entries mean "start those fresh".
    """
    from safetensors.torch import load_file

    weights = os.path.join(folder, "model.safetensors")
    try:
        model = load_file(weights, device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{weights}: not a readable safetensors file ({exc}); re-run `python -m train "
                        "migrate`") from None
    state: Dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": model, "global_step": 0,
                             "epoch": 0, "optimizers": {}, "migrated_from": folder}
    disc = os.path.join(folder, "discriminator.safetensors")
    if os.path.isfile(disc):
        try:
            state["loss"] = load_file(disc, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{disc}: not a readable safetensors file ({exc})") from None
    train_state = os.path.join(folder, "train_state.pt")
    if os.path.isfile(train_state):
        extra = load_weights_file(train_state)
        if not isinstance(extra, dict):
            raise UserError(f"{train_state}: expected a dict with global_step, epoch, optimizer_states")
        state["global_step"] = int(extra.get("global_step") or 0)
        state["epoch"] = int(extra.get("epoch") or 0)
        state["optimizers"] = dict(extra.get("optimizer_states") or {})
    return state


def config_from_state(state: Dict[str, Any]):
    """The resolved config stored inside a checkpoint, as a typed config (or None)."""
    text = state.get("config")
    if not text:
        return None
    import yaml

    from train.config import config_from_dict

    return config_from_dict(yaml.safe_load(text))


__all__ = ["keep_copy", "capture_rng", "restore_rng", "load_state", "load_migrated", "config_from_state",
           "FORMAT", "VERSION", "LAST", "LAST_WEIGHTS"]
