"""PatchGAN pieces shared by every loss family.

The discriminator is taming's own ``NLayerDiscriminator`` (Isola et al. 2017, pix2pix
PatchGAN) with taming's ``weights_init``; the hinge / vanilla losses and the adaptive
weight follow Esser et al. 2021 (VQGAN, eq. 7): lambda = |grad_L(nll)| / (|grad_L(g)| + 1e-4)
at the decoder's last layer L, clamped to [0, 1e4], times ``disc_weight``.

Generator losses (``generator_loss``, LlamaGen's names, ``tokenizer_image/vq_loss.py``):
``hinge`` is taming's ``-mean(D(x_rec))`` (the default); ``non_saturating`` is
Goodfellow et al. 2014's ``-log sigmoid(D(x_rec))`` = ``softplus(-D(x_rec))``, averaged.
The adversarial opt-ins every family shares (``generator_loss``, ``lecam_weight``,
``lecam_ema_decay``; ``losses/lecam.py``) are checked by :func:`adversarial_findings`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapters.registry import MAX_WIDTH, int_findings, number_findings
from losses.lecam import DEFAULT_LECAM_DECAY, LeCAM
from train.errors import ERROR, WARNING, Finding, is_int


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: Dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def get_d_loss(name: str) -> Callable:
    if name not in D_LOSSES:
        raise ValueError(f"unknown disc_loss {name!r}; valid choices: {', '.join(sorted(D_LOSSES))}")
    return D_LOSSES[name]


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -torch.mean(logits_fake)


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


G_LOSSES: Dict[str, Callable] = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}
# The adversarial opt-ins and their defaults (off: taming's generator loss, no LeCAM).
ADVERSARIAL_DEFAULTS: Dict[str, Any] = {"generator_loss": "hinge", "lecam_weight": 0.0,
                                        "lecam_ema_decay": DEFAULT_LECAM_DECAY}
MAX_LECAM_WEIGHT = 1e3


def get_g_loss(name: str) -> Callable:
    if name not in G_LOSSES:
        raise ValueError(f"unknown generator_loss {name!r}; valid choices: {', '.join(G_LOSSES)}")
    return G_LOSSES[name]


def build_lecam(lecam_weight: Any, lecam_ema_decay: Any = DEFAULT_LECAM_DECAY) -> Optional[LeCAM]:
    """The LeCAM regulariser, or None when ``lecam_weight`` is 0 (the default: nothing built)."""
    weight = float(lecam_weight or 0.0)
    return LeCAM(weight, float(lecam_ema_decay)) if weight > 0 else None


def regularised_d_loss(d_loss: torch.Tensor, lecam: Optional[LeCAM], logits_real: torch.Tensor,
                       logits_fake: torch.Tensor, factor: float, update: bool):
    """``(factor * (d_loss + LeCAM term), LeCAM term)``; without LeCAM ``(factor * d_loss, None)``.

    ``update``: the anchors take this batch (training steps only, not evaluation)."""
    if lecam is None:
        return factor * d_loss, None
    reg = lecam(logits_real, logits_fake, update=update)
    return factor * (d_loss + reg), reg


def adversarial_findings(prefix: str, params: Dict[str, Any], use_gan: bool = True) -> List[Finding]:
    """``generator_loss`` one of :data:`G_LOSSES`, ``lecam_weight`` a number in [0, 1e3],
    ``lecam_ema_decay`` in (0, 1); a warning when they are set but no GAN runs."""
    out: List[Finding] = []
    name = params.get("generator_loss")
    if name is not None and name not in G_LOSSES:
        close = str(name).strip().lower().replace("-", "_").replace(" ", "_") if isinstance(name, str) else None
        out.append(Finding(ERROR, f"{prefix}.generator_loss", "bad_value",
                           f"{prefix}.generator_loss {name!r} is unknown; valid choices: {', '.join(G_LOSSES)}",
                           f"write generator_loss: {close}" if close in G_LOSSES else
                           "use hinge (taming's -mean(D(x_rec)), the default) or non_saturating "
                           "(softplus(-D(x_rec)))",
                           [(f"{prefix}.generator_loss", close)] if close in G_LOSSES else []))
    if params.get("lecam_weight") is not None:
        number_findings(out, f"{prefix}.lecam_weight", params["lecam_weight"], 0.0, MAX_LECAM_WEIGHT,
                        "the LeCAM weight (0: off; MaskBit uses 0.001)")
    if params.get("lecam_ema_decay") is not None:
        decay = params["lecam_ema_decay"]
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 < decay < 1.0):
            out.append(Finding(ERROR, f"{prefix}.lecam_ema_decay", "bad_value" if is_int(decay) or
                               isinstance(decay, float) else "bad_type",
                               f"{prefix}.lecam_ema_decay is {decay!r}; the decay of LeCAM's moving averages must "
                               "be a number strictly between 0 and 1",
                               f"write lecam_ema_decay: {DEFAULT_LECAM_DECAY} (the authors' value)",
                               [(f"{prefix}.lecam_ema_decay", DEFAULT_LECAM_DECAY)]))
    on = [k for k, default in ADVERSARIAL_DEFAULTS.items()
          if k != "lecam_ema_decay" and params.get(k) not in (None, default)]
    if on and not use_gan and not any(f.level == ERROR for f in out):
        out.append(Finding(WARNING, f"{prefix}.{on[0]}", "adversarial_without_gan",
                           f"{' and '.join(on)} change the GAN, but this config trains without one (use_gan is false)",
                           f"remove {' and '.join(on)}, or turn the GAN on"))
    return out


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
