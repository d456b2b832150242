"""PatchGAN pieces shared by every loss family.

The discriminator is taming's own ``NLayerDiscriminator`` (Isola et al. 2017, pix2pix
PatchGAN) with taming's ``weights_init``; the hinge / vanilla losses and the adaptive
weight follow Esser et al. 2021 (VQGAN, eq. 7): lambda = |grad_L(nll)| / (|grad_L(g)| + 1e-4)
at the decoder's last layer L, clamped to [0, 1e4], times ``disc_weight``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: Dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def get_d_loss(name: str) -> Callable:
    if name not in D_LOSSES:
        raise ValueError(f"unknown disc_loss {name!r}; valid choices: {', '.join(sorted(D_LOSSES))}")
    return D_LOSSES[name]


def build_discriminator(in_channels: int = 3, n_layers: int = 3, ndf: int = 64,
                        use_actnorm: bool = False) -> nn.Module:
    """taming's PatchGAN discriminator, initialised exactly as taming does."""
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    return NLayerDiscriminator(input_nc=in_channels, n_layers=n_layers, use_actnorm=use_actnorm,
                               ndf=ndf).apply(weights_init)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (detached)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


def disc_factor_at(disc_factor: float, global_step: int, disc_start: int, use_gan: bool) -> float:
    """taming's ``adopt_weight``: 0 before ``disc_start``; and 0 whenever the GAN is off."""
    if not use_gan or global_step < disc_start:
        return 0.0
    return float(disc_factor)


class requires_grad_off:
    """Context manager: freeze a module's parameters (so no gradient reaches them)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters()] if module is not None else []
        self.saved = []

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.saved):
            p.requires_grad_(flag)
        return False
