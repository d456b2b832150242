"""PatchGAN pieces shared by every loss family.

The discriminator is taming's own ``NLayerDiscriminator`` (Isola et al. 2017, pix2pix
PatchGAN) with taming's ``weights_init``; the hinge / vanilla losses and the adaptive
weight follow Esser et al. 2021 (VQGAN, eq. 7): lambda = |grad_L(nll)| / (|grad_L(g)| + 1e-4)
at the decoder's last layer L, clamped to [0, 1e4], times ``disc_weight``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from adapters.registry import MAX_WIDTH, int_findings
from train.errors import ERROR, Finding, is_int


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


# PatchGAN depth: each of n_layers stride-2 convolutions halves the crop, then two stride-1
# 4x4 convolutions each take one pixel off; at least one output pixel must remain.
MAX_DISC_LAYERS = 8


def patchgan_findings(prefix: str, in_channels: Any, n_layers: Any, ndf: Any, image_size: Any) -> List[Finding]:
    """Discriminator sizes the PatchGAN can be built with and run on ``image_size`` crops.

    ``prefix`` is where the settings live (``lossconfig.params`` or ``model_args``); None
    values are the defaults and not checked."""
    out: List[Finding] = []
    names = {"in": "disc_in_channels", "layers": "disc_num_layers", "ndf": "disc_ndf" if "loss" in prefix
             else "disc_dim"}
    if in_channels is not None:
        int_findings(out, f"{prefix}.{names['in']}", in_channels, 1, 64, "the discriminator's input channels")
    if ndf is not None:
        int_findings(out, f"{prefix}.{names['ndf']}", ndf, 1, MAX_WIDTH, "the discriminator's width")
    if n_layers is not None and int_findings(out, f"{prefix}.{names['layers']}", n_layers, 0, MAX_DISC_LAYERS,
                                             "the discriminator's depth") and is_int(image_size) and image_size > 0:
        if image_size // (2 ** n_layers) - 2 < 1:
            fit_layers = max(0, (image_size // 3).bit_length() - 1)
            out.append(Finding(ERROR, f"{prefix}.{names['layers']}", "disc_too_deep",
                               f"{n_layers} discriminator layers halve a {image_size}-pixel crop {n_layers} times: "
                               "no output pixel is left for the PatchGAN's last convolutions",
                               f"use {names['layers']}: {fit_layers} or fewer (or larger crops)"))
    return out


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
