"""The training loop: one generator step, then (when due) one discriminator step.

    python -m train fit configs/demo_emavq.json --data builtin --max-steps 100
    torchrun --nproc_per_node=2 -m train fit CONFIG --data /images

One readable loop in the spirit of nanoGPT's ``train.py`` and minGPT's ``trainer.py``; the
GAN bookkeeping follows taming's Lightning module (Esser et al. 2021) and LlamaGen's
``vq_train.py``: two Adam optimizers with betas (0.5, 0.9), the generator's over
``model.generator_parameters()`` (EMA codebooks are updated by EMA, never by Adam), the
discriminator's only when ``use_gan`` is on.  Each iteration::

    for each of accumulate_grad_batches micro-batches:
        out = calc.generator_step(model, batch, step)         # the only generator forward
        backward(out.loss / accumulate)
        if calc.should_update_discriminator(step):
            d_loss = calc.discriminator_step(out, step)       # reuses out.reconstructions
            backward(d_loss / accumulate)
    unscale (fp16) -> clip -> optimizer step, for each network

The model and family details live behind ``LossCalculator`` (``losses/calculator.py``), so
this file never asks which model it trains.  Extension point: ``batch_augmenter(batch,
step) -> batch`` runs on every micro-batch on the device before the generator step (e.g. to
add ``batch["dino_features"]`` computed elsewhere).

Non-finite losses or gradients skip the whole step (no weight changes; buffers the forward
changed, such as EMA codebooks, are put back) and are counted;
``max_bad_steps`` in a row stop the run with a message.  SIGTERM / SIGINT finish the step,
save ``last`` and return normally.  Under torchrun every decision that changes control
flow (bad step, stop request) is agreed on by all ranks first, so no rank waits forever.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from adapters.distributed import is_distributed, rank as dist_rank, world_size as dist_world
from train import atomic, checkpoint as ckpt
from train.data import DataSpec, make_loader, steps_for_epochs
from train.errors import UserError
from train.logger import RunLogger
from train.sources import Source

PRECISIONS = ("fp32", "bf16", "fp16")
# train.init_codebook_from_data: training crops encoded for the start (more when the codes
# outnumber their encoder outputs), and the most it will ever draw.
CODEBOOK_INIT_CROPS = 64
CODEBOOK_INIT_MAX_CROPS = 4096


class TrainingStopped(Exception):
    """Training cannot go on (e.g. too many non-finite steps).  CLI exit code 1."""

    exit_code = 1


# ----------------------------------------------------------------------------------------
# Small pieces the loop uses

def learning_rate(cfg, world_size: int):
    """``(lr, explanation)``.  taming's rule when only ``base_learning_rate`` is given:
    lr = base_learning_rate x batch_size x accumulate_grad_batches x world size."""
    t = cfg.train
    taming_yaml = cfg.source.format == "taming_yaml" and t.base_learning_rate is not None
    if t.learning_rate is not None and not taming_yaml:
        return float(t.learning_rate), f"learning rate {float(t.learning_rate):.3g} (train.learning_rate)"
    if t.base_learning_rate is None:
        raise UserError("no learning rate: set train.learning_rate (e.g. train.learning_rate=4.5e-6) "
                        "or train.base_learning_rate (taming's, scaled by batch size and GPUs)")
    lr = float(t.base_learning_rate) * t.batch_size * t.accumulate_grad_batches * world_size
    note = (f"learning rate {lr:.3g} = {float(t.base_learning_rate):.3g} (base_learning_rate) x {t.batch_size} "
            f"(batch_size) x {t.accumulate_grad_batches} (accumulate_grad_batches) x {world_size} (GPUs/processes)")
    if t.learning_rate is not None:
        note += f"; train.learning_rate {t.learning_rate} is ignored for taming YAML configs, as taming does"
    return lr, note


def check_train_options(cfg, device: torch.device) -> None:
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise UserError(f"train.precision {t.precision!r} is unknown; valid choices: {', '.join(PRECISIONS)}")
    if t.precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs a GPU (its grad scaler is CUDA-only); "
                        "use train.precision=bf16 or fp32 on CPU")
    for name in ("batch_size", "accumulate_grad_batches", "log_every", "image_every", "ckpt_every",
                 "max_bad_steps"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_steps is not None and t.max_steps < 0:
        raise UserError(f"train.max_steps must be >= 0, got {t.max_steps}")
    if t.grad_clip is not None and not (0 < t.grad_clip < math.inf):
        raise UserError(f"train.grad_clip must be a finite number > 0 (or null for no clipping), got {t.grad_clip}")
    for name in ("learning_rate", "base_learning_rate"):
        value = getattr(t, name)
        if value is not None and not (0 < value < math.inf):
            raise UserError(f"train.{name} must be a finite number > 0, got {value}")
    if not (0 <= t.weight_decay < math.inf):
        raise UserError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    for name in ("seed", "num_workers"):
        if getattr(t, name) < 0:
            raise UserError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise UserError(f"train.adam_betas must be two numbers in [0, 1), got {list(t.adam_betas)}")
    if cfg.data.image_size < 8:
        raise UserError(f"data.image_size must be >= 8 pixels, got {cfg.data.image_size}")


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_across_ranks_(tensors: List[torch.Tensor]) -> None:
    """In-place mean over ranks (discriminator gradients / buffers; DDP wraps only the model)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def codebook_stats(counts: torch.Tensor) -> Dict[str, float]:
    """Usage (fraction of codes used) and perplexity (exp entropy) of code counts."""
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


def state_digest(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 of every tensor's bytes (to compare ranks)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in tensors.items()}


class GracefulStop:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and returns.

    A second SIGINT raises KeyboardInterrupt as usual (for an impatient Ctrl-C).  The
    handler does no I/O: it may interrupt the main thread in the middle of writing a log
    line, and writing to the same file from the handler would fail ("reentrant call").
    The loop reports the signal when it acts on the flag.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._saved = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved = {}
        return False


@dataclass
class FitResult:
    steps: int                  # global step reached
    run_dir: Optional[str]
    stopped_by_signal: bool
    bad_steps: int
    skipped_images: int
    last_grid: Optional[str]
    seconds: float


# ----------------------------------------------------------------------------------------

class Trainer:
    """Builds model, loss, optimizers and data from a config; :meth:`fit` trains.

    ``run_dir`` None means "write nothing" (used by tests and the demo's measurements).
    """

    def __init__(self, cfg, data: DataSpec, run_dir: Optional[str], resume: Optional[Source] = None,
                 device: Optional[torch.device] = None,
                 batch_augmenter: Optional[Callable[[Dict, int], Dict]] = None,
                 use_bar: Optional[bool] = None, time_limit_s: Optional[float] = None):
        from adapters import build_model
        from losses import LossCalculator

        self.cfg = cfg
        self.data = data
        self.run_dir = run_dir
        self.rank, self.world = dist_rank(), dist_world()
        self.is_main = self.rank == 0
        self.device = device or default_device()
        self.batch_augmenter = batch_augmenter
        self.use_bar = use_bar
        # Stop (and save) after this many seconds of training, e.g. the demo's few minutes.
        self.time_limit_s = time_limit_s
        self.notes: List[str] = []
        t = cfg.train
        check_train_options(cfg, self.device)
        self.precision = t.precision

        # Same seed on every rank: identical initial weights (DDP would broadcast anyway).
        seed_everything(t.seed)
        self.model = build_model(cfg).to(self.device)
        self.calc = LossCalculator.from_config(cfg).to(self.device)
        self.gen_params = list(self.model.generator_parameters())
        # Parameters the generator optimizer does not own get no gradient at all (and DDP
        # does not wait for them).
        owned = {id(p) for p in self.gen_params}
        for p in self.model.parameters():
            if id(p) not in owned:
                p.requires_grad_(False)
        self.discriminator = self.calc.discriminator if self.calc.use_gan else None
        self.disc_params = list(self.discriminator.parameters()) if self.discriminator is not None else []
        self.float_buffers = [b for m in (self.model, self.calc.discriminator) if m is not None
                              for b in m.buffers() if b.is_floating_point()]

        self.lr, self.lr_note = learning_rate(cfg, self.world)
        betas = tuple(float(b) for b in t.adam_betas)
        if t.weight_decay > 0:
            # AdamW with no decay on norms, biases, embeddings and codebooks (train/optimizer.py).
            from train.optimizer import get_optimizer

            names = {id(p): n for n, p in self.model.named_parameters()}
            self.opt_g = get_optimizer([(names.get(id(p), str(i)), p) for i, p in enumerate(self.gen_params)],
                                       lr=self.lr, wd=t.weight_decay, betas=betas)
            self.opt_d = get_optimizer(list(self.discriminator.named_parameters()), lr=self.lr,
                                       wd=t.weight_decay, betas=betas) if self.disc_params else None
        else:
            # taming's optimizers: plain Adam, one group, upstream's parameter order (so
            # migrated optimizer states line up).
            self.opt_g = torch.optim.Adam(self.gen_params, lr=self.lr, betas=betas)
            # use_gan false: no discriminator optimizer exists, so none is ever checkpointed.
            self.opt_d = torch.optim.Adam(self.disc_params, lr=self.lr, betas=betas) if self.disc_params else None
        fp16 = self.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler("cuda") if fp16 else None
        self.scaler_d = torch.amp.GradScaler("cuda") if fp16 and self.opt_d is not None else None

        self.step = 0
        self.bad_steps_total = 0
        self.skipped_images = 0
        self.resumed_from = None
        if resume is not None:
            self.load(resume)
        # A fresh start only: a resumed run's codebook is the checkpoint's.  It runs before
        # the per-rank reseed below and draws from no global RNG, so resuming stays exact.
        self.codebook_init: Optional[Dict[str, object]] = None
        if t.init_codebook_from_data and resume is None:
            self.codebook_init = self._init_codebook_from_data()
        # Dropout / Gumbel noise differ per rank from here on; restored RNG states win on resume.
        if resume is None or not resume.train_state:
            seed_everything(t.seed + 1000 * self.rank + self.step)

        self.images_per_step = t.batch_size * t.accumulate_grad_batches * self.world
        self.max_steps = t.max_steps
        if self.max_steps is None and t.max_epochs is not None:
            self.max_steps = steps_for_epochs(t.max_epochs, len(data.paths), self.images_per_step)

        if is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers=False: EMA codebooks all-reduce their own statistics, so every
            # rank already holds the same codebook; broadcasting rank 0's would hide a bug.
            self.net = DDP(self.model, device_ids=ids, broadcast_buffers=False)
        else:
            self.net = self.model

    def _init_codebook_from_data(self) -> Dict[str, object]:
        """``train.init_codebook_from_data``: the model's EMA codebook(s) start from encoder
        outputs of the run's first training crops (``adapters/ema_quantizer.py`` says why).

        Every rank encodes the same crops (sample numbers 0..n-1 of the training stream,
        independent of rank) with the same seed; rank 0's buffers are then broadcast so the
        codebooks are identical even where GPU kernels are not bit-deterministic.
        """
        from adapters.ema_quantizer import TooFewVectors
        from train.data import fixed_crops

        init = getattr(self.model, "init_codebook_from_data", None)
        if init is None:
            raise UserError(f"train.init_codebook_from_data: model_type {self.cfg.model_type} has no EMA codebook "
                            "to start from data; set train.init_codebook_from_data=false")
        if (self.cfg.model_args or {}).get("ckpt_path"):
            raise UserError("train.init_codebook_from_data would replace the codebook loaded from "
                            "model_args.ckpt_path; set train.init_codebook_from_data=false to keep it")
        seed, n = int(self.cfg.train.seed), CODEBOOK_INIT_CROPS
        while True:
            crops = fixed_crops(self.data, n, seed=seed)
            try:
                drawn = init(crops, seed=seed, batch_size=int(self.cfg.train.batch_size))
                break
            except TooFewVectors as exc:
                more = math.ceil(n * exc.needed / max(exc.got, 1))
                if n >= CODEBOOK_INIT_MAX_CROPS or more > CODEBOOK_INIT_MAX_CROPS:
                    raise UserError(f"train.init_codebook_from_data: {exc} from {n} crops; the codebook is too "
                                    f"large for {self.data.image_size}px crops (more than {CODEBOOK_INIT_MAX_CROPS} "
                                    "crops needed). Use fewer codes or set train.init_codebook_from_data=false") from None
                n = more
        if is_distributed():
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)
        return {"crops": n, "vectors": tuple(drawn), "codes": tuple(self.model.codebook_sizes)}

    # ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg, t = self.cfg, self.cfg.train
        accumulate = t.accumulate_grad_batches
        log = RunLogger(self.run_dir, enabled=self.is_main, total_steps=self.max_steps,
                        start_step=self.step, use_bar=self.use_bar)
        self._write_config()
        self._print_header(log)
        loader = make_loader(self.data, t.seed, t.batch_size, accumulate, self.world, self.rank,
                             start_step=self.step, end_step=self.max_steps, num_workers=t.num_workers,
                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        sizes = tuple(getattr(self.model, "codebook_sizes", ()) or ())
        code_counts = [torch.zeros(n, device=self.device) for n in sizes]
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        window_images, window_start = 0, time.time()
        bad_in_a_row, last_grid = 0, None
        started = time.time()
        self.model.train()
        self.calc.train()

        stop = GracefulStop()
        with stop:
            while self.max_steps is None or self.step < self.max_steps:
                step = self.step
                if hasattr(self.model, "update_temperature"):
                    self.model.update_temperature(step)     # GumbelVQ's temperature schedule
                update_disc = self.opt_d is not None and self.calc.should_update_discriminator(step)
                # Buffers change in the forward (EMA codebooks, BatchNorm statistics): keep a copy
                # so a skipped step leaves them as they were too (they are small).
                saved_buffers = [b.detach().clone() for b in self.float_buffers]
                self.opt_g.zero_grad(set_to_none=True)
                if self.opt_d is not None:
                    self.opt_d.zero_grad(set_to_none=True)

                # ---- forward / backward over the micro-batches ------------------------
                bad = False
                step_logs: List[Dict[str, torch.Tensor]] = []
                out = None
                for micro in range(accumulate):
                    batch = next(batches)
                    if bad:
                        continue        # drain the step's batches so the data stays aligned
                    self.skipped_images += int(batch["skipped"].sum())
                    batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                    if self.batch_augmenter is not None:
                        batch = self.batch_augmenter(batch, step)
                    last_micro = micro == accumulate - 1
                    # DDP: all-reduce gradients once, after the last micro-batch.
                    sync = self.net.no_sync() if (not last_micro and self.net is not self.model) \
                        else contextlib.nullcontext()
                    with sync:
                        with autocast(self.precision, self.device):
                            out = self.calc.generator_step(self.net, batch, step)
                        if any_rank(not bool(torch.isfinite(out.loss).all()), self.device):
                            bad = True
                            continue
                        self._backward(out.loss / accumulate, self.scaler_g)
                    if update_disc:
                        with autocast(self.precision, self.device):
                            d_loss, d_log = self.calc.discriminator_step(out, step)
                        if any_rank(not bool(torch.isfinite(d_loss).all()), self.device):
                            bad = True
                            continue
                        self._backward(d_loss / accumulate, self.scaler_d)
                        step_logs.append(d_log)
                    step_logs.append(out.log)
                    for c, idx in zip(code_counts, _index_list(out.indices)):
                        idx = idx.reshape(-1)
                        idx = idx[(idx >= 0) & (idx < c.numel())]
                        c += torch.bincount(idx, minlength=c.numel()).to(c.dtype)

                # ---- optimizer steps ----------------------------------------------------
                if not bad:
                    g_norm = self._unscale_and_clip(self.opt_g, self.gen_params, self.scaler_g)
                    d_norm = None
                    if update_disc:
                        average_across_ranks_([p.grad for p in self.disc_params if p.grad is not None])
                        d_norm = self._unscale_and_clip(self.opt_d, self.disc_params, self.scaler_d)
                    # fp16: the grad scaler skips steps with inf gradients itself (that is how it
                    # finds its scale), so only fp32/bf16 count them as bad steps.
                    if self.scaler_g is None and not all(math.isfinite(n) for n in (g_norm, d_norm)
                                                         if n is not None):
                        bad = True
                if bad:
                    with torch.no_grad():
                        for b, saved in zip(self.float_buffers, saved_buffers):
                            b.copy_(saved)
                    self.opt_g.zero_grad(set_to_none=True)
                    if self.opt_d is not None:
                        self.opt_d.zero_grad(set_to_none=True)
                    bad_in_a_row += 1
                    self.bad_steps_total += 1
                    log.message(f"step {step + 1}: non-finite loss or gradient, step skipped "
                                f"({bad_in_a_row} in a row, {self.bad_steps_total} in total)")
                    if bad_in_a_row >= t.max_bad_steps:
                        self.step += 1
                        self.save()     # the weights are the last good ones: bad steps changed nothing
                        log.close()
                        raise TrainingStopped(
                            f"training stopped: {bad_in_a_row} steps in a row had a non-finite loss or "
                            f"gradient (train.max_bad_steps={t.max_bad_steps}); the last good weights are saved "
                            f"in {self._ckpt_path(ckpt.LAST)}. Lower train.learning_rate, set train.grad_clip, "
                            "or use train.precision=fp32")
                else:
                    bad_in_a_row = 0
                    self._optimizer_step(self.opt_g, self.scaler_g)
                    if update_disc:
                        self._optimizer_step(self.opt_d, self.scaler_d)
                        # BatchNorm statistics of the PatchGAN: keep them equal on every rank.
                        average_across_ranks_([b for b in self.discriminator.buffers() if b.is_floating_point()])
                    for logs in step_logs:
                        for k, v in logs.items():
                            sums[k] = sums.get(k, 0.0) + v.detach().float().mean().to(self.device)
                            counts[k] = counts.get(k, 0) + 1
                    sums["grad_norm/generator"] = sums.get("grad_norm/generator", 0.0) + g_norm
                    counts["grad_norm/generator"] = counts.get("grad_norm/generator", 0) + 1
                    if d_norm is not None:
                        sums["grad_norm/discriminator"] = sums.get("grad_norm/discriminator", 0.0) + d_norm
                        counts["grad_norm/discriminator"] = counts.get("grad_norm/discriminator", 0) + 1
                self.step += 1
                window_images += self.images_per_step

                # ---- logs, images, checkpoints --------------------------------------------
                finished = self.max_steps is not None and self.step >= self.max_steps
                log_now = self.step % t.log_every == 0 or finished
                values: Dict[str, float] = {}
                if log_now:
                    values = {k: float(v) / counts[k] for k, v in sums.items()}
                    values.setdefault("train/disc_factor", self.calc.disc_factor_at(step))
                    values["lr/generator"] = self.opt_g.param_groups[0]["lr"]
                    if self.opt_d is not None:
                        values["lr/discriminator"] = self.opt_d.param_groups[0]["lr"]
                    for i, c in enumerate(code_counts):
                        if is_distributed():
                            dist.all_reduce(c)
                        suffix = "" if len(code_counts) == 1 else f"_{i}"
                        for name, value in codebook_stats(c).items():
                            values[f"codebook/{name}{suffix}"] = value
                        c.zero_()
                    if hasattr(self.model, "update_temperature") and getattr(self.model, "variant", "") == "Gumbel":
                        values["train/gumbel_temperature"] = float(self.model.quantize.temperature)
                    elapsed = max(time.time() - window_start, 1e-9)
                    values["perf/images_per_s"] = window_images / elapsed
                    values["perf/bad_steps"] = float(self.bad_steps_total)
                    values["data/skipped_images"] = float(self.skipped_images)
                    log.scalars(self.step, values)
                    sums, counts = {}, {}
                    window_images, window_start = 0, time.time()
                log.progress(self.step, values, log_now)
                if self.is_main and out is not None and not bad and (self.step % t.image_every == 0 or finished):
                    last_grid = log.image_grid(self.step, out.inputs, out.reconstructions) or last_grid
                if self.step % t.ckpt_every == 0 and not finished:
                    self.save(keep=True)
                if any_rank(stop.requested, self.device):
                    log.message(f"{stop.signal_name or 'a stop signal'} received: step {self.step} is finished; "
                                "saving checkpoints/last.ckpt, then exiting")
                    stop.requested = True
                    break
                if self.time_limit_s is not None and any_rank(time.time() - started > self.time_limit_s,
                                                              self.device):
                    log.message(f"time limit of {self.time_limit_s:.0f}s reached at step {self.step}")
                    break

        self.save(keep=self.max_steps is not None and self.step % t.ckpt_every == 0)
        if stop.requested:
            log.message(f"stopped at step {self.step}; resume with: python -m train fit --resume {self.run_dir}")
        self._check_ranks_in_sync(log)
        log.close()
        return FitResult(steps=self.step, run_dir=self.run_dir, stopped_by_signal=stop.requested,
                         bad_steps=self.bad_steps_total, skipped_images=self.skipped_images,
                         last_grid=last_grid, seconds=time.time() - started)

    # ------------------------------------------------------------------------------------
    # backward / step helpers (fp16 goes through a GradScaler per optimizer)

    @staticmethod
    def _backward(loss: torch.Tensor, scaler) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _unscale_and_clip(self, opt, params, scaler) -> float:
        """Unscale (fp16), clip to ``train.grad_clip`` when set; returns the gradient norm."""
        if scaler is not None:
            scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        if self.cfg.train.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, float(self.cfg.train.grad_clip))
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm)

    @staticmethod
    def _optimizer_step(opt, scaler) -> None:
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    # ------------------------------------------------------------------------------------
    # checkpoints

    def _ckpt_path(self, name: str) -> str:
        return os.path.join(self.run_dir or ".", "checkpoints", name)

    def training_state(self) -> Dict:
        state = {
            "format": ckpt.FORMAT, "version": ckpt.VERSION,
            "global_step": self.step,
            "epoch": (self.step * self.images_per_step) // max(1, len(self.data.paths)),
            "model": self.model.state_dict(),
            "loss": ({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
                     if self.discriminator is not None else {}),
            "optimizers": {"generator": self.opt_g.state_dict()},
            "scalers": {},
            "rng": ckpt.capture_rng(),
            "data": {"next_step": self.step, "images_per_step": self.images_per_step,
                     "seed": int(self.cfg.train.seed), "n_images": len(self.data.paths)},
            "counters": {"bad_steps": self.bad_steps_total, "skipped_images": self.skipped_images},
            "world_size": self.world,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }
        if self.opt_d is not None:
            state["optimizers"]["discriminator"] = self.opt_d.state_dict()
        if self.scaler_g is not None:
            state["scalers"]["generator"] = self.scaler_g.state_dict()
        if self.scaler_d is not None:
            state["scalers"]["discriminator"] = self.scaler_d.state_dict()
        return state

    def save(self, keep: bool = False) -> None:
        """Write ``last.ckpt`` + ``last.safetensors`` (rank 0); ``keep`` adds ``step-N.ckpt``."""
        if self.run_dir is None:
            return
        weights = self.model.state_dict()
        # Every rank checks (the weights are identical on all ranks), so all of them stop
        # together instead of the others waiting in the next collective for rank 0.
        broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if broken:
            previous = self._ckpt_path(ckpt.LAST)
            kept = (f"the previous checkpoint {previous} is kept" if os.path.isfile(previous)
                    else "no checkpoint was written")
            raise TrainingStopped(f"not saving step {self.step}: non-finite values in {', '.join(broken[:3])}; "
                                  f"{kept}")
        # Each rank's random state (dropout, Gumbel noise differ per rank), so that a
        # multi-process resume continues every rank's own stream.
        rng = ckpt.capture_rng()
        rng_per_rank = [None] * self.world
        if is_distributed():
            dist.all_gather_object(rng_per_rank, rng)
        else:
            rng_per_rank = [rng]
        if not self.is_main:
            return
        state = self.training_state()
        state["rng_per_rank"] = rng_per_rank
        os.makedirs(self._ckpt_path(""), exist_ok=True)
        atomic.save_torch(state, self._ckpt_path(ckpt.LAST))
        atomic.save_safetensors(weights, self._ckpt_path(ckpt.LAST_WEIGHTS),
                                metadata={"global_step": str(self.step), "model_type": str(self.cfg.model_type)})
        if keep:
            ckpt.keep_copy(self._ckpt_path(ckpt.LAST), self._ckpt_path(f"step-{self.step}.ckpt"))

    def load(self, source: Source) -> None:
        """Continue from a trainer checkpoint (exactly) or a migrated folder (weights, step,
        optimizer states when they fit)."""
        from adapters.weights import load_model_weights

        exact = source.train_state
        state = ckpt.load_state(source.state_path) if exact else ckpt.load_migrated(source.state_path)
        load_model_weights(self.model, state["model"], source=source.state_path)
        disc_state = {k[len("discriminator."):]: v for k, v in (state.get("loss") or {}).items()
                      if k.startswith("discriminator.")}
        if self.discriminator is not None:
            if disc_state:
                load_model_weights(self.discriminator, disc_state, source=f"{source.state_path} (discriminator)")
            else:
                self.notes.append("the checkpoint has no discriminator weights: the discriminator starts fresh")
        elif disc_state and self.calc.discriminator is not None:
            # use_gan false now: keep the weights (they are saved again) but never train them.
            load_model_weights(self.calc.discriminator, disc_state, source=f"{source.state_path} (discriminator)")

        opts = state.get("optimizers") or {}
        self._load_optimizer(self.opt_g, opts.get("generator"), "generator", strict=exact)
        if self.opt_d is not None:
            self._load_optimizer(self.opt_d, opts.get("discriminator"), "discriminator", strict=exact)
        elif opts.get("discriminator") is not None:
            self.notes.append("use_gan is false: the checkpoint's discriminator optimizer state is not used")
        scalers = state.get("scalers") or {}
        for scaler, name in ((self.scaler_g, "generator"), (self.scaler_d, "discriminator")):
            if scaler is not None and name in scalers:
                scaler.load_state_dict(scalers[name])

        self.step = int(state.get("global_step") or 0)
        counters = state.get("counters") or {}
        self.bad_steps_total = int(counters.get("bad_steps", 0))
        self.skipped_images = int(counters.get("skipped_images", 0))
        per_rank = state.get("rng_per_rank") or []
        if exact and len(per_rank) == self.world and per_rank[self.rank]:
            ckpt.restore_rng(per_rank[self.rank])
        elif exact and state.get("rng"):
            ckpt.restore_rng(state["rng"])
            if self.world > 1:  # a checkpoint from another process count: distinct streams per rank
                seed_everything(int(self.cfg.train.seed) + 1000 * self.rank + self.step)
        saved_world = state.get("world_size")
        data = state.get("data") or {}
        images_per_step = self.cfg.train.batch_size * self.cfg.train.accumulate_grad_batches * self.world
        if exact and (saved_world not in (None, self.world) or data.get("images_per_step") not in (None, images_per_step)
                      or data.get("seed") not in (None, int(self.cfg.train.seed))):
            self.notes.append("batch size, process count or seed differ from the checkpoint's: training "
                              "continues, but not on exactly the batches an uninterrupted run would see")
        self.resumed_from = source.state_path

    def _load_optimizer(self, opt, state, name: str, strict: bool) -> None:
        if state is None:
            self.notes.append(f"no {name} optimizer state in the checkpoint: Adam starts fresh")
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
                raise UserError(f"the checkpoint's {name} optimizer state does not fit this model ({exc}); "
                                "resume with the config the run was trained with") from None
            opt.state.clear()
            self.notes.append(f"the {name} optimizer state does not fit ({exc}): Adam starts fresh")
        # The configured learning rate wins over the saved one (a deliberate change on resume).
        for group in opt.param_groups:
            group["lr"] = self.lr

    # ------------------------------------------------------------------------------------
    # reporting

    def _write_config(self) -> None:
        if self.is_main and self.run_dir is not None:
            from train.config import save_config

            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))

    def _print_header(self, log: RunLogger) -> None:
        n_gen = sum(p.numel() for p in self.gen_params)
        n_disc = sum(p.numel() for p in self.disc_params)
        variant = f" {self.cfg.model_variant}" if self.cfg.model_variant else ""
        log.message(f"model {self.cfg.model_type}{variant}: {n_gen / 1e6:.2f}M generator parameters"
                    + (f", discriminator {n_disc / 1e6:.2f}M" if self.opt_d is not None else
                       ", no discriminator optimizer (use_gan is false)"))
        log.message(self.lr_note)
        log.message(f"data: {self.data.source}, {self.data.image_size}px crops"
                    + (f"; {len(self.data.unreadable)} unreadable file(s) skipped (e.g. {self.data.unreadable[0]})"
                       if self.data.unreadable else ""))
        steps = f"to step {self.max_steps}" if self.max_steps is not None else "until stopped"
        log.message(f"training {steps} from step {self.step}: {self.images_per_step} images/step "
                    f"({self.cfg.train.batch_size} x {self.cfg.train.accumulate_grad_batches} accumulated x "
                    f"{self.world} process(es)), {self.precision}, {self.device}")
        if self.resumed_from:
            log.message(f"resumed from {self.resumed_from} at step {self.step}")
        if self.codebook_init:
            init = self.codebook_init
            log.message(f"codebook initialised from data (train.init_codebook_from_data): "
                        f"{' + '.join(map(str, init['codes']))} codes from "
                        f"{' + '.join(map(str, init['vectors']))} encoder outputs of the first {init['crops']} "
                        "training crops, each counted once")
        for note in self.notes:
            log.message(f"note: {note}")
        if self.run_dir:
            log.message(f"run folder: {self.run_dir}")

    def _check_ranks_in_sync(self, log: RunLogger) -> None:
        """Under torchrun: compare every weight and buffer (EMA codebooks included) across ranks.

        Rank 0 writes the verdict to ``ranks_in_sync.json`` and warns when they differ.
        """
        if not is_distributed():
            return
        tensors = dict(self.model.state_dict())
        if self.discriminator is not None:
            tensors.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        mine = state_digest(tensors)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        differing = sorted(k for k in mine if len({d.get(k) for d in everyone}) > 1)
        if self.is_main:
            verdict = {"world_size": self.world, "step": self.step, "in_sync": not differing,
                       "tensors": len(mine), "differing": differing}
            if self.run_dir:
                atomic.write_text(os.path.join(self.run_dir, "ranks_in_sync.json"), json.dumps(verdict, indent=1))
            if differing:
                log.message(f"warning: {len(differing)} tensors differ between ranks (e.g. {differing[0]})")
            else:
                log.message(f"all {self.world} ranks hold identical weights and codebooks ({len(mine)} tensors)")


def _index_list(indices) -> List[torch.Tensor]:
    if indices is None:
        return []
    if torch.is_tensor(indices):
        return [indices]
    return [i for i in indices if torch.is_tensor(i)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


__all__ = ["Trainer", "FitResult", "TrainingStopped", "learning_rate", "codebook_stats", "GracefulStop"]
