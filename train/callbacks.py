"""What happens around the training steps: logs, image grids, checkpoints, signals, time limit.

    python -m train fit CONFIG --data /images train.log_every=50 train.ckpt_every=5000

Small objects the loop calls at fixed points (minGPT's callbacks, not a framework): every
callback's ``after_step(trainer, end)`` runs once after every step, in list order, on every
rank; one that returns True ends training after that step (those after it are not asked).
Callbacks that call collectives (the metrics window's code counts, the stop checks) do so
on every rank at the same steps, so no rank waits for another.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from losses.calculator import GeneratorOutput
from train.errors import UserError
from train.logger import RunLogger
from train.rank_sync import any_rank
from train.usage import CodeCounts


@dataclass
class StepEnd:
    """What one step did, as callbacks see it."""

    step: int                                   # the step that ran (0-based: logs say "step step+1")
    global_step: int                            # steps done now
    finished: bool                              # max_steps reached
    skipped: bool                               # the step guard undid it
    out: Optional[GeneratorOutput]              # the last micro-batch's generator output
    scalars: Dict[str, float] = field(default_factory=dict)   # the model's before_step logs


class Callback:
    def after_step(self, trainer, end: StepEnd) -> bool:
        """Runs after every step; True ends training."""
        return False


class MetricsWindow(Callback):
    """Loss logs, gradient norms and code counts averaged over ``log_every`` steps, written
    with learning rates, ``disc_factor``, throughput and counters (skipped steps do not count)."""

    def __init__(self, log: RunLogger, codebook_sizes: Sequence[int], device: torch.device, log_every: int):
        self.log = log
        self.log_every = log_every
        self.codes = CodeCounts(codebook_sizes, device)
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.images, self.start = 0, time.time()

    def _add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def add_step(self, logs: List[Dict[str, torch.Tensor]], norms: Dict[str, float]) -> None:
        """A step that was taken: its micro-batches' loss logs and its gradient norms."""
        for step_log in logs:
            for k, v in step_log.items():
                self._add(k, v.detach().float().mean().to(self.device))
        for k, v in norms.items():
            self._add(k, v)

    def after_step(self, trainer, end: StepEnd) -> bool:
        self.images += trainer.images_per_step
        log_now = end.global_step % self.log_every == 0 or end.finished
        values: Dict[str, float] = {}
        if log_now:
            values = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
            values.setdefault("train/disc_factor", trainer.calc.disc_factor_at(end.step))
            for side in trainer.sides:
                values[f"lr/{side.name}"] = side.lr
            values.update(self.codes.pop_logs())
            values.update(end.scalars)
            values["perf/images_per_s"] = self.images / max(time.time() - self.start, 1e-9)
            values["perf/bad_steps"] = float(trainer.guard.total)
            values["data/skipped_images"] = float(trainer.skipped_images)
            self.log.scalars(end.global_step, values)
            self._reset()
        self.log.progress(end.global_step, values, log_now)
        return False


class ImageGrids(Callback):
    """Inputs over reconstructions every ``image_every`` steps and at the end (rank 0)."""

    def __init__(self, log: RunLogger, image_every: int, enabled: bool):
        self.log, self.image_every, self.enabled = log, image_every, enabled
        self.last: Optional[str] = None

    def after_step(self, trainer, end: StepEnd) -> bool:
        if self.enabled and end.out is not None and not end.skipped and \
                (end.global_step % self.image_every == 0 or end.finished):
            try:
                self.last = self.log.image_grid(end.global_step, end.out.inputs, end.out.reconstructions) or self.last
            except UserError as exc:
                # A grid is a preview: training goes on (only rank 0 writes it, so stopping
                # here would leave the other ranks waiting); a full disk then stops the run
                # at the next checkpoint, on every rank together.
                self.log.message(f"warning: image grid not written: {exc}")
        return False


class PeriodicCheckpoint(Callback):
    """``last.ckpt`` plus a kept ``step-N.ckpt`` every ``ckpt_every`` steps (the final save
    after the loop writes the last one)."""

    def __init__(self, ckpt_every: int):
        self.ckpt_every = ckpt_every

    def after_step(self, trainer, end: StepEnd) -> bool:
        if end.global_step % self.ckpt_every == 0 and not end.finished:
            trainer.save(keep=True)
        return False


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


class StopOnSignal(Callback):
    """Ends training after the step in which any rank received SIGTERM / SIGINT."""

    def __init__(self, stop: GracefulStop, log: RunLogger, device: torch.device):
        self.stop, self.log, self.device = stop, log, device

    def after_step(self, trainer, end: StepEnd) -> bool:
        if not any_rank(self.stop.requested, self.device):
            return False
        self.log.message(f"{self.stop.signal_name or 'a stop signal'} received: step {end.global_step} is finished; "
                         "saving checkpoints/last.ckpt, then exiting")
        self.stop.requested = True      # on the ranks that got no signal themselves
        return True


class TimeLimit(Callback):
    """Ends training once ``limit_s`` seconds have passed since ``started`` (e.g. the demo's
    few minutes), on every rank together."""

    def __init__(self, limit_s: float, started: float, log: RunLogger, device: torch.device):
        self.limit_s, self.started, self.log, self.device = limit_s, started, log, device

    def after_step(self, trainer, end: StepEnd) -> bool:
        if not any_rank(time.time() - self.started > self.limit_s, self.device):
            return False
        self.log.message(f"time limit of {self.limit_s:.0f}s reached at step {end.global_step}")
        return True


__all__ = ["StepEnd", "Callback", "MetricsWindow", "ImageGrids", "PeriodicCheckpoint", "GracefulStop",
           "StopOnSignal", "TimeLimit"]
