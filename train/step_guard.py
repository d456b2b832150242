"""The non-finite-step guard: a step with a NaN / inf loss or gradient changes nothing.

    python -m train fit CONFIG --data /images train.max_bad_steps=5

Before each step the guard copies the float buffers that a forward changes (EMA codebooks,
BatchNorm statistics; they are small).  A non-finite loss or gradient skips the whole step:
gradients are dropped and the buffers put back, so the weights and codebooks stay the last
good ones.  Skipped steps are counted (the count is saved in checkpoints); ``max_bad_steps``
in a row stop the run with a message.  Under torchrun a non-finite loss on any rank is a
bad step on every rank (agreed first, so no rank waits in a collective the others skipped).
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch

from train.rank_sync import any_rank
from train.sides import Side


class StepGuard:
    def __init__(self, buffers: List[torch.Tensor], device: torch.device, max_bad_steps: int, scaled: bool):
        self.buffers = buffers
        self.device = device
        self.max_bad_steps = int(max_bad_steps)
        # fp16: the grad scaler skips steps with inf gradients itself (that is how it finds
        # its scale), so only fp32 / bf16 count non-finite gradient norms as bad steps.
        self.scaled = scaled
        self.total = 0          # bad steps over the whole run (resumed runs continue the count)
        self.in_a_row = 0
        self._saved: List[torch.Tensor] = []

    def snapshot(self) -> None:
        self._saved = [b.detach().clone() for b in self.buffers]

    def finite(self, loss: torch.Tensor) -> bool:
        """False when ``loss`` is non-finite on any rank (a collective: every rank calls it)."""
        return not any_rank(not bool(torch.isfinite(loss).all()), self.device)

    def norms_finite(self, norms: Iterable[float]) -> bool:
        # No collective needed: gradients are already averaged, so every rank sees the same norms.
        return self.scaled or all(math.isfinite(n) for n in norms)

    def skip(self, step: int, sides: Iterable[Side]) -> str:
        """Undo what step ``step`` changed and count it; returns the line to log."""
        with torch.no_grad():
            for b, saved in zip(self.buffers, self._saved):
                b.copy_(saved)
        for side in sides:
            side.zero_grad()
        self.in_a_row += 1
        self.total += 1
        return (f"step {step + 1}: non-finite loss or gradient, step skipped "
                f"({self.in_a_row} in a row, {self.total} in total)")

    def passed(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_bad_steps

    def stop_message(self, last_checkpoint: str) -> str:
        return (f"training stopped: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient (train.max_bad_steps={self.max_bad_steps}); the last good weights are saved "
                f"in {last_checkpoint}. Lower train.learning_rate, set train.grad_clip, "
                "or use train.precision=fp32")


__all__ = ["StepGuard"]
