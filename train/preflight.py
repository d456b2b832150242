"""Preflight cost of a config: sizes, latent grid, attention positions and peak memory of
one training step, worked out without allocating the networks.

    python -m train validate configs/taming/custom_vqgan.yaml --memory-budget 24GiB
    python -m train validate configs/taming/custom_vqgan.yaml --json      # the "cost" object

How the estimate is made: the model, its loss (with the discriminator and LPIPS' VGG trunk)
and the batch hook's network (DinoVQ's teacher) are built on the meta device (shapes and
dtypes, no memory).  One training step is then *run* on meta tensors, the way ``fit`` runs
it (generator step and backward, discriminator step and backward, at a step where the GAN
term is on), under a ``TorchDispatchMode`` that keeps the byte count of every storage alive
and its maximum.  Storages die when their last tensor does (autograd's saved tensors
included), so the maximum is the step's peak of live tensor bytes: weights and buffers,
gradients, Adam's two moments (present in every step after the first), the activations
saved for backward and the temporaries of the op running at the peak; the optimizer steps
add their temporaries at the end.  Attention costs follow from the kernel that runs:
upstream's ``AttnBlock`` materialises (B, HW, HW) scores and their softmax; SDPA runs the
fused kernel (on meta, the CPU flash kernel's shapes: output and log-sum-exp).  bf16 applies
autocast's casting rules (:class:`_MetaAutocast`; fp16 on a GPU has the same sizes).  Not
counted: kernel workspaces (cuDNN, oneDNN), the CUDA context and allocator caching, the
data loader.  The live-tensor accounting follows what PyTorch's own memory tracker
(``torch.distributed._tools.mem_tracker``) does with weak references to storages; the
code here is written for this tool.

``fit`` prints :func:`summary_line` before the first step.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from train.errors import UserError

# Precisions the estimate covers; fp16 (GPU) holds the same sizes as bf16.
PRECISIONS = ("fp32", "bf16")
# How far past disc_start to look for a step where the discriminator is updated.
_GAN_STEP_SEARCH = 64

_UNITS = {"": None, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_budget(text: str) -> int:
    """``--memory-budget`` text (``24GiB``, ``500MB``, ``1.5T``) -> bytes; UserError otherwise.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB (and bare K/M/G/T) powers of 1024.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UserError(f"--memory-budget {text!r} is not a memory size; write a number and a unit, "
                        "e.g. --memory-budget 24GiB or 500MB")
    if _UNITS[unit] is None:
        raise UserError(f"--memory-budget {text!r} has no unit; write e.g. {match.group(1)}GiB or "
                        f"{match.group(1)}MB")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise UserError(f"--memory-budget {text!r} must be more than 0 bytes; write e.g. 24GiB")
    return int(value)


def default_budget() -> Tuple[int, str]:
    """``(bytes, where from)``: the visible GPU's memory, else this machine's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"memory of the visible GPU ({props.name})"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    return int(ram), "this machine's RAM (no GPU visible)"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10 ** 4 else str(n)


@dataclass
class Cost:
    """What one training step of a config costs (see the module docstring)."""

    batch_size: int
    image_size: int
    precision: str                          # the config's train.precision
    generator_params: int                   # trained by the generator optimizer
    discriminator_params: Optional[int]     # None: no discriminator optimizer
    frozen_params: int                      # everything else on the device (EMA codebooks, LPIPS, teacher)
    state_bytes: int                        # weights + buffers + gradients + Adam moments (fp32)
    codebooks: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)   # (name, grid)
    attention: List[Tuple[str, int, str]] = field(default_factory=list)       # (layer, positions, kernel)
    peak: Dict[str, int] = field(default_factory=dict)                        # precision -> bytes
    seconds: float = 0.0

    @property
    def budget_precision(self) -> str:
        """The estimate a budget is held against: the configured precision's (fp16 as bf16)."""
        return "fp32" if self.precision == "fp32" else "bf16"

    def as_dict(self) -> Dict[str, Any]:
        return {"batch_size": self.batch_size, "image_size": self.image_size,
                "generator_params": self.generator_params, "discriminator_params": self.discriminator_params,
                "frozen_params": self.frozen_params,
                "latent_grid": {name: list(grid) for name, grid in self.codebooks},
                "attention": [{"layer": layer, "positions": n, "kernel": kernel}
                              for layer, n, kernel in self.attention],
                "peak_bytes": dict(self.peak), "state_bytes": self.state_bytes,
                "precision": self.precision}


# ----------------------------------------------------------------------------------------
# Counting live storages

class _LiveBytes:
    """A ``TorchDispatchMode`` (built lazily: torch is imported on first use) that counts the
    bytes of every storage an op returns until the storage dies, and keeps the maximum."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten.bincount.default:
                    # Its length depends on the values; codebook counts always pass minlength.
                    length = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
                    out = torch.zeros(length, dtype=torch.int64 if len(args) < 2 or args[1] is None
                                      else args[1].dtype, device=args[0].device)
                else:
                    out = owner.call(func, args, kwargs)
                if owner.record_ops:
                    owner.ops.append((str(func), tuple(getattr(out, "shape", ()))))
                for t in tree_flatten(out)[0]:
                    owner.add(t)
                return out

        self.mode = Mode()
        self.flatten = tree_flatten
        self.outputs: Dict[Any, Any] = {}
        self.live: Dict[int, Tuple[int, Any]] = {}
        self.current = 0
        self.peak = 0
        # (op name, output shape) of the ops inside an attention layer (the probe reads them).
        self.ops: List[Tuple[str, Tuple[int, ...]]] = []
        self.record_ops = False

    def call(self, func, args, kwargs):
        """``func`` on meta tensors, its output shapes remembered: many of torch's meta
        kernels are Python (group norm and its backward take milliseconds each), and a
        network repeats the same op on the same shapes block after block.  Only ops that
        neither alias nor mutate their inputs are remembered (as FakeTensorMode's cache)."""
        import torch

        key = self._key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        if key not in self.outputs:
            out = func(*args, **kwargs)
            leaves, spec = self.flatten(out)
            if not all(isinstance(t, torch.Tensor) for t in leaves):
                self.outputs[key] = None
                return out
            # The storage's own size too: some kernels return a view of a larger buffer.
            self.outputs[key] = ([(t.shape, t.stride(), t.storage_offset(), t.dtype,
                                   t.untyped_storage().nbytes() // t.element_size()) for t in leaves], spec)
            return out
        if self.outputs[key] is None:
            return func(*args, **kwargs)
        metas, spec = self.outputs[key]
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten([torch.empty(numel, dtype=dtype, device="meta").as_strided(shape, stride, offset)
                               for shape, stride, offset, dtype, numel in metas], spec)

    def _key(self, func, args, kwargs):
        import torch

        schema = func._schema
        if func.is_view or any(a.alias_info is not None for a in schema.arguments) or \
                any(r.alias_info is not None for r in schema.returns) or schema.is_mutable:
            return None
        parts = [func]
        for leaf in self.flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor):
                if leaf.device.type != "meta":
                    return None
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
            elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device,
                                                   torch.layout, torch.memory_format)):
                parts.append((type(leaf), leaf))
            else:
                return None
        return tuple(parts)

    def add(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = (size, weakref.ref(storage, lambda _ref, key=key: self._free(key)))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.current -= size


# ----------------------------------------------------------------------------------------
# Building the step's networks without memory

@contextlib.contextmanager
def _quiet():
    """The builders' warnings (random VGG / teacher stand-ins, use_gan notes) and prints are
    about a real run, not about this estimate."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _estimate_config(cfg):
    """A copy of ``cfg`` that builds the same networks without reading weight files: no
    ``ckpt_path``, a random VGG trunk / teacher (same shapes), teacher features computed
    online (the largest case: a feature cache needs no teacher)."""
    from omegaconf import OmegaConf

    from train.schema import config_data

    cfg = OmegaConf.create(config_data(cfg))
    if cfg.model_args is not None:
        cfg.model_args.pop("ckpt_path", None)
    cfg.train.vgg_ckpt_path = None
    cfg.train.allow_random_vgg = True
    cfg.teacher.ckpt_path = None
    cfg.teacher.allow_random = True
    cfg.data.feature_cache = None
    return cfg


def _build_meta(cfg):
    """``(model, calc, hook, modules)`` built on the meta device (shapes, no memory)."""
    import torch
    from torch import nn

    from adapters import build_model
    from adapters.registry import get_model_type
    from losses import LossCalculator

    with _quiet(), torch.device("meta"):
        model = build_model(cfg)
        calc = LossCalculator.from_config(cfg)
        spec = get_model_type(cfg.model_type)
        hook = spec.batch_hook(cfg, None) if spec.batch_hook is not None else None
    modules = [model, calc]
    if hook is not None and isinstance(getattr(hook, "source", None), nn.Module):
        modules.append(hook.source)
    for module in modules:
        # Constants built with the legacy constructor (LPIPS' shift and scale) ignore the
        # device context; on meta they cost nothing either.
        module.to(torch.device("meta"))
    return model, calc, hook, modules


# torch.autocast's casting rules (the CUDA op lists of the autocast docs, "CUDA Ops that can
# autocast to float16" and "... to float32"), by function name.  The meta device has no
# autocast of its own, so _MetaAutocast applies them above autograd, where autocast sits:
# the casts it makes are recorded and saved for backward as autocast's are.
# (CUDA's lists, not CPU's: bf16 training runs on GPUs, and there GroupNorm / LayerNorm run
# in float32, so a GroupNorm-heavy network saves little memory in bf16.)
_LOW_PRECISION_OPS = frozenset((
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "einsum", "prelu",
    "scaled_dot_product_attention"))
_FP32_OPS = frozenset((
    "group_norm", "layer_norm", "softmax", "log_softmax", "norm", "normalize", "cosine_similarity",
    "mse_loss", "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "cross_entropy", "pow",
    "__pow__", "exp", "log", "log1p", "rsqrt", "reciprocal", "cumsum", "cumprod", "softplus", "sum", "prod",
    "cdist", "dist"))


class _MetaAutocast:
    """A ``TorchFunctionMode`` for the step on meta tensors: SDPA runs the fused CPU flash
    kernel (saved: output and log-sum-exp, as the fused CUDA kernels save) instead of the
    math fallback the meta device would take; while CPU autocast is on (it is the flag the
    model's own ``torch.autocast(..., enabled=False)`` regions turn off), autocast's casts,
    with its per-region cache of cast weights."""

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._pytree import tree_map

        cache: Dict[int, Any] = {}

        def cast(t, to):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != to):
                return t
            if t.is_leaf and t.requires_grad:        # weights: cast once per region, as autocast does
                key = (id(t), to)
                if key not in cache:
                    cache[key] = (t, t.to(to))
                return cache[key][1]
            return t.to(to)

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
                if dtype is not None and name in _LOW_PRECISION_OPS:
                    args, kwargs = tree_map(lambda t: cast(t, dtype), (args, kwargs))
                elif dtype is not None and name in _FP32_OPS:
                    args, kwargs = tree_map(lambda t: cast(t, torch.float32), (args, kwargs))
                if name == "scaled_dot_product_attention" and kwargs.get("attn_mask") is None \
                        and len(args) == 3 and not kwargs.get("enable_gqa"):
                    q, k, v = args
                    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        q, k, v, float(kwargs.get("dropout_p", 0.0)), bool(kwargs.get("is_causal", False)),
                        scale=kwargs.get("scale"))
                    return out
                return func(*args, **kwargs)

        self.mode, self.cache = Mode(), cache

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        # Leaving the region drops the cast weights, as autocast's own cache does.
        self.cache.clear()
        return self.mode.__exit__(*exc)


@contextlib.contextmanager
def _autocast_on_meta(dtype):
    """CPU autocast's state for the simulated step (``dtype`` None: off).  The models and
    losses ask autocast about ``x.device.type``, "meta", which autocast refuses: while the
    step runs, ``torch.autocast``, ``torch.is_autocast_enabled`` and
    ``torch.get_autocast_dtype`` read "meta" as "cpu" (restored after, as
    losses/perceptual.py swaps taming's names while it builds)."""
    import torch

    def as_cpu(device_type):
        return "cpu" if device_type in ("meta", torch.device("meta")) else device_type

    real = (torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype)

    class MetaAsCpu(real[0]):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__(as_cpu(device_type), *args, **kwargs)

    torch.autocast = MetaAsCpu
    torch.is_autocast_enabled = lambda *device: real[1](*map(as_cpu, device))
    torch.get_autocast_dtype = lambda device: real[2](as_cpu(device))
    try:
        with real[0]("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            yield
    finally:
        torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype = real


def _gan_step(calc, has_disc: bool) -> int:
    """A global step at which the GAN term and the discriminator update both run (the
    costliest kind), or 0 when there is no discriminator update."""
    if not has_disc:
        return 0
    start = max(0, int(getattr(calc, "disc_start", 0) or 0))
    for step in range(start, start + _GAN_STEP_SEARCH):
        if calc.should_update_discriminator(step):
            return step
    return start


def _storages(modules, optimizers) -> List[Any]:
    import torch

    found = []
    for module in modules:
        found += [t for t in module.parameters()] + [t for t in module.buffers()]
    for opt in optimizers:
        for state in opt.state.values():
            found += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return found


# Output shapes of meta ops by input shapes (see _LiveBytes.call), kept between estimates.
_SHAPE_CACHE: Dict[Any, Any] = {}


class _AttentionProbe:
    """Forward hooks on the model's attention layers: positions each one attends over, and
    whether the step ran SDPA or materialised the (positions x positions) scores."""

    def __init__(self, model, counter: _LiveBytes):
        self.counter, self.found, self.handles = counter, [], []
        names = [(name, m) for name, m in model.named_modules()
                 if type(m).__name__.endswith(("Attention", "AttnBlock")) or type(m).__name__ == "MultiheadAttention"]
        outer = [(n, m) for n, m in names if not any(n.startswith(o + ".") for o, _ in names if o != n)]
        for name, module in outer:
            self.handles.append(module.register_forward_pre_hook(self._before))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._after(name, a)))

    def _before(self, module, args) -> None:
        self.counter.ops.clear()
        self.counter.record_ops = True

    def _after(self, name: str, args) -> None:
        x = args[0]
        positions = x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1]
        kernel = "other"
        for op, shape in self.counter.ops:
            if "scaled_dot_product" in op:
                kernel = "sdpa"
                break
            if len(shape) >= 2 and shape[-2:] == (positions, positions):
                kernel = "scores"
        self.counter.ops.clear()
        self.counter.record_ops = False
        if not any(layer == name for layer, _, _ in self.found):
            self.found.append((name, int(positions), kernel))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run_step(cfg, precision: str, probe_attention: bool):
    """One simulated training step: its peak bytes, the meta networks and optimizer sides,
    the code grids and (``probe_attention``) the attention layers."""
    import torch

    from train.sides import make_sides

    model, calc, hook, modules = _build_meta(cfg)
    meta = torch.device("meta")
    with _quiet():
        gen, disc = make_sides(model, calc, cfg.train, 1e-4, "fp32")
        sides = [s for s in (gen, disc) if s is not None]
        # Adam's moments exist in every step after the first: create them as its first step
        # does (the optimizer steps themselves are accounted for in estimate()).
        for side in sides:
            for p in side.params:
                side.optimizer.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        counter = _LiveBytes()
        for t in _storages(modules, [s.optimizer for s in sides]):
            counter.add(t)
        probe = _AttentionProbe(model, counter) if probe_attention else None
        step = _gan_step(calc, disc is not None)
        model.train()
        calc.train()
        dtype = torch.bfloat16 if precision == "bf16" else None
        counter.outputs = _SHAPE_CACHE
        # Tensors held only by reference cycles would die whenever the cyclic collector
        # happens to run: collect first, then keep it off, so the count is the same in
        # every process.
        gc.collect()
        gc.disable()
        with counter.mode, contextlib.ExitStack() as after:
            after.callback(gc.enable)
            model.before_step(step)
            batch_size, size = int(cfg.train.batch_size), int(cfg.data.image_size)
            batch = {"image": torch.empty(batch_size, 3, size, size, device=meta),
                     "skipped": torch.zeros(batch_size, device=meta), "path": [""] * batch_size,
                     "file_index": torch.zeros(batch_size, dtype=torch.long, device=meta)}
            if hook is not None:
                batch = hook(batch, step)
            with _autocast_on_meta(dtype), _MetaAutocast():
                out = calc.generator_step(model, batch, step)
            gen.backward(out.loss)
            codes = [tuple(c.shape[1:]) for c in out.codes]
            if disc is not None and calc.should_update_discriminator(step):
                with _autocast_on_meta(dtype), _MetaAutocast():
                    d_loss, _ = calc.discriminator_step(out, step)
                disc.backward(d_loss)
                del d_loss
            del out, batch
        if probe is not None:
            probe.close()
    # The optimizer steps come last: everything still alive (weights, buffers, gradients,
    # moments) plus the single-tensor Adam's temporaries, two of the largest parameter's size.
    largest = max((p.numel() * p.element_size() for s in sides for p in s.params), default=0)
    peak = max(counter.peak, counter.current + 2 * largest)
    return {"peak": peak, "modules": modules, "sides": sides, "codes": codes, "model": model,
            "attention": probe.found if probe is not None else []}


def estimate(cfg, precisions: Tuple[str, ...] = PRECISIONS) -> Cost:
    """The :class:`Cost` of one training step of a typed config (``ExperimentConfig``), with
    the peak for each of ``precisions`` (the first one also probes the attention layers).

    Raises ``UserError`` naming the reason when a network cannot be built or run without
    memory (a model whose forward needs real values)."""
    import random

    import numpy as np
    import torch

    started = time.perf_counter()
    cfg = _estimate_config(cfg)
    runs: Dict[str, Dict[str, Any]] = {}
    # Building draws initial weights (on meta) and random crops; fit prints the estimate
    # between its seeding and its first step, so no random state may move.
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            for precision in precisions:
                runs[precision] = _run_step(cfg, precision, not runs)
    except UserError:
        raise
    except Exception as exc:   # an op that needs real data, a module that cannot run on meta
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"the memory estimate could not run this model without allocating it "
                        f"({type(exc).__name__}: {reason})") from None
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    run = runs[precisions[0]]
    model, sides, codes = run["model"], run["sides"], run["codes"]
    gen, disc = sides[0], (sides[1] if len(sides) > 1 else None)
    trained = {id(p) for s in sides for p in s.params}
    tensors = {id(t): t for m in run["modules"] for t in m.parameters()}
    frozen = sum(t.numel() for i, t in tensors.items() if i not in trained)
    state = sum(t.numel() * t.element_size() for m in run["modules"] for t in list(m.parameters()) + list(m.buffers()))
    state += sum(3 * p.numel() * p.element_size() for s in sides for p in s.params)
    names = list(getattr(model, "codebook_names", ())) or [f"codebook{i}" for i in range(len(codes))]
    return Cost(batch_size=int(cfg.train.batch_size), image_size=int(cfg.data.image_size),
                precision=str(cfg.train.precision),
                generator_params=sum(p.numel() for p in gen.params),
                discriminator_params=sum(p.numel() for p in disc.params) if disc is not None else None,
                frozen_params=frozen, state_bytes=state,
                codebooks=list(zip(names, codes)), attention=run["attention"],
                peak={p: r["peak"] for p, r in runs.items()},
                seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------
# Reporting

def _attention_text(attention: List[Tuple[str, int, str]]) -> str:
    if not attention:
        return "none"
    groups: Dict[Tuple[int, str], List[str]] = {}
    for layer, positions, kernel in attention:
        groups.setdefault((positions, kernel), []).append(layer)
    kernels = {"sdpa": "sdpa", "scores": "scores materialised", "other": "no score matrix"}
    parts = []
    for (positions, kernel), layers in sorted(groups.items(), key=lambda g: -g[0][0]):
        shown = ", ".join(layers[:3]) + (f", +{len(layers) - 3} more" if len(layers) > 3 else "")
        parts.append(f"{positions} positions x {len(layers)} layer(s) ({kernels[kernel]}: {shown})")
    return "; ".join(parts)


def cost_lines(cost: Cost, budget: Optional[Tuple[int, str]]) -> List[str]:
    """The ``cost`` block of ``validate``'s text output (indented by the caller)."""
    disc = (f"discriminator {format_count(cost.discriminator_params)}" if cost.discriminator_params is not None
            else "no discriminator optimizer")
    grids = ", ".join(f"{name} {'x'.join(map(str, grid))}" for name, grid in cost.codebooks) or "none"
    peaks = ", ".join(f"{p} {format_bytes(cost.peak[p])}" for p in PRECISIONS)
    lines = [f"cost (one training step: batch {cost.batch_size} x {cost.image_size} px crops; estimated "
             "without allocating)",
             f"  parameters   generator {format_count(cost.generator_params)}, {disc}, frozen "
             f"{format_count(cost.frozen_params)}",
             f"  latent grid  {grids}",
             f"  attention    {_attention_text(cost.attention)}",
             f"  peak memory  {peaks} (of which weights, gradients and Adam state {format_bytes(cost.state_bytes)})"]
    if budget is not None:
        used = cost.peak[cost.budget_precision]
        verdict = "fits" if used <= budget[0] else "OVER"
        lines.append(f"  budget       {format_bytes(budget[0])} ({budget[1]}): {cost.budget_precision} estimate "
                     f"{format_bytes(used)} {verdict}")
    return lines


def budget_finding(cost: Cost, budget: Tuple[int, str]):
    """A WARNING finding when the configured precision's estimate exceeds the budget."""
    from train.errors import WARNING, Finding

    used = cost.peak[cost.budget_precision]
    if used <= budget[0]:
        return None
    fixes = ["a smaller data.image_size or train.batch_size (with train.accumulate_grad_batches to keep the "
             "images per step)"]
    if cost.precision == "fp32":
        fixes.append(f"train.precision: bf16 (estimate {format_bytes(cost.peak['bf16'])})")
    if any(kernel == "scores" for _, _, kernel in cost.attention):
        fixes.append("model_args.attn_impl: sdpa (no positions x positions score matrix)")
    return Finding(WARNING, "train.batch_size", "memory_over_budget",
                   f"one training step needs about {format_bytes(used)} ({cost.budget_precision}, batch "
                   f"{cost.batch_size} x {cost.image_size} px), more than the budget of {format_bytes(budget[0])} "
                   f"({budget[1]})", "use " + "; or ".join(fixes))


def summary_line(cost: Cost) -> str:
    """``fit``'s one line before the first step."""
    peaks = ", ".join(f"{p} {format_bytes(n)}" for p, n in cost.peak.items())
    largest = max((n for _, n, _ in cost.attention), default=0)
    return (f"estimated peak memory of one step (batch {cost.batch_size} x {cost.image_size} px): {peaks}"
            + (f"; largest attention {largest} positions" if largest else ""))


__all__ = ["Cost", "estimate", "parse_budget", "default_budget", "cost_lines", "budget_finding", "summary_line",
           "format_bytes"]
