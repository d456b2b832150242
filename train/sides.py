"""The two sides of GAN training: one small object per network that an optimizer trains.

    python -m train fit configs/demo_emavq.json --data builtin --max-steps 100

LlamaGen's ``vq_train.py`` shape: the generator side and the discriminator side run the
same lines, ``zero_grad -> (autocast forward) -> backward(loss) -> unscale_and_clip ->
step``.  A side holds its network, its trainable parameters, its optimizer (built by
``train.optimizer.build_optimizer``, the function ``migrate`` uses too), its fp16
``GradScaler`` (None in fp32 / bf16) and the clip value.

``make_sides`` is the one place that decides whether there is a discriminator: the
discriminator side is None when ``use_gan`` is false (or the loss has no discriminator), and
then no discriminator optimizer or scaler exists, so none is ever stepped or checkpointed.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from losses.calculator import LossCalculator
from train.optimizer import build_optimizer
from train.rank_sync import average_across_ranks_


def autocast(precision: str, device: torch.device):
    """The forward's mixed-precision context (a no-op in fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class Side:
    """One network's optimizer, GradScaler (fp16) or None, parameters and clip value.

    ``average_across_ranks``: gradients and float buffers are averaged over torchrun ranks
    by hand (the discriminator: DDP wraps only the model, which it averages itself).
    """

    def __init__(self, name: str, module: nn.Module, params: List[nn.Parameter],
                 optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                 clip: Optional[float], average_across_ranks: bool = False):
        self.name = name
        self.module = module
        self.params = params
        self.optimizer = optimizer
        self.scaler = scaler
        self.clip = clip
        self.average_across_ranks = average_across_ranks
        self._unscaled = False      # fp16: unscale_ ran since the scaler's last update

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_and_clip(self) -> torch.Tensor:
        """Average over ranks (when asked), unscale (fp16), clip to ``clip`` when set;
        returns the gradient norm before clipping, as a device tensor (never read here: the
        loop's step vote checks it with everything else, in one host read)."""
        if self.average_across_ranks:
            average_across_ranks_([p.grad for p in self.params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.params[0].device)
        if self.clip is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        return torch.nn.utils.get_total_norm(grads)

    def step(self, grads_finite: bool) -> None:
        """The optimizer step, after :meth:`unscale_and_clip` and the vote's read.

        fp16: ``grads_finite`` (the unscaled gradient norm was finite) decides what
        ``GradScaler.step`` would decide from its own inf check, without its host read of
        that check: step only with finite gradients; ``update`` then lowers the scale after
        inf gradients or grows it after enough finite ones, from the check ``unscale_``
        recorded on the device.
        """
        if self.scaler is not None:
            if grads_finite:
                self.optimizer.step()
            self.scaler.update()
            self._unscaled = False
        else:
            self.optimizer.step()
        if self.average_across_ranks:
            # BatchNorm statistics of the PatchGAN: keep them equal on every rank.
            average_across_ranks_([b for b in self.module.buffers() if b.is_floating_point()])

    def skip(self) -> None:
        """A step the guard undoes: drop the gradients.  fp16: a scaler that unscaled this
        step's (non-finite) gradients sees them in ``update`` and lowers its scale, as its
        own ``step`` would have; no optimizer step runs."""
        if self.scaler is not None and self._unscaled:
            self.scaler.update()
        self.zero_grad()


def make_sides(model: nn.Module, calc: LossCalculator, train_cfg, lr: float,
               precision: str) -> Tuple[Side, Optional[Side]]:
    """``(generator side, discriminator side or None)``.

    The discriminator side trains the loss's discriminator, and exists only when ``use_gan``
    is on and the loss has one with parameters.  The generator side trains
    ``model.generator_parameters()`` (EMA codebooks are updated by EMA, never by Adam); the
    model's other parameters get no gradient at all (and DDP does not wait for them).
    """
    t = train_cfg
    clip = float(t.grad_clip) if t.grad_clip is not None else None
    fp16 = precision == "fp16"
    gen_params = list(model.generator_parameters())
    owned = {id(p) for p in gen_params}
    for p in model.parameters():
        if id(p) not in owned:
            p.requires_grad_(False)
    gen = Side("generator", model, gen_params,
               build_optimizer(model, gen_params, lr, float(t.weight_decay), t.adam_betas),
               torch.amp.GradScaler("cuda") if fp16 else None, clip)
    discriminator = calc.discriminator if calc.use_gan else None
    disc_params = list(discriminator.parameters()) if discriminator is not None else []
    if not disc_params:
        return gen, None
    disc = Side("discriminator", discriminator, disc_params,
                build_optimizer(discriminator, disc_params, lr, float(t.weight_decay), t.adam_betas),
                torch.amp.GradScaler("cuda") if fp16 else None, clip, average_across_ranks=True)
    return gen, disc


def each(*sides: Optional[Side]) -> Sequence[Side]:
    """The sides that exist (the discriminator side may be None)."""
    return [s for s in sides if s is not None]


__all__ = ["Side", "make_sides", "autocast", "each"]
