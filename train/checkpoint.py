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
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from adapters.distributed import is_distributed
from adapters.weights import load_model_weights
from train import atomic
from train.errors import TrainingStopped, UserError
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# The training state: out of a run (``training_state`` / ``save``) and back into one
# (``restore``).  ``run`` is a ``train.trainer.Trainer``; these read and set its ``model``,
# ``gen`` / ``disc`` sides, ``guard``, ``step``, ``skipped_images``, ``notes``.

def training_state(run) -> Dict[str, Any]:
    """The ``last.ckpt`` dict of ``run`` now (the module docstring lists the fields)."""
    sides = [s for s in (run.gen, run.disc) if s is not None]
    return {
        "format": FORMAT, "version": VERSION,
        "global_step": run.step,
        "epoch": (run.step * run.images_per_step) // max(1, len(run.data.paths)),
        "model": run.model.state_dict(),
        "loss": ({f"discriminator.{k}": v for k, v in run.disc.module.state_dict().items()}
                 if run.disc is not None else {}),
        # use_gan false: there is no discriminator side, so no discriminator optimizer is saved.
        "optimizers": {s.name: s.optimizer.state_dict() for s in sides},
        "scalers": {s.name: s.scaler.state_dict() for s in sides if s.scaler is not None},
        "rng": capture_rng(),
        "data": {"next_step": run.step, "images_per_step": run.images_per_step,
                 "seed": int(run.cfg.train.seed), "n_images": len(run.data.paths)},
        "counters": {"bad_steps": run.guard.total, "skipped_images": run.skipped_images},
        "world_size": run.world,
        "config": OmegaConf.to_yaml(run.cfg, resolve=True),
    }


def save(run, keep: bool = False) -> None:
    """Write ``last.ckpt`` + ``last.safetensors`` (rank 0); ``keep`` adds ``step-N.ckpt``.

    Refuses (``TrainingStopped``) to save weights with NaN / inf in them, keeping the
    previous checkpoint.  A collective under torchrun: every rank calls it.
    """
    if run.run_dir is None:
        return
    folder = os.path.join(run.run_dir, "checkpoints")
    weights = run.model.state_dict()
    # Every rank checks (the weights are identical on all ranks), so all of them stop
    # together instead of the others waiting in the next collective for rank 0.
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        previous = os.path.join(folder, LAST)
        kept = (f"the previous checkpoint {previous} is kept" if os.path.isfile(previous)
                else "no checkpoint was written")
        raise TrainingStopped(f"not saving step {run.step}: non-finite values in {', '.join(broken[:3])}; "
                              f"{kept}")
    # Each rank's random state (dropout, Gumbel noise differ per rank), so that a
    # multi-process resume continues every rank's own stream.
    rng = capture_rng()
    rng_per_rank = [None] * run.world
    if is_distributed():
        dist.all_gather_object(rng_per_rank, rng)
    else:
        rng_per_rank = [rng]
    if not run.is_main:
        return
    state = training_state(run)
    state["rng_per_rank"] = rng_per_rank
    os.makedirs(folder, exist_ok=True)
    atomic.save_torch(state, os.path.join(folder, LAST))
    atomic.save_safetensors(weights, os.path.join(folder, LAST_WEIGHTS),
                            metadata={"global_step": str(run.step), "model_type": str(run.cfg.model_type)})
    if keep:
        keep_copy(os.path.join(folder, LAST), os.path.join(folder, f"step-{run.step}.ckpt"))


def restore(run, source) -> None:
    """Continue ``run`` from a trainer checkpoint (exactly) or a migrated folder (weights,
    step, optimizer states when they fit); ``source`` is what ``--resume`` named."""
    exact = source.train_state
    state = load_state(source.state_path) if exact else load_migrated(source.state_path)
    load_model_weights(run.model, state["model"], source=source.state_path)
    disc_state = {k[len("discriminator."):]: v for k, v in (state.get("loss") or {}).items()
                  if k.startswith("discriminator.")}
    if run.disc is not None:
        if disc_state:
            load_model_weights(run.disc.module, disc_state, source=f"{source.state_path} (discriminator)")
        else:
            run.notes.append("the checkpoint has no discriminator weights: the discriminator starts fresh")
    elif disc_state and run.calc.discriminator is not None:
        # use_gan false now: the loss still holds its (untrained) discriminator; give it the weights.
        load_model_weights(run.calc.discriminator, disc_state, source=f"{source.state_path} (discriminator)")

    opts = state.get("optimizers") or {}
    for side in (run.gen, run.disc):
        if side is not None:
            _load_optimizer(side, opts.get(side.name), strict=exact, lr=run.lr, notes=run.notes)
    if run.disc is None and opts.get("discriminator") is not None:
        run.notes.append("use_gan is false: the checkpoint's discriminator optimizer state is not used")
    scalers = state.get("scalers") or {}
    for side in (run.gen, run.disc):
        if side is not None and side.scaler is not None and side.name in scalers:
            side.scaler.load_state_dict(scalers[side.name])

    run.step = int(state.get("global_step") or 0)
    counters = state.get("counters") or {}
    run.guard.total = int(counters.get("bad_steps", 0))
    run.skipped_images = int(counters.get("skipped_images", 0))
    per_rank = state.get("rng_per_rank") or []
    if exact and len(per_rank) == run.world and per_rank[run.rank]:
        restore_rng(per_rank[run.rank])
    elif exact and state.get("rng"):
        restore_rng(state["rng"])
        if run.world > 1:  # a checkpoint from another process count: distinct streams per rank
            seed_everything(int(run.cfg.train.seed) + 1000 * run.rank + run.step)
    saved_world = state.get("world_size")
    data = state.get("data") or {}
    images_per_step = run.cfg.train.batch_size * run.cfg.train.accumulate_grad_batches * run.world
    if exact and (saved_world not in (None, run.world) or data.get("images_per_step") not in (None, images_per_step)
                  or data.get("seed") not in (None, int(run.cfg.train.seed))):
        run.notes.append("batch size, process count or seed differ from the checkpoint's: training "
                         "continues, but not on exactly the batches an uninterrupted run would see")
    run.resumed_from = source.state_path


def _load_optimizer(side, state, strict: bool, lr: float, notes: List[str]) -> None:
    opt = side.optimizer
    if state is None:
        notes.append(f"no {side.name} optimizer state in the checkpoint: Adam starts fresh")
        return
    try:
        opt.load_state_dict(state)
        # A state that does not match the parameters' shapes would fail on the first step.
        for group in opt.param_groups:
            for p in group["params"]:
                for value in opt.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"state shape {tuple(value.shape)} vs parameter {tuple(p.shape)}")
    except (ValueError, KeyError, RuntimeError) as exc:
        if strict:
            raise UserError(f"the checkpoint's {side.name} optimizer state does not fit this model ({exc}); "
                            "resume with the config the run was trained with") from None
        opt.state.clear()
        notes.append(f"the {side.name} optimizer state does not fit ({exc}): Adam starts fresh")
    # The configured learning rate wins over the saved one (a deliberate change on resume).
    for group in opt.param_groups:
        group["lr"] = lr


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
