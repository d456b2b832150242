"""Training-state checkpoints: written atomically, read without running code from the file.

A run folder holds::

    checkpoints/last.ckpt           full training state (below), rewritten every ckpt_every steps
    checkpoints/last.safetensors    model weights only (for eval / export)
    checkpoints/step-N.ckpt         kept copies of the last.ckpt of step N (independent files:
                                    a reflink where the file system can, else a real copy)
    .lock                           held by the run writing the folder (train/run_folder.py)

``last.ckpt`` is a ``torch.save`` dict of plain data and tensors (so torch's weights-only
loader, :func:`train.safe_load.load_weights_file`, reads it)::

    {"format": "vqtok-train-state", "version": 1, "global_step", "epoch",
     "model": model state dict, "loss": {"discriminator.*": ..., and the calculator's
     running state such as LeCAM's "lecam.*" averages} (keys as in calc.state_dict()), "optimizers": {"generator",
     "discriminator"?}, "scalers": {...}, "rng": {python, numpy, torch, cuda},
     "data": {"next_step", "images_per_step", "seed"}, "counters": {...},
     "world_size", "config": resolved YAML text,
     "model_ema"?: {decay, num_updates, shadows} (train.ema_decay), "dead_codes"?: {usage.N},
     "checksums": {"algorithm": "crc32", "tensors": {"model/encoder.conv_in.weight": "1a2b3c4d", ...}}}

``checksums`` (format version 2) covers every tensor in the file, by its path through the
dicts and lists joined with ``/``; ``last.safetensors`` carries the same numbers for its
weights in its metadata (``checksums``: JSON ``{key: crc32}``, ``checksum_algorithm``).
Reading a checkpoint (``fit --resume``, ``eval``, ``migrate --export``) checks the field
types first and then every checksum: a file damaged on disk is refused (exit 2) with a
message naming it, the field or tensor, and the newest intact kept copy to use instead.
Version 1 files (no checksums) are still read, with the type checks only.

Every file is written through :mod:`train.atomic` (a temporary name in the same folder,
fsync'd, then ``os.replace``-d over the old one), so a kill at any moment leaves the
previous ``last`` intact.

``--resume`` also accepts a folder written by ``python -m train migrate``: ``config.yaml``,
``model.safetensors``, optional ``discriminator.safetensors`` (``discriminator.*`` keys)
and ``train_state.pt`` (``{"global_step", "epoch", "optimizer_states": {...}}``).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from adapters.distributed import is_distributed
from adapters.weights import load_model_weights
from train import atomic
from train.errors import TrainingStopped, UserError
from train.weight_ema import PREFIX as EMA_PREFIX
from train.safe_load import UnreadableFile, load_weights_file

FORMAT = "vqtok-train-state"
VERSION = 2            # 2: per-tensor checksums
LAST = "last.ckpt"
LAST_WEIGHTS = "last.safetensors"


# ----------------------------------------------------------------------------------------
# Kept copies

def keep_copy(src: str, dst: str) -> None:
    """``dst`` becomes a kept copy of ``src``: an independent file (a hard link would share
    the bytes, so damage to one would be damage to both), written atomically."""
    atomic.copy_file(src, dst)


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
        "epoch": (run.step * run.images_per_step) // run.data.n_images if run.data.n_images else None,
        "model": run.model.state_dict(),
        "loss": {**({f"discriminator.{k}": v for k, v in run.disc.module.state_dict().items()}
                    if run.disc is not None else {}),
                 # buffers an opt-in loss updates as it trains (LeCAM's averages); {} by default
                 **run.calc.running_state()},
        # use_gan false: there is no discriminator side, so no discriminator optimizer is saved.
        "optimizers": {s.name: s.optimizer.state_dict() for s in sides},
        "scalers": {s.name: s.scaler.state_dict() for s in sides if s.scaler is not None},
        "rng": capture_rng(),
        "data": {"next_step": run.step, "images_per_step": run.images_per_step,
                 "seed": int(run.cfg.train.seed), "n_images": run.data.n_images},
        "counters": {"bad_steps": run.guard.total, "skipped_images": run.skipped_images},
        "world_size": run.world,
        "config": OmegaConf.to_yaml(run.cfg, resolve=True),
        # opt-ins' running state: "model_ema" (train.ema_decay), "dead_codes" (usage); absent when off
        **run.optins.state_dict(),
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
    if run.optins.ema is not None:
        # last.safetensors: the weights and latent-diffusion's model_ema.* buffers beside them
        weights = {**weights, **run.optins.ema.prefixed_state()}
    # Each rank's random state (dropout, Gumbel noise differ per rank), so that a
    # multi-process resume continues every rank's own stream.
    rng = capture_rng()
    rng_per_rank = [None] * run.world
    if is_distributed():
        dist.all_gather_object(rng_per_rank, rng)
    else:
        rng_per_rank = [rng]
    error = None
    if run.is_main:
        try:
            write_checkpoint(folder, training_state(run), rng_per_rank, weights, run.step,
                             str(run.cfg.model_type), keep)
        except UserError as exc:     # disk full, folder gone or unwritable: each file is whole
            error = (f"{exc}; training stopped at step {run.step}, the checkpoints already in {folder} are "
                     "intact; fix this, then continue with `python -m train fit --resume "
                     f"{run.run_dir}`")
    # The others wait for rank 0's verdict, so all ranks stop together rather than waiting
    # in the next collective for a rank 0 that has left.
    if is_distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


def write_checkpoint(folder: str, state: Dict[str, Any], rng_per_rank: List[Any], weights: Dict[str, torch.Tensor],
                     step: int, model_type: str, keep: bool) -> None:
    """``last.ckpt`` (with checksums) and ``last.safetensors``; ``keep`` adds ``step-N.ckpt``."""
    state["rng_per_rank"] = rng_per_rank
    sums = checksums_of(state)
    state["checksums"] = {"algorithm": atomic.CHECKSUM, "tensors": sums}
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise atomic.write_error(folder, exc) from None
    atomic.save_torch(state, os.path.join(folder, LAST))
    # The model tensors' bytes are the same in both files, so are their checksums.
    weight_sums = {k: sums[f"model_ema/{k[len(EMA_PREFIX):]}" if k.startswith(EMA_PREFIX) else f"model/{k}"]
                   for k in weights}
    atomic.save_safetensors(weights, os.path.join(folder, LAST_WEIGHTS),
                            metadata={"global_step": str(step), "model_type": model_type,
                                      "checksum_algorithm": atomic.CHECKSUM, "checksums": json.dumps(weight_sums)})
    if keep:
        keep_copy(os.path.join(folder, LAST), os.path.join(folder, f"step-{step}.ckpt"))


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
    running = {k: v for k, v in (state.get("loss") or {}).items() if not k.startswith("discriminator.")}
    if run.calc.load_running_state(running):
        run.notes.append("the checkpoint has no LeCAM averages (lecam.*): they start fresh")
    unused = sorted(set(running) - set(run.calc.running_state()))
    if unused:
        run.notes.append(f"the checkpoint's loss state {', '.join(unused)} is not used (lecam_weight is 0 now)")

    # model_ema / dead_codes: the trainer hands them to its opt-ins once they are built
    run.restored_optins = {k: state.get(k) for k in ("model_ema", "dead_codes")}

    opts = state.get("optimizers") or {}
    for side in (run.gen, run.disc):
        if side is not None:
            _load_optimizer(side, opts.get(side.name), strict=exact, lr=run.lr, notes=run.notes)
    if run.disc is None and opts.get("discriminator") is not None:
        run.notes.append("use_gan is false: the checkpoint's discriminator optimizer state is not used")
    scalers = state.get("scalers") or {}
    for side in (run.gen, run.disc):
        if side is not None and side.scaler is not None and side.name in scalers:
            try:
                side.scaler.load_state_dict(scalers[side.name])
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{source.state_path}: field scalers.{side.name} is not a grad-scaler state "
                                f"({exc}); resume from another checkpoint") from None

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
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
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
    """Read a ``last.ckpt`` / ``step-N.ckpt`` written by the trainer, checking every field's
    type and every tensor's checksum (see the module docstring)."""
    state = _read_trainer_file(path)
    problem = structure_problem(state) or checksum_problem(path, state)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; {_instead(path)}")
    return state


def _read_trainer_file(path: str) -> Dict[str, Any]:
    try:
        state = load_weights_file(path)
    except UnreadableFile as exc:  # truncated file, wrong format, pickled code
        raise UserError(f"{path}: not a readable training checkpoint ({exc.reason}); {_instead(path)}, or "
                        "convert old files with `python -m train migrate`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a training checkpoint written by `python -m train fit`; "
                        "for a Lightning/taming .ckpt run `python -m train migrate` first and resume "
                        "from its output folder")
    version = state.get("version", 0)
    if not _is_int(version):
        raise UserError(f"{path} is damaged: field version is {_describe(version)}; expected a whole number; "
                        f"{_instead(path)}")
    if version > VERSION:
        raise UserError(f"{path}: written by a newer version of this tool (format {version}); update this "
                        "tool to read it")
    return state


# ---- structure: each field of the state and what it must be -----------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(v) -> str:
    if torch.is_tensor(v):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _int_at_least(low: int) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"a whole number >= {low}"


def _tensor_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def _optimizer_state(v) -> Optional[str]:
    """What is wrong with one optimizer's state_dict, or None."""
    if not isinstance(v, dict) or not isinstance(v.get("state"), dict) or not isinstance(v.get("param_groups"), list):
        return "a dict with 'state' (a dict) and 'param_groups' (a list)"
    for group in v["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or \
                not all(_is_int(i) for i in group["params"]):
            return "param_groups of dicts, each with a 'params' list of whole numbers"
    for key, entry in v["state"].items():
        if not _is_int(key) or not isinstance(entry, dict):
            return "'state' mapping parameter numbers to dicts"
    return None


def _rng_problem(v) -> Optional[str]:
    """What is wrong with one captured RNG state (``"<part>: <what it must hold>"``; an
    empty part for the whole), or None."""
    if not isinstance(v, dict):
        return ": a dict with python, numpy and torch states"
    py = v.get("python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], (list, tuple))
            and len(py[1]) == 625 and all(_is_int(i) for i in py[1]) and (py[2] is None or isinstance(py[2], float))):
        return "python: random.getstate()'s (version, 625 whole numbers, gauss) triple"
    n = v.get("numpy")
    if not (isinstance(n, dict) and isinstance(n.get("name"), str) and torch.is_tensor(n.get("keys"))
            and n["keys"].dtype == torch.int64 and tuple(n["keys"].shape) == (624,) and _is_int(n.get("pos"))
            and _is_int(n.get("has_gauss")) and isinstance(n.get("cached"), float)):
        return "numpy: a dict with name, keys (624 int64), pos, has_gauss, cached"
    t = v.get("torch")
    if not (torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 and
            t.numel() == torch.get_rng_state().numel()):
        return "torch: torch.get_rng_state()'s uint8 tensor"
    cuda = v.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(torch.is_tensor(c) and c.dtype == torch.uint8 for c in cuda)):
        return "cuda: a list of uint8 tensors"
    return None


def _counts(keys: Tuple[str, ...]) -> Tuple[Callable[[Any], bool], str]:
    def ok(v):
        return isinstance(v, dict) and all(_is_int(v[k]) and v[k] >= 0 for k in keys if v.get(k) is not None)
    return ok, f"a dict whose {', '.join(keys)} are whole numbers >= 0"


# field -> (check, what it must be, required); a check returning a string names the sub-field.
_FIELDS: Dict[str, Tuple[Callable[[Any], Any], str, bool]] = {
    "global_step": (*_int_at_least(0), True),
    "epoch": (lambda v: v is None or (_is_int(v) and v >= 0), "a whole number >= 0", False),
    "model": (_tensor_dict, "a dict of parameter names to tensors", True),
    "loss": (lambda v: v is None or _tensor_dict(v), "a dict of discriminator.* names to tensors", False),
    "optimizers": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                   "a dict of side names to optimizer states", False),
    "scalers": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(s, dict) for k, s in v.items()),
                "a dict of side names to grad-scaler states", False),
    "rng": (lambda v: v is None, "an RNG state", False),         # checked by _rng_problem
    "rng_per_rank": (lambda v: v is None or isinstance(v, (list, tuple)), "a list of RNG states", False),
    "data": (*_counts(("next_step", "images_per_step", "seed", "n_images")), False),
    "counters": (*_counts(("bad_steps", "skipped_images")), False),
    "world_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a whole number >= 1", False),
    "config": (lambda v: v is None or isinstance(v, str), "the resolved config as YAML text", False),
    "model_ema": (lambda v: v is None or _tensor_dict(v), "a dict of EMA buffer names to tensors", False),
    "dead_codes": (lambda v: v is None or _tensor_dict(v), "a dict of usage.N names to tensors", False),
    "checksums": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("algorithm"), str) and
                                          isinstance(v.get("tensors"), dict)),
                  "a dict with algorithm and tensors", False),
}


def structure_problem(state: Dict[str, Any]) -> Optional[str]:
    """The first field of a trainer state that does not have its expected type, as
    ``field X is <value>; expected <what>``; None when all fit."""
    for name, (check, what, required) in _FIELDS.items():
        if name not in state:
            if required:
                return f"field {name} is missing"
            continue
        value = state[name]
        if name == "rng":
            sub = _rng_problem(value) if value is not None else None
            if sub:
                return _rng_message("rng", value, sub)
            continue
        if not check(value):
            return f"field {name} is {_describe(value)}; expected {what}"
    for side, opt in (state.get("optimizers") or {}).items():
        if opt is not None:
            sub = _optimizer_state(opt)
            if sub:
                return f"field optimizers.{side} is not an optimizer state; expected {sub}"
    for i, rng in enumerate(state.get("rng_per_rank") or []):
        sub = _rng_problem(rng) if rng is not None else None
        if sub:
            return _rng_message(f"rng_per_rank[{i}]", rng, sub)
    return None


def _rng_message(field: str, value, problem: str) -> str:
    part, what = problem.split(": ", 1)
    if not part:
        return f"field {field} is {_describe(value)}; expected {what}"
    return f"field {field}.{part} does not hold {what}"


# ---- checksums ---------------------------------------------------------------------------

def tensors_in(state: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in a state, paths joined with ``/`` (the
    ``checksums`` entry itself excluded).  Iterative, each container once."""
    stack: List[Tuple[str, Any]] = [("", state)]
    seen = set()
    while stack:
        path, obj = stack.pop()
        if torch.is_tensor(obj):
            yield path, obj
            continue
        if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if path == "" and key == "checksums":
                continue
            stack.append((f"{path}/{key}" if path else str(key), value))


def checksums_of(state: Dict[str, Any]) -> Dict[str, str]:
    return {path: atomic.tensor_checksum(t) for path, t in tensors_in(state)}


# Files whose checksums matched, by identity and change time: ``fit --resume`` reads its
# checkpoint more than once (config, data path, state) and need not hash it each time.
_VERIFIED: Dict[Tuple, bool] = {}


def _file_key(path: str) -> Optional[Tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def checksum_problem(path: str, state: Dict[str, Any]) -> Optional[str]:
    """Which tensor of ``state`` (read from ``path``) differs from the checksum saved with
    it; None when all match or the file predates checksums (format 1)."""
    sums = state.get("checksums")
    if sums is None:
        return ("field checksums is missing (format 2 checkpoints carry one per tensor)"
                if state.get("version", 1) >= 2 else None)
    if sums["algorithm"] != atomic.CHECKSUM:
        return f"its checksums use {sums['algorithm']!r}; this tool knows {atomic.CHECKSUM!r}"
    key = _file_key(path)
    if key is not None and _VERIFIED.get(key):
        return None
    expected = sums["tensors"]
    found = set()
    for name, tensor in tensors_in(state):
        found.add(name)
        if name not in expected:
            return f"tensor {name} has no saved checksum"
        if atomic.tensor_checksum(tensor) != expected[name]:
            return f"tensor {name} does not match the checksum saved with it (its bytes changed on disk)"
    missing = sorted(set(expected) - found)
    if missing:
        return f"tensor {missing[0]} is missing ({len(missing)} saved tensor(s) absent)"
    if key is not None:
        _VERIFIED[key] = True
    return None


def safetensors_problem(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Optional[str]:
    """Like :func:`checksum_problem` for a ``last.safetensors`` (checksums in its metadata)."""
    text = (metadata or {}).get("checksums")
    if text is None:
        return None
    try:
        expected = json.loads(text)
    except ValueError:
        return "its checksums metadata is not JSON"
    if not isinstance(expected, dict) or metadata.get("checksum_algorithm") != atomic.CHECKSUM:
        return f"its checksums metadata is not a {atomic.CHECKSUM} table"
    for name, tensor in tensors.items():
        if atomic.tensor_checksum(tensor) != expected.get(name):
            return f"tensor {name} does not match the checksum saved with it (its bytes changed on disk)"
    missing = sorted(set(expected) - set(tensors))
    if missing:
        return f"tensor {missing[0]} is missing"
    return None


# ---- what to use instead of a damaged file ------------------------------------------------

_STEP = re.compile(r"^step-(\d+)\.ckpt$")


def _instead(path: str, checked: int = 4) -> str:
    """The fix for a damaged ``path``: the newest intact checkpoint beside it (kept copies
    newest first, and ``last.ckpt`` when ``path`` is a kept copy), checked in full."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    steps = sorted(((int(m.group(1)), n) for n in names for m in [_STEP.match(n)] if m), reverse=True)
    candidates = ([LAST] if LAST in names else []) + [n for _, n in steps]
    for name in candidates[:checked + 1]:
        other = os.path.join(folder, name)
        try:
            if os.path.samefile(other, path):
                continue
            state = _read_trainer_file(other)
            if structure_problem(state) is None and checksum_problem(other, state) is None:
                return (f"use the last intact checkpoint instead: {other} (e.g. python -m train fit --resume "
                        f"{other})")
        except (UserError, OSError):
            continue
    return "no intact checkpoint is beside it; resume from another copy of the run or start a new run"


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
        try:
            extra = load_weights_file(train_state)
        except UnreadableFile as exc:
            raise UserError(f"{train_state}: not readable ({exc.reason}); re-run `python -m train migrate`") from None
        if not isinstance(extra, dict):
            raise UserError(f"{train_state}: expected a dict with global_step, epoch, optimizer_states; "
                            "re-run `python -m train migrate`")
        state["global_step"] = extra.get("global_step") or 0
        state["epoch"] = extra.get("epoch") or 0
        state["optimizers"] = extra.get("optimizer_states") or {}
        problem = structure_problem(state)
        if problem:
            raise UserError(f"{train_state}: {problem.replace('optimizers', 'optimizer_states')}; "
                            "re-run `python -m train migrate`")
    return state


__all__ = ["keep_copy", "capture_rng", "restore_rng", "load_state", "load_migrated",
           "write_checkpoint", "structure_problem", "checksum_problem", "safetensors_problem", "checksums_of",
           "FORMAT", "VERSION", "LAST", "LAST_WEIGHTS"]
