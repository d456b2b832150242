"""LeCAM regularisation of the discriminator (opt-in ``lecam_weight``, off by default).

Tseng, Jiang, Liu, Yang, Yang, "Regularizing Generative Adversarial Networks under Limited
Data" (CVPR 2021), eq. 3, as the authors' code computes it (google/lecam-gan,
``stylegan2/lecam_loss.py``): keep exponential moving averages a_R, a_F of the batch-mean
discriminator outputs on real and fake images (decay 0.99, zero-debiased), updated with the
current batch first, and add

    R_LC = mean(relu(D(x) - a_F)^2) + mean(relu(a_R - D(G(z)))^2)

times ``lecam_weight`` to the discriminator loss.  (The paper writes the squared distances
without the relu; the released code keeps only the side where the discriminator is more
confident than the anchors, and so does this module.)  MaskBit (Weber et al. 2024) used it
with weight 0.001 as part of the recipe that took rFID from 2.40 to 1.66.

State: three buffers (``ema_real``, ``ema_fake`` -- the biased averages -- and ``count``,
the number of updates, for the debiasing).  They live in the loss calculator, not in the
discriminator, so the discriminator's state-dict keys stay taming's; the trainer saves them
in the checkpoint's ``loss`` entry next to ``discriminator.*`` (``running_state``) and
restores them on ``--resume``, so a resumed run continues the same averages.  Under
torchrun the batch means are averaged over ranks before the update, so every rank holds the
same anchors.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from adapters.distributed import all_reduce_sum_, world_size

DEFAULT_LECAM_DECAY = 0.99     # the authors' decay of the anchors' moving averages


class LeCAM(nn.Module):
    """The anchors' moving averages and the regulariser (module docstring)."""

    def __init__(self, weight: float, decay: float = DEFAULT_LECAM_DECAY):
        super().__init__()
        self.weight = float(weight)
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Fold this step's batch means (averaged over ranks) into the moving averages."""
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        means = all_reduce_sum_(means.double()) / world_size()
        self.ema_real.mul_(self.decay).add_((1.0 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1.0 - self.decay) * means[1])
        self.count.add_(1)

    def anchors(self) -> torch.Tensor:
        """``(a_R, a_F)``: the zero-debiased averages (0 before the first update)."""
        # On the device, without reading the count back (no host sync per step; the memory
        # estimate runs this on meta tensors).
        count = self.count.to(torch.float64)
        debias = 1.0 - torch.full_like(count, self.decay).pow(count)
        averages = torch.stack([self.ema_real, self.ema_fake])
        return torch.where(count > 0, averages / debias.clamp_min(1e-300), torch.zeros_like(averages))

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """R_LC against the current anchors (unweighted)."""
        a_real, a_fake = (a.float() for a in self.anchors())
        return (F.relu(logits_real.float() - a_fake).pow(2).mean()
                + F.relu(a_real - logits_fake.float()).pow(2).mean())

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``lecam_weight * R_LC``; with ``update`` (training steps) the anchors take this batch first."""
        if update:
            self.update(logits_real, logits_fake)
        return self.weight * self.penalty(logits_real, logits_fake)


def running_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The buffers of every :class:`LeCAM` inside ``module``, keyed by their state-dict names."""
    return {f"{name}.{key}": value for name, sub in module.named_modules() if isinstance(sub, LeCAM)
            for key, value in sub.named_buffers(recurse=False)}


def load_running_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Copy ``state`` (as :func:`running_state` names it) into ``module``'s LeCAM buffers.

    Returns the names ``module`` has and ``state`` lacks (they keep their fresh values)."""
    missing = []
    for key, buffer in running_state(module).items():
        if key in state:
            buffer.copy_(state[key].to(buffer))
        else:
            missing.append(key)
    return missing
