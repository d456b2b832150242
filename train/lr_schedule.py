"""``train.lr_schedule`` / ``train.warmup_steps`` / ``train.min_lr_ratio``: the learning rate by step.

    python -m train fit CONFIG --data /images train.lr_schedule=cosine train.warmup_steps=500 \
        train.max_steps=20000 train.min_lr_ratio=0.1

Linear warmup from 0 to the peak learning rate over ``warmup_steps`` optimizer steps, then
either constant or a half-cosine down to ``min_lr_ratio x peak`` at ``max_steps`` (Loshchilov &
Hutter 2017, "SGDR", without restarts; the warmup of Goyal et al. 2017).  MaskBit (Weber et
al. 2024) and LlamaGen train their tokenizers this way.  The value is a pure function of the
step, so a resumed run continues the schedule exactly without saving any state, and both
optimizers (generator and discriminator) follow the same curve.

With the defaults (``constant``, no warmup) the trainer never touches the optimizers' learning
rate, so a legacy config trains exactly as before.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: Optional[int], min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (the first step
    already learns a little; the last warmup step reaches 1).  Cosine after it: ``min_lr_ratio
    + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 (end of warmup) to 1
    (step ``max_steps``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps is None:
        return 1.0
    span = max(int(max_steps) - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def is_active(train_cfg) -> bool:
    """Whether the config asks for any schedule (else the learning rate is never touched)."""
    return str(train_cfg.lr_schedule) != "constant" or int(train_cfg.warmup_steps) > 0


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Give every parameter group of ``optimizers`` the learning rate ``lr`` (host floats: no sync)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


__all__ = ["lr_factor", "is_active", "set_lr", "SCHEDULES"]
