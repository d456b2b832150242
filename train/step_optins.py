"""The per-step training opt-ins, behind one small object the trainer calls twice a step.

    python -m train fit configs/modern_recipe.yaml --data builtin

* ``before_step(step)`` -> ``{log name: value}``: sets both optimizers' learning rate from
  the schedule (``train/lr_schedule.py``; untouched with the defaults), logged as ``train/lr``;
* ``after_step(step, bad, images)``: after the optimizer steps -- the generator's weight EMA
  (``train/weight_ema.py``) and the dead-code restart (``train/dead_codes.py``);
  ``observe(codes)`` counts each micro-batch's codes for the latter.

Each is None when its key is off, so a legacy config runs no code here at all.  Nothing in
the hot path reads a value back to the host.  ``state_dict`` / ``load_state_dict``: what the
checkpoint keeps (``model_ema``, ``dead_codes``); the schedule needs nothing (a function of
the step).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from train.dead_codes import DeadCodeRestart
from train.lr_schedule import is_active, lr_factor, set_lr
from train.weight_ema import WeightEMA


class StepOptIns:
    def __init__(self, model: nn.Module, train_cfg, lr: float, max_steps: Optional[int],
                 optimizers: Sequence[torch.optim.Optimizer], device: torch.device):
        t = train_cfg
        self.peak_lr, self.max_steps = float(lr), max_steps
        self.optimizers = list(optimizers)
        self.schedule = (str(t.lr_schedule), int(t.warmup_steps), float(t.min_lr_ratio)) if is_active(t) else None
        # After make_sides: requires_grad marks the generator's parameters.
        self.ema = WeightEMA(model, float(t.ema_decay)).to(device) if t.ema_decay is not None else None
        self.dead = (DeadCodeRestart(model, float(t.dead_code_threshold), int(t.dead_code_every), int(t.seed), device)
                     if t.dead_code_threshold is not None else None)
        self.restarts: List[str] = []

    @property
    def any(self) -> bool:
        return self.schedule is not None or self.ema is not None or self.dead is not None

    def lr_at(self, step: int) -> float:
        schedule, warmup, min_ratio = self.schedule
        return self.peak_lr * lr_factor(step, schedule, warmup, self.max_steps, min_ratio)

    def before_step(self, step: int) -> Dict[str, float]:
        if self.schedule is None:
            return {}
        lr = self.lr_at(step)
        set_lr(self.optimizers, lr)
        return {"train/lr": lr}

    def observe(self, codes: Sequence[torch.Tensor]) -> None:
        if self.dead is not None:
            self.dead.observe(codes)

    def after_step(self, step: int, bad: bool, images: Optional[torch.Tensor]) -> int:
        """``step``: steps finished, this one included.  A skipped (bad) step changes nothing
        but the dead-code counts of its micro-batches, which are dropped."""
        if bad:
            if self.dead is not None:
                for acc in self.dead._counts:
                    acc.zero_()
            return 0
        if self.ema is not None:
            self.ema.update()
        return self.dead.after_step(step, images) if self.dead is not None else 0

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        out = {}
        if self.ema is not None:
            out["model_ema"] = self.ema.state_dict()
        if self.dead is not None:
            out["dead_codes"] = self.dead.state_dict()
        return out

    def load_state_dict(self, state: Dict, notes: List[str]) -> None:
        """Restore from a checkpoint's entries; missing ones start fresh (with a note)."""
        for key, part in (("model_ema", self.ema), ("dead_codes", self.dead)):
            if part is None:
                if state.get(key):
                    notes.append(f"the checkpoint's {key} state is not used (its opt-in is off now)")
                continue
            if state.get(key):
                part.load_state_dict(state[key])
            else:
                notes.append(f"the checkpoint has no {key} state: it starts fresh"
                             + (" from the current weights" if key == "model_ema" else ""))


__all__ = ["StepOptIns"]
