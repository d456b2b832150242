"""What happens around the training steps: logs, image grids, checkpoints, signals, time limit.

    python -m train fit CONFIG --data /images train.log_every=50 train.ckpt_every=5000

Small objects the loop calls at fixed points (minGPT's callbacks, not a framework): every
callback's ``after_step(trainer, end)`` runs once after every step, in list order, on every
rank; one that returns True ends training after that step (those after it are not asked).
A callback whose decision must be the same on every rank (the stop checks) names a
``vote`` flag: the loop asks its ``wants_stop`` on each rank before the step's one vote
(``train/rank_sync.py``'s ``StepVote``) and hands back in ``end.votes`` whether any rank
wanted it, so these checks add no collective and no host read of their own.  The metrics
window's collective (code counts) runs on every rank at the same log steps.
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
    votes: Dict[str, bool] = field(default_factory=dict)      # the step's vote: raised on any rank


class Callback:
    # The name of this callback's flag in the step vote, or None when it has none.
    vote: Optional[str] = None

    def wants_stop(self, trainer) -> bool:
        """This rank's wish, raised in the step vote (callbacks with a ``vote`` only)."""
        return False

    def after_step(self, trainer, end: StepEnd) -> bool:
        """Runs after every step; True ends training."""
        return False


class MetricsWindow(Callback):
    """Loss logs, gradient norms and code counts averaged over ``log_every`` steps, written
    with learning rates, ``disc_factor``, throughput and counters (skipped steps do not count).

    Sums stay on the device between log lines; a log line reads them all in one copy."""

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

    def add_step(self, logs: List[Dict[str, torch.Tensor]], norms: Dict[str, torch.Tensor],
                 codes: Sequence[Sequence[torch.Tensor]] = ()) -> None:
        """A step that was taken: its micro-batches' loss logs and codes, its gradient norms."""
        for step_log in logs:
            for k, v in step_log.items():
                self._add(k, torch.as_tensor(v).detach().float().mean().to(self.device))
        for k, v in norms.items():
            self._add(k, torch.as_tensor(v).detach().float().to(self.device))
        for micro_codes in codes:
            self.codes.add(micro_codes)

    def _means(self) -> Dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        sums = torch.stack([self.sums[k] for k in keys]).tolist()     # one host read
        return {k: total / self.counts[k] for k, total in zip(keys, sums)}

    def after_step(self, trainer, end: StepEnd) -> bool:
        self.images += trainer.images_per_step
        log_now = end.global_step % self.log_every == 0 or end.finished
        values: Dict[str, float] = {}
        if log_now:
            values = self._means()
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
    """Ends training after the step in whose vote any rank had received SIGTERM / SIGINT."""

    vote = "stop_signal"

    def __init__(self, stop: GracefulStop, log: RunLogger):
        self.stop, self.log = stop, log

    def wants_stop(self, trainer) -> bool:
        return self.stop.requested

    def after_step(self, trainer, end: StepEnd) -> bool:
        if not end.votes.get(self.vote):
            return False
        self.log.message(f"{self.stop.signal_name or 'a stop signal'} received: step {end.global_step} is finished; "
                         "saving checkpoints/last.ckpt, then exiting")
        self.stop.requested = True      # on the ranks that got no signal themselves
        return True


class TimeLimit(Callback):
    """Ends training once ``limit_s`` seconds have passed since ``started`` (e.g. the demo's
    few minutes), on every rank together."""

    vote = "time_limit"

    def __init__(self, limit_s: float, started: float, log: RunLogger):
        self.limit_s, self.started, self.log = limit_s, started, log

    def wants_stop(self, trainer) -> bool:
        return time.time() - self.started > self.limit_s

    def after_step(self, trainer, end: StepEnd) -> bool:
        if not end.votes.get(self.vote):
            return False
        self.log.message(f"time limit of {self.limit_s:.0f}s reached at step {end.global_step}")
        return True


__all__ = ["StepEnd", "Callback", "MetricsWindow", "ImageGrids", "PeriodicCheckpoint", "GracefulStop",
           "StopOnSignal", "TimeLimit"]
