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
        gen.backward(out.loss / accumulate)
        if calc.should_update_discriminator(step):
            d_loss = calc.discriminator_step(out, step)       # reuses out.reconstructions
            disc.backward(d_loss / accumulate)
    unscale (fp16) -> clip, for each side
    vote.read()                                               # the step's one host read
    optimizer step for each side, or undo the step when a loss or gradient was non-finite

The pieces, one concept per module: ``train/sides.py`` (a network with its optimizer,
scaler and clip; the discriminator side is None without a discriminator),
``train/step_guard.py`` (non-finite steps change nothing), ``train/callbacks.py`` (logs,
image grids, checkpoints, signals, time limit), ``train/checkpoint.py`` (the training state
in and out), ``train/codebook_init.py``, ``train/rank_sync.py``, ``train/usage.py``.  The
model and family details live behind ``LossCalculator`` (``losses/calculator.py``), so this
file never asks which model it trains.  Extension point: ``batch_augmenter(batch, step) ->
batch`` runs on every micro-batch on the device before the generator step (e.g. to add
``batch["dino_features"]`` computed elsewhere).

SIGTERM / SIGINT finish the step, save ``last`` and return normally.  Under torchrun every
decision that changes control flow (bad step, stop request) is agreed on by all ranks
first, so no rank waits forever: all of a step's decisions travel in one ``StepVote``
(``train/rank_sync.py``), one all-reduce and one host read per optimizer step, so a GPU
is never made to wait for the host in between.  ``train.channels_last`` and
``train.compile`` (``_build``) change how the networks run, never their state dicts.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from adapters import build_model
from adapters.distributed import is_distributed, rank as dist_rank, world_size as dist_world
from adapters.registry import get_model_type
from losses import LossCalculator
from train import atomic, checkpoint as ckpt, preflight
from train.callbacks import (GracefulStop, ImageGrids, MetricsWindow, PeriodicCheckpoint, StepEnd, StopOnSignal,
                             TimeLimit)
from train.checkpoint import seed_everything
from train.codebook_init import init_codebook_from_data
from train.config import save_config
from train.data import DataSpec, loader_workers, make_loader, steps_for_epochs, to_model_range
from train.errors import TrainingStopped, UserError, raise_for_errors
from train.logger import RunLogger
from train.rank_sync import StepVote, check_ranks_in_sync
from train.run_folder import WRITTEN_FOLDERS, open_run_folder
from train.shards import ShardSpec, make_shard_loader
from train.sides import Side, autocast, each, make_sides
from train.step_guard import StepGuard, grad_flag
from train.step_optins import StepOptIns
from train.validate import train_value_findings
from train.sources import Source



@dataclass
class FitResult:
    steps: int                  # global step reached
    run_dir: Optional[str]
    stopped_by_signal: bool
    bad_steps: int
    skipped_images: int
    last_grid: Optional[str]
    seconds: float


# torch.compile's backend for train.compile: inductor generates fused kernels (the speed);
# tests on a small CPU trace the same graphs with "eager" (inductor's C++ build of even a
# tiny model takes minutes there).
COMPILE_BACKEND = "inductor"


# ----------------------------------------------------------------------------------------
# Configuration checks and the learning rate

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
    """The train-value rules ``validate`` runs, plus what only the device can tell."""
    raise_for_errors(train_value_findings(cfg), "train")
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs a GPU (its grad scaler is CUDA-only); "
                        "use train.precision=bf16 or fp32 on CPU")


# ----------------------------------------------------------------------------------------

class Trainer:
    """Builds model, loss, the two sides and data from a config; :meth:`fit` trains.

    ``run_dir`` None means "write nothing" (used by tests and the demo's measurements).
    """

    def __init__(self, cfg, data: DataSpec, run_dir: Optional[str], resume: Optional[Source] = None,
                 device: Optional[torch.device] = None,
                 batch_augmenter: Optional[Callable[[Dict, int], Dict]] = None,
                 use_bar: Optional[bool] = None, time_limit_s: Optional[float] = None):
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.rank, self.world = dist_rank(), dist_world()
        self.is_main = self.rank == 0
        self.device = device or default_device()
        self.batch_augmenter, self.use_bar = batch_augmenter, use_bar
        # Stop (and save) after this many seconds of training, e.g. the demo's few minutes.
        self.time_limit_s = time_limit_s
        self.notes: List[str] = []
        t = cfg.train
        check_train_options(cfg, self.device)
        self.precision = t.precision
        # One writer per run folder, taken before anything costly so a second run into the
        # same --out is refused within seconds; it also removes what killed runs left.
        self.lock = open_run_folder(run_dir, self.is_main) if run_dir is not None else None
        try:
            self._build(cfg, data, resume)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg, data: DataSpec, resume: Optional[Source]) -> None:
        t = cfg.train

        # Same seed on every rank: identical initial weights (DDP would broadcast anyway).
        seed_everything(t.seed)
        self.model = build_model(cfg).to(self.device)
        self.calc = LossCalculator.from_config(cfg).to(self.device)
        if t.channels_last:
            # 4-D weights (convolutions) in NHWC; the optimizer's states follow them.
            self.model.to(memory_format=torch.channels_last)
            self.calc.to(memory_format=torch.channels_last)
        if self.batch_augmenter is None:
            # What the model type's loss family needs in each batch (DinoVQ: teacher features);
            # built after the model, from the same seeded random state (a random teacher).
            spec = get_model_type(cfg.model_type)
            self.batch_augmenter = spec.batch_hook(cfg, self.device) if spec.batch_hook is not None else None
        self.lr, self.lr_note = learning_rate(cfg, self.world)
        self.gen, self.disc = make_sides(self.model, self.calc, t, self.lr, self.precision)
        # Buffers the forward changes (EMA codebooks, BatchNorm statistics and batch counts)
        # go back on a bad step.
        buffers = [b for side in self.sides for b in side.module.buffers()]
        self.guard = StepGuard(buffers, t.max_bad_steps, scaled=self.gen.scaler is not None)

        self.images_per_step = t.batch_size * t.accumulate_grad_batches * self.world
        self.max_steps = t.max_steps
        if self.max_steps is None and t.max_epochs is not None:
            self.max_steps = steps_for_epochs(t.max_epochs, data.n_images, self.images_per_step)
        self.step, self.skipped_images, self.resumed_from = 0, 0, None
        self.restored_optins: Dict[str, object] = {}
        if resume is not None:
            ckpt.restore(self, resume)
        # A fresh start only: a resumed run's codebook is the checkpoint's.  It runs before
        # the per-rank reseed below and draws from no global RNG, so resuming stays exact.
        self.codebook_init: Optional[Dict[str, object]] = None
        if (t.init_codebook_from_data or t.init_codebook_kmeans_iters) and resume is None:
            self.codebook_init = init_codebook_from_data(self.model, cfg, data)
        # LR schedule, weight EMA, dead-code restart (each None when off); built after the
        # codebook start, so the EMA shadows start from the weights training starts from.
        self.optins = StepOptIns(self.model, t, self.lr, self.max_steps, [s.optimizer for s in self.sides],
                                 self.device)
        if resume is not None:
            self.optins.load_state_dict(self.restored_optins, self.notes)
        # Dropout / Gumbel noise differ per rank from here on; restored RNG states win on resume.
        if resume is None or not resume.train_state:
            seed_everything(t.seed + 1000 * self.rank + self.step)
        if t.compile:
            self._compile()
        self.net = self._wrap_for_ranks(self.model)

    def _compile(self) -> None:
        """train.compile: torch.compile each network in place (``nn.Module.compile``), so
        ``state_dict`` keys, checkpoints and the optimizers see the modules as they were."""
        if COMPILE_BACKEND == "inductor" and not torch_compile_can_build():
            raise UserError("train.compile needs a C++ compiler for torch.compile's inductor backend and none was "
                            "found (looked for $CXX, g++, c++, clang++ on PATH): install one (e.g. apt-get install "
                            "g++) or set train.compile=false")
        for side in self.sides:
            side.module.compile(backend=COMPILE_BACKEND)
        self.notes.append("torch.compile: the first steps compile the generator"
                          + (" and the discriminator" if self.disc is not None else "") + " (slower)")

    @property
    def sides(self) -> Sequence[Side]:
        return each(self.gen, self.disc)

    def _wrap_for_ranks(self, model):
        if not is_distributed():
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers=False: EMA codebooks all-reduce their own statistics, so every
        # rank already holds the same codebook; broadcasting rank 0's would hide a bug.
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    def release(self) -> None:
        """Free the run folder for the next writer (also done when the process ends)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        try:
            return self._fit()
        except OSError as exc:
            # A log line or TensorBoard event the disk refused: one message, not a traceback.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                raise atomic.write_error(exc.filename or self.run_dir or ".", exc) from None
            raise
        finally:
            if self.run_dir is not None and self.is_main:
                for sub in WRITTEN_FOLDERS:     # a failed write's leftovers, if any survived it
                    atomic.clean_stale_temporaries(os.path.join(self.run_dir, sub))
            self.release()

    def _fit(self) -> FitResult:
        t = self.cfg.train
        accumulate = t.accumulate_grad_batches
        log = RunLogger(self.run_dir, enabled=self.is_main, total_steps=self.max_steps,
                        start_step=self.step, use_bar=self.use_bar)
        self._write_config()
        self.workers = loader_workers(t.num_workers)
        self._print_header(log)
        loader = make_shard_loader if isinstance(self.data, ShardSpec) else make_loader
        batches = iter(loader(self.data, t.seed, t.batch_size, accumulate, self.world, self.rank,
                              start_step=self.step, end_step=self.max_steps, num_workers=self.workers,
                              pin_memory=self.device.type == "cuda"))
        started, stop = time.time(), GracefulStop()
        metrics = MetricsWindow(log, tuple(self.model.codebook_sizes), self.device,
                                t.log_every)
        grids = ImageGrids(log, t.image_every, enabled=self.is_main)
        callbacks = [metrics, grids, PeriodicCheckpoint(t.ckpt_every), StopOnSignal(stop, log)]
        if self.time_limit_s is not None:
            callbacks.append(TimeLimit(self.time_limit_s, started, log))
        # Every per-step decision of every rank (bad step, stop requests) in one vote.
        voting = [cb for cb in callbacks if cb.vote is not None]
        vote = StepVote(StepGuard.flags(self.sides) + [cb.vote for cb in voting], self.device)
        self.model.train()
        self.calc.train()

        with stop:
            while self.max_steps is None or self.step < self.max_steps:
                step = self.step
                scalars = self.model.before_step(step)     # e.g. GumbelVQ's temperature
                scalars.update(self.optins.before_step(step))   # the learning rate, when scheduled
                update_disc = self.disc is not None and self.calc.should_update_discriminator(step)
                stepping = [self.gen, self.disc] if update_disc else [self.gen]
                vote.clear()
                self.guard.snapshot()
                for side in self.sides:
                    side.zero_grad()

                # ---- forward / backward over the micro-batches ------------------------
                # Nothing here reads a value on the host: the guard raises the vote's flags on
                # the device, and a non-finite loss only makes gradients the skip drops.
                out, step_logs, step_codes = None, [], []
                for micro in range(accumulate):
                    batch = self._memory_format(self._prepare(next(batches), step))
                    images = batch["image"]        # the dead-code restart's encoder outputs
                    with self._sync_gradients(micro == accumulate - 1):
                        with autocast(self.precision, self.device):
                            out = self.calc.generator_step(self.net, batch, step)
                        self.guard.watch_loss(vote, out.loss)
                        self.gen.backward(out.loss / accumulate)
                    if update_disc:
                        with autocast(self.precision, self.device):
                            d_loss, d_log = self.calc.discriminator_step(out, step)
                        self.guard.watch_loss(vote, d_loss)
                        self.disc.backward(d_loss / accumulate)
                        step_logs.append(d_log)
                    step_logs.append(out.log)
                    step_codes.append(out.codes)
                    self.optins.observe(out.codes)

                # ---- the step's one host read, then optimizer steps (or undo the step) ---
                norms = {}
                for side in stepping:
                    norms[f"grad_norm/{side.name}"] = norm = side.unscale_and_clip()
                    self.guard.watch_norm(vote, side, norm)
                for cb in voting:
                    vote.raise_if(cb.vote, cb.wants_stop(self))
                verdict = vote.read()
                bad = self.guard.is_bad(verdict, stepping)
                if bad:
                    log.message(self.guard.skip(step, self.sides))
                    if self.guard.exhausted:
                        self.step += 1
                        self.save()     # the weights are the last good ones: bad steps changed nothing
                        log.close()
                        raise TrainingStopped(self.guard.stop_message(self._ckpt_path(ckpt.LAST)))
                else:
                    self.guard.passed()
                    for side in stepping:
                        side.step(grads_finite=not verdict[grad_flag(side)])
                    metrics.add_step(step_logs, norms, step_codes)
                self.step += 1
                # weight EMA, dead-code restarts (after the optimizer steps; nothing when off)
                restarted = self.optins.after_step(self.step, bad, images)
                if restarted:       # every dead_code_every steps at most
                    log.message(f"step {self.step}: {restarted} dead code(s) restarted from encoder outputs "
                                "(train.dead_code_threshold)")

                # ---- logs, images, checkpoints, stop requests ---------------------------
                finished = self.max_steps is not None and self.step >= self.max_steps
                end = StepEnd(step, self.step, finished, skipped=bad, out=out, scalars=scalars, votes=verdict)
                # In order; the first callback that asks to stop ends the run.
                if any(cb.after_step(self, end) for cb in callbacks):
                    break

        self.save(keep=self.max_steps is not None and self.step % t.ckpt_every == 0)
        if stop.requested:
            log.message(f"stopped at step {self.step}; resume with: python -m train fit --resume {self.run_dir}")
        check_ranks_in_sync(self.model, self.disc.module if self.disc else None, self.step, self.run_dir, log)
        log.close()
        return FitResult(steps=self.step, run_dir=self.run_dir, stopped_by_signal=stop.requested,
                         bad_steps=self.guard.total, skipped_images=self.skipped_images,
                         last_grid=grids.last, seconds=time.time() - started)

    def _prepare(self, batch: Dict, step: int) -> Dict:
        """Count undecodable images, move the batch to the device (uint8 images: a quarter
        of the bytes), scale the images to [-1, 1] there, run the augmenter."""
        self.skipped_images += int(batch["skipped"].sum())
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch["image"] = to_model_range(batch["image"])
        return self.batch_augmenter(batch, step) if self.batch_augmenter is not None else batch

    def _memory_format(self, batch: Dict) -> Dict:
        """train.channels_last: the images in NHWC, like the weights."""
        if self.cfg.train.channels_last and torch.is_tensor(batch.get("image")) and batch["image"].dim() == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def _sync_gradients(self, last_micro: bool):
        """DDP: all-reduce gradients once, after the last micro-batch."""
        return self.net.no_sync() if (not last_micro and self.net is not self.model) else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------
    # checkpoints (the format lives in train/checkpoint.py)

    def _ckpt_path(self, name: str) -> str:
        return os.path.join(self.run_dir or ".", "checkpoints", name)

    def save(self, keep: bool = False) -> None:
        """Write ``last.ckpt`` + ``last.safetensors`` (rank 0); ``keep`` adds ``step-N.ckpt``."""
        ckpt.save(self, keep=keep)

    # ------------------------------------------------------------------------------------
    # reporting

    def _write_config(self) -> None:
        if self.is_main and self.run_dir is not None:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))

    def _print_header(self, log: RunLogger) -> None:
        n_gen = sum(p.numel() for p in self.gen.params)
        n_disc = sum(p.numel() for p in self.disc.params) if self.disc is not None else 0
        variant = f" {self.cfg.model_variant}" if self.cfg.model_variant else ""
        log.message(f"model {self.cfg.model_type}{variant}: {n_gen / 1e6:.2f}M generator parameters"
                    + (f", discriminator {n_disc / 1e6:.2f}M" if self.disc is not None else
                       ", no discriminator optimizer (use_gan is false)"))
        log.message(self.lr_note)
        workers = (f"{self.workers} loader worker(s)" if self.workers else "loading in the training process") + \
            (" (train.num_workers auto)" if self.cfg.train.num_workers == "auto" else "")
        log.message(f"data: {self.data.source}, {self.data.image_size}px crops, {workers}"
                    + (f"; {len(self.data.unreadable)} unreadable file(s) skipped (e.g. {self.data.unreadable[0]})"
                       if self.data.unreadable else ""))
        steps = f"to step {self.max_steps}" if self.max_steps is not None else "until stopped"
        log.message(f"training {steps} from step {self.step}: {self.images_per_step} images/step "
                    f"({self.cfg.train.batch_size} x {self.cfg.train.accumulate_grad_batches} accumulated x "
                    f"{self.world} process(es)), {self.precision}, {self.device}")
        if self.is_main:
            # What validate reports, for the precision this run uses (fp16 has bf16's sizes).
            try:
                cost = preflight.estimate(self.cfg, ("fp32" if self.precision == "fp32" else "bf16",))
                log.message(preflight.summary_line(cost))
            except UserError as exc:
                log.message(f"memory estimate: not available ({exc})")
        if self.resumed_from:
            log.message(f"resumed from {self.resumed_from} at step {self.step}")
        if self.codebook_init:
            init = self.codebook_init
            how = (f"k-means, {init['kmeans_iters']} Lloyd iterations (train.init_codebook_kmeans_iters)"
                   if init.get("kmeans_iters") else "train.init_codebook_from_data")
            log.message(f"codebook initialised from data ({how}): "
                        f"{' + '.join(map(str, init['codes']))} codes from "
                        f"{' + '.join(map(str, init['vectors']))} encoder outputs of the first {init['crops']} "
                        "training crops, each counted once")
        for note in self.notes:
            log.message(f"note: {note}")
        if self.run_dir:
            log.message(f"run folder: {self.run_dir}")


def torch_compile_can_build() -> bool:
    """Whether torch.compile's default (inductor) backend finds the C++ compiler it builds
    its kernels (CPU) and launchers (GPU) with."""
    names = [os.environ.get("CXX")] + ["g++", "c++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        from train.launch import cuda_index

        local = cuda_index(os.environ, torch.cuda.device_count())    # LOCAL_RANK: this node's GPU
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


__all__ = ["Trainer", "FitResult", "TrainingStopped", "learning_rate", "check_train_options", "default_device"]
