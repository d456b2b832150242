"""The ``vqvae2`` loss family: VQ-VAE-2's objective, with optional LPIPS and PatchGAN terms.

Generator loss (rosinality/vq-vae-2-pytorch ``train_vqvae.py``: MSE + 0.25 x latent loss;
the optional terms follow taming's ``VQLPIPSWithDiscriminator``, Esser et al. 2021)::

    nll   = pixelloss_weight * MSE(xrec, x) + perceptual_weight * LPIPS(x, xrec)
    total = nll + latent_loss_weight * latent_loss
          + d_weight * disc_factor * g_loss          (g_loss = -mean D(xrec))

Opt-ins (off by default, ``losses/gan.py``): ``generator_loss: non_saturating`` makes
``g_loss = mean softplus(-D(xrec))``; ``lecam_weight > 0`` adds LeCAM's regulariser to the
discriminator loss, its moving averages in this calculator's ``lecam.*`` buffers.

``d_weight`` is VQGAN's adaptive weight at the model's last decoder layer.  When the GAN
term is zero (``use_gan: false`` or ``global_step < disc_start``) the discriminator is not
run and the adaptive weight's gradients are not taken: the loss value is what it would be
with the term multiplied by 0, for less work.  With ``use_gan: false`` no discriminator
is built at all.

Accepted ``lossconfig.params`` are the fields of :class:`VQVAE2Loss` (the class the
family's ``lossconfig.target``, ``losses.vqvae2_loss.VQVAE2Loss``, names); ``train`` gives
``use_gan``, ``disc_update_every``, ``vgg_ckpt_path`` and ``allow_random_vgg``.

    calc = LossCalculator.from_config(cfg)        # cfg.model_type == "vqvae2"
    out = calc.generator_step(model, {"image": x}, global_step)
    if calc.should_update_discriminator(global_step):
        d_loss, d_log = calc.discriminator_step(out, global_step)
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapters.registry import get_model_type, loss_target_rule, register_loss_implementation
from losses import gan
from losses.calculator import GeneratorOutput, LossCalculator, constructor_parameters, param_findings
from losses.perceptual import build_taming_lpips
from train.errors import DELETE, ERROR, Finding, UserError, is_number, raise_for_errors
from train.schema import DataSection, as_dict, config_data

log = logging.getLogger(__name__)


@dataclass
class VQVAE2Loss:
    """The accepted ``lossconfig.params`` of the vqvae2 family, with their defaults."""

    # Weight of the latent (commitment) loss; rosinality's train_vqvae.py uses 0.25.
    latent_loss_weight: float = 0.25
    # Weight of the pixel MSE reconstruction loss (rosinality: 1).
    pixelloss_weight: float = 1.0
    # Weight of taming's LPIPS; 0 (rosinality's objective) needs no VGG file.
    perceptual_weight: float = 0.0
    # Global step from which the GAN term and discriminator updates start.
    disc_start: int = 0
    # Multiplier of the adaptive GAN weight (taming's disc_weight).
    disc_weight: float = 1.0
    # GAN term factor once started (taming's disc_factor); forced to 0 by use_gan: false.
    disc_factor: float = 1.0
    # PatchGAN: input channels, depth, base width, ActNorm instead of BatchNorm.
    disc_in_channels: int = 3
    disc_num_layers: int = 3
    disc_ndf: int = 64
    use_actnorm: bool = False
    # Discriminator loss: hinge | vanilla.
    disc_loss: str = "hinge"
    # Generator GAN loss: hinge (taming's -mean D(xrec)) | non_saturating (softplus(-D(xrec))).
    generator_loss: str = "hinge"
    # LeCAM regularisation of the discriminator (Tseng et al. 2021): weight (0 = off) and the
    # decay of its moving averages.
    lecam_weight: float = 0.0
    lecam_ema_decay: float = 0.99


def vqvae2_param_rules(data: Dict[str, Any]) -> List[Finding]:
    """``lossconfig.params`` of a vqvae2 config: :class:`VQVAE2Loss` names, number / integer /
    bool types, ranges, the discriminator loss, and the discriminator's input width."""
    raw = (data.get("lossconfig") or {}).get("params") or {}
    fields = {f.name: f for f in dataclasses.fields(VQVAE2Loss)}
    out = param_findings("vqvae2", raw, constructor_parameters(VQVAE2Loss), check_types=False)
    for name, f in fields.items():
        if name not in raw:
            continue
        value, path = raw[name], f"lossconfig.params.{name}"
        if f.type in ("float", "int"):
            if not is_number(value):
                out.append(Finding(ERROR, path, "bad_type", f"{path} must be a number, got {value!r}",
                                   f"write {name}: {getattr(VQVAE2Loss, name)!r}", [(path, DELETE)]))
            elif not value >= 0 or value == float("inf"):     # NaN fails >= too
                out.append(Finding(ERROR, path, "bad_value", f"{path} must be a finite number >= 0, got {value!r}",
                                   f"write {name}: {getattr(VQVAE2Loss, name)!r}", [(path, DELETE)]))
            elif f.type == "int" and int(value) != value:
                out.append(Finding(ERROR, path, "bad_type", f"{path} must be an integer, got {value!r}",
                                   f"write {name}: {int(value)}", [(path, int(value))]))
            elif name in ("disc_in_channels", "disc_num_layers", "disc_ndf") and value < 1:
                out.append(Finding(ERROR, path, "bad_value", f"{path} must be >= 1, got {value}",
                                   f"write {name}: {getattr(VQVAE2Loss, name)!r}", [(path, DELETE)]))
        elif f.type == "bool" and not isinstance(value, bool):
            out.append(Finding(ERROR, path, "bad_type", f"{path} must be true or false, got {value!r}",
                               "write true or false", [(path, DELETE)]))
    disc_loss = raw.get("disc_loss", VQVAE2Loss.disc_loss)
    if disc_loss not in gan.D_LOSSES:
        out.append(Finding(ERROR, "lossconfig.params.disc_loss", "bad_value",
                           f"lossconfig.params.disc_loss {disc_loss!r} is unknown; valid choices: "
                           f"{', '.join(sorted(gan.D_LOSSES))}", f"use one of {', '.join(sorted(gan.D_LOSSES))}"))
    said = {f.path for f in out}
    out += [f for f in gan.adversarial_findings("lossconfig.params", raw,
                                                (data.get("train") or {}).get("use_gan", True) is not False)
            if f.path not in said]
    if (data.get("train") or {}).get("use_gan", True):
        size = (data.get("data") or {}).get("image_size", DataSection.image_size)
        disc = [raw.get(k) if is_number(raw.get(k)) else None for k in ("disc_in_channels", "disc_num_layers", "disc_ndf")]
        out += [f for f in gan.patchgan_findings("lossconfig.params", *disc, size) if f.code != "bad_type"]
    model_in = (data.get("model_args") or {}).get("in_channel", 3)
    channels = raw.get("disc_in_channels", VQVAE2Loss.disc_in_channels)
    if (data.get("train") or {}).get("use_gan", True) and is_number(channels) and channels != model_in:
        out.append(Finding(ERROR, "lossconfig.params.disc_in_channels", "disc_channels_mismatch",
                           f"lossconfig.params.disc_in_channels is {channels} but the model makes "
                           f"{model_in}-channel images (model_args.in_channel)",
                           f"set disc_in_channels: {model_in}", [("lossconfig.params.disc_in_channels", model_in)]))
    return out


def _loss_params(raw: Mapping[str, Any]) -> VQVAE2Loss:
    """Checked ``lossconfig.params`` -> :class:`VQVAE2Loss` with integer / float fields typed."""
    params = VQVAE2Loss(**raw)
    for f in dataclasses.fields(VQVAE2Loss):
        if f.type in ("float", "int"):
            setattr(params, f.name, int(getattr(params, f.name)) if f.type == "int" else float(getattr(params, f.name)))
    return params


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper."""
    return getattr(model, "module", model)


@register_loss_implementation("vqvae2")
class VQVAE2LossCalculator(LossCalculator):
    """VQ-VAE-2 loss behind the ``LossCalculator`` interface (see the module docstring).

    Submodules, named as in taming's loss so state dicts line up: ``discriminator``
    (only when ``use_gan``) and ``perceptual_loss`` (only when ``perceptual_weight > 0``).
    """

    family = "vqvae2"

    def __init__(self, params: Optional[VQVAE2Loss] = None, use_gan: bool = True,
                 disc_update_every: int = 1, perceptual_loss: Optional[nn.Module] = None):
        super().__init__()
        params = params or VQVAE2Loss()
        if disc_update_every < 1:
            raise UserError(f"train.disc_update_every must be >= 1, got {disc_update_every}")
        if params.perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual_loss module")
        self.params = params
        self.latent_loss_weight = params.latent_loss_weight
        self.pixelloss_weight = params.pixelloss_weight
        self.perceptual_weight = params.perceptual_weight
        self.disc_start = params.disc_start
        self.disc_weight = params.disc_weight
        self.disc_update_every = int(disc_update_every)
        self.use_gan = bool(use_gan)
        if self.use_gan:
            self.disc_factor = params.disc_factor
            self.discriminator = gan.build_discriminator(
                in_channels=params.disc_in_channels, n_layers=params.disc_num_layers,
                ndf=params.disc_ndf, use_actnorm=params.use_actnorm)
            self.d_loss_fn = gan.get_d_loss(params.disc_loss)
            self.lecam = gan.build_lecam(params.lecam_weight, params.lecam_ema_decay)
        else:
            # use_gan false means disc_factor 0, said once, and no discriminator.
            self.disc_factor = 0.0
            self.discriminator = None
            self.d_loss_fn = None
            self.lecam = None
            log.warning("use_gan is false: disc_factor is set to 0, no discriminator is built "
                        "or trained; the vqvae2 loss is reconstruction + latent"
                        + (" + perceptual" if params.perceptual_weight > 0 else ""))
        self.g_loss_fn = gan.get_g_loss(params.generator_loss)
        if perceptual_loss is not None and params.perceptual_weight > 0:
            self.perceptual_loss = perceptual_loss.eval()
            for p in self.perceptual_loss.parameters():
                p.requires_grad_(False)
        else:
            self.perceptual_loss = None

    # ---- construction --------------------------------------------------------------
    @classmethod
    def build(cls, cfg) -> "VQVAE2LossCalculator":
        # The rules validate runs: the loss target, then the parameters.
        data = config_data(cfg)
        findings: List[Finding] = []
        loss_target_rule(data, get_model_type(cfg.model_type), findings)
        raise_for_errors(findings + cls.param_rules(data), "vqvae2 loss")
        params = _loss_params(as_dict(cfg.lossconfig.params))
        perceptual = None
        if params.perceptual_weight > 0:
            perceptual = build_taming_lpips(vgg_ckpt_path=cfg.train.vgg_ckpt_path,
                                            allow_random_vgg=cfg.train.allow_random_vgg)
        return cls(params, use_gan=cfg.train.use_gan, disc_update_every=cfg.train.disc_update_every,
                   perceptual_loss=perceptual)

    @classmethod
    def param_rules(cls, data: Dict[str, Any], check_types: bool = True) -> List[Finding]:
        return vqvae2_param_rules(data)

    def train(self, mode: bool = True):
        super().train(mode)
        # LPIPS is a fixed metric: its dropout layers stay off in training too.
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    # ---- the GAN schedule ------------------------------------------------------------
    def disc_factor_at(self, global_step: int) -> float:
        return gan.disc_factor_at(self.disc_factor, global_step, self.disc_start, self.use_gan)

    def should_update_discriminator(self, global_step: int) -> bool:
        # A zero GAN factor (use_gan false, before disc_start, disc_factor 0) makes the
        # discriminator loss 0: its update would change nothing, so it is not scheduled.
        return (self.discriminator is not None and self.disc_factor_at(global_step) > 0
                and global_step % self.disc_update_every == 0)

    # ---- steps -----------------------------------------------------------------------
    def generator_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], global_step: int,
                       split: str = "train") -> GeneratorOutput:
        x = batch["image"]
        xrec, latent_loss, codes = model(x, return_codes=True)
        latent = latent_loss.mean()   # rosinality's models return shape (1,) (or (n_gpu,))
        rec_loss = F.mse_loss(xrec.float(), x.float())
        nll = self.pixelloss_weight * rec_loss
        zero = rec_loss.new_zeros(())
        p_loss = zero
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(x.contiguous().float(), xrec.contiguous().float()).mean()
            nll = nll + self.perceptual_weight * p_loss
        total = nll + self.latent_loss_weight * latent

        disc_factor = self.disc_factor_at(global_step)
        g_loss, d_weight = zero, zero
        if disc_factor > 0:
            # Frozen discriminator: the generator loss must not leave gradients in it.
            with gan.requires_grad_off(self.discriminator):
                g_loss = self.g_loss_fn(self.discriminator(xrec.contiguous()))
            last_layer = _unwrap(model).get_last_layer()
            if torch.is_grad_enabled() and last_layer.requires_grad and g_loss.requires_grad:
                d_weight = gan.adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            # else: evaluation without a graph; taming uses weight 0 there as well.
            total = total + d_weight * disc_factor * g_loss

        log = {
            f"{split}/total_loss": total.detach().clone(),
            f"{split}/rec_loss": rec_loss.detach(),
            f"{split}/latent_loss": latent.detach(),
            f"{split}/p_loss": p_loss.detach(),
            f"{split}/nll_loss": nll.detach(),
            f"{split}/g_loss": g_loss.detach(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
        }
        return GeneratorOutput(loss=total, log=log, inputs=x.detach(), reconstructions=xrec.detach(),
                               codes=tuple(c.detach() for c in codes))

    def discriminator_step(self, out: GeneratorOutput, global_step: int, split: str = "train"):
        if not self.use_gan or self.discriminator is None:
            raise RuntimeError("discriminator_step called with use_gan false: there is no "
                               "discriminator (check should_update_discriminator first)")
        disc_factor = self.disc_factor_at(global_step)
        # Both inputs are detached: no gradient reaches the generator.
        logits_real = self.discriminator(out.inputs.detach().contiguous())
        logits_fake = self.discriminator(out.reconstructions.detach().contiguous())
        d_loss, lecam_loss = gan.regularised_d_loss(self.d_loss_fn(logits_real, logits_fake), self.lecam,
                                                    logits_real, logits_fake, disc_factor, self.training)
        log = {
            f"{split}/disc_loss": d_loss.detach().clone(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
        }
        if lecam_loss is not None:
            log[f"{split}/lecam_loss"] = lecam_loss.detach()
        return d_loss, log


__all__ = ["VQVAE2Loss", "VQVAE2LossCalculator"]
