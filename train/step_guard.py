"""The non-finite-step guard: a step with a NaN / inf loss or gradient changes nothing.

    python -m train fit CONFIG --data /images train.max_bad_steps=5

Before each step the guard copies the buffers that a forward changes (EMA codebooks,
BatchNorm statistics and counts) into copies it allocated once (no allocation per step).  During the
step it only raises flags on the step's :class:`~train.rank_sync.StepVote` (the losses of
both networks on every micro-batch, then each network's gradient norm), never reading a
value on the host; the loop reads the vote once, after both backward passes.  A
non-finite loss or gradient on any rank then skips the whole step on every rank: gradients
are dropped and the buffers put back, so the weights and codebooks stay the last good
ones.  Skipped steps are counted (the count is saved in checkpoints); ``max_bad_steps`` in
a row stop the run with a message.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch

from train.rank_sync import StepVote
from train.sides import Side

# The vote's flag for a non-finite loss (either network, any micro-batch, any rank).
LOSS_FLAG = "non_finite_loss"


def grad_flag(side: Side) -> str:
    """The vote's flag for a non-finite gradient norm of ``side``."""
    return f"non_finite_grad/{side.name}"


class StepGuard:
    def __init__(self, buffers: List[torch.Tensor], max_bad_steps: int, scaled: bool):
        self.buffers = buffers
        self.max_bad_steps = int(max_bad_steps)
        # fp16: the grad scaler skips steps with inf gradients itself (that is how it finds
        # its scale), so only fp32 / bf16 count non-finite gradient norms as bad steps.
        self.scaled = scaled
        self.total = 0          # bad steps over the whole run (resumed runs continue the count)
        self.in_a_row = 0
        self._saved: Optional[List[torch.Tensor]] = None

    @staticmethod
    def flags(sides: Sequence[Side]) -> List[str]:
        """The vote flags the guard raises for these sides."""
        return [LOSS_FLAG] + [grad_flag(s) for s in sides]

    def snapshot(self) -> None:
        """Copy the buffers into the guard's own copies (allocated at the first call)."""
        if not self.buffers:
            return
        with torch.no_grad():
            if self._saved is None:
                self._saved = [b.detach().clone() for b in self.buffers]
            else:
                torch._foreach_copy_(self._saved, [b.detach() for b in self.buffers], non_blocking=True)

    def watch_loss(self, vote: StepVote, loss: torch.Tensor) -> None:
        vote.raise_if_nonfinite(LOSS_FLAG, loss)

    def watch_norm(self, vote: StepVote, side: Side, norm: torch.Tensor) -> None:
        # Gradients are averaged over ranks before their norm, so every rank sees the same one.
        vote.raise_if_nonfinite(grad_flag(side), norm)

    def is_bad(self, verdict: Dict[str, bool], stepping: Iterable[Side]) -> bool:
        """Whether the vote's ``verdict`` makes this a bad step (the same on every rank)."""
        return verdict[LOSS_FLAG] or (not self.scaled and any(verdict[grad_flag(s)] for s in stepping))

    def skip(self, step: int, sides: Iterable[Side]) -> str:
        """Undo what step ``step`` changed and count it; returns the line to log."""
        if self._saved is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self._saved)
        for side in sides:
            side.skip()
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


__all__ = ["StepGuard", "LOSS_FLAG", "grad_flag"]
