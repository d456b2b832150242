"""The taming loss family: taming's real ``VQLPIPSWithDiscriminator`` behind ``LossCalculator``.

The loss is Esser et al. 2021 (VQGAN): L1 + ``perceptual_weight`` * LPIPS, plus the codebook
loss, plus a PatchGAN hinge (or vanilla) term weighted adaptively at the decoder's last
layer.  :class:`TamingLossCalculator` *is* taming's class (a subclass built offline through
``losses/perceptual.py``), so

* its state-dict keys are taming's (``discriminator.*``, ``perceptual_loss.*``) and the
  ``loss.*`` entries of upstream checkpoints load into it;
* ``calc(codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=...,
  split="train")`` returns taming's ``(loss, log)``; whenever the GAN term is active the
  generator loss of this call *is* taming's own ``forward``.

What it does differently, on purpose:

* ``use_gan: false`` -> ``disc_factor`` is 0 (logged as 0), one warning at construction,
  :meth:`should_update_discriminator` is always false.  The discriminator is still built, so
  checkpoints keep their ``loss.discriminator.*`` entries.
* Whenever the GAN term is zero (``use_gan`` false, ``global_step < disc_start``,
  ``disc_factor`` or ``disc_weight`` 0), the generator loss skips the discriminator forward
  and the two ``autograd.grad`` calls of the adaptive weight: upstream multiplies them by 0.
  The loss value and its gradients are exactly taming's; in the log, ``d_weight`` and
  ``g_loss`` are reported as 0 (they were not computed) and every other key is taming's.
  A side effect: the discriminator's BatchNorm running statistics are not updated by
  generator steps in that phase (upstream updates them with fake batches it then ignores).
* The trainer API runs one generator forward per iteration (taming's Lightning loop runs
  two): :meth:`discriminator_step` takes the generator step's reconstructions, detached, and
  skips taming's L1/LPIPS computation, which the ``optimizer_idx=1`` branch computes and
  throws away.  With the GAN term active, :meth:`generator_step` evaluates the
  discriminator once on a detached copy of the reconstructions, computes dg/dx once, and
  injects it into the generator graph (value and gradients are taming's; tested to 1e-6);
  when a discriminator step follows, that ``D(fake)`` and its graph are handed over in
  ``out.extra`` and reused, so a GAN iteration costs one ``D(fake)`` and one discriminator
  input-gradient fewer.  (Not when the discriminator is DDP-wrapped; ``reuse_fake_logits``
  turns it off.)  BatchNorm running statistics therefore see one fake batch per
  iteration instead of two; train-mode outputs do not depend on them.
* ``perceptual_weight: 0`` builds no VGG trunk and needs no file: the calculator has no
  ``perceptual_loss`` submodule, its state dict has no ``perceptual_loss.*`` keys, and
  loading a state dict that has them (an upstream checkpoint) drops them silently -- those
  are frozen LPIPS constants that a zero weight never uses.

Like taming, LPIPS' linear layers keep their dropout, which is active in ``train()`` mode.

Adversarial opt-ins (``lecam_weight``, ``lecam_ema_decay``, ``generator_loss`` in
``lossconfig.params``; ``losses/gan.py``, ``losses/lecam.py``), off by default: with the
defaults every value and the state-dict keys are taming's.  ``generator_loss:
non_saturating`` replaces ``-mean(D(x_rec))`` by ``softplus(-D(x_rec))`` wherever taming's
generator loss is computed; ``lecam_weight > 0`` adds LeCAM's regulariser to the
discriminator loss (``disc_factor * (d_loss + lecam_weight * R_LC)``) and keeps its moving
averages in the ``lecam.*`` buffers of this calculator, not in the discriminator.

    >>> from train.schema import make_config
    >>> cfg = make_config(lossconfig={"params": {"disc_start": 0, "perceptual_weight": 0.0}},
    ...                   model_args={"ddconfig": {"out_ch": 3}})
    >>> calc = TamingLossCalculator.build(cfg)
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from taming.modules.losses import vqperceptual
from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator, adopt_weight

from adapters.registry import register_loss_implementation, spec_for_config
from losses.calculator import GeneratorOutput, LossCalculator, constructor_parameters, param_findings
from losses.gan import (ADVERSARIAL_DEFAULTS, D_LOSSES, adversarial_findings, build_lecam, disc_factor_at,
                        get_g_loss, patchgan_findings, regularised_d_loss, requires_grad_off)
from losses.perceptual import build_taming_lpips
from train.errors import ERROR, Finding, UserError, raise_for_errors
from train.schema import DataSection, as_dict, config_data

log = logging.getLogger(__name__)

# Constructor arguments of taming's VQLPIPSWithDiscriminator, with its defaults.
TAMING_LOSS_DEFAULTS: Dict[str, Any] = {
    name: p.default for name, p in inspect.signature(VQLPIPSWithDiscriminator.__init__).parameters.items()
    if name != "self"
}


def _whole_number(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


# Numeric constructor arguments, converted on the way in (YAML/JSON may carry "1e4" or 10000.0).
_PARAM_TYPES = {"disc_start": _whole_number, "disc_num_layers": _whole_number,
                "disc_in_channels": _whole_number, "disc_ndf": _whole_number,
                "codebook_weight": float, "pixelloss_weight": float, "disc_factor": float, "disc_weight": float,
                "perceptual_weight": float, "lecam_weight": float, "lecam_ema_decay": float}


class _NoPerceptual(nn.Module):
    """Stands in for LPIPS while taming's constructor runs with ``perceptual_weight == 0``;
    removed right after (it never reaches the state dict)."""


def _drop_perceptual_keys(module, state_dict, prefix, *_args) -> None:
    # Upstream state dicts always carry the LPIPS constants; with no perceptual module they
    # have nowhere to go and no use.
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual_loss.")]:
        del state_dict[key]


def _fp16_autocast(t: torch.Tensor) -> bool:
    device = t.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def _as_whole(value):
    """``value`` as build would convert it to an int, or None when it would not (or unset)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, (str, int, float)) else None
    except ValueError:
        return None
    return int(number) if number is not None and number.is_integer() else None


@register_loss_implementation("taming")
class TamingLossCalculator(LossCalculator, VQLPIPSWithDiscriminator):
    """taming's ``VQLPIPSWithDiscriminator``, built offline, with ``use_gan`` honoured.

    Keyword arguments beyond taming's constructor:
      use_gan           -- False: no GAN term, no discriminator step (one warning says so)
      disc_update_every -- discriminator step every N global steps (taming: 1)
      vgg_ckpt_path, allow_random_vgg -- where LPIPS' VGG16 trunk comes from (perceptual.py)
      gan_off_reason    -- why use_gan is false, for the warning (e.g. the NoDisc variant)
      generator_loss    -- "hinge" (taming's -mean(logits), default) or "non_saturating"
      lecam_weight, lecam_ema_decay -- LeCAM regularisation of the discriminator (0: off)
    """

    family = "taming"

    def __init__(self, disc_start: int, *, use_gan: bool = True, disc_update_every: int = 1,
                 vgg_ckpt_path: Optional[str] = None, allow_random_vgg: bool = False,
                 gan_off_reason: Optional[str] = None,
                 generator_loss: str = ADVERSARIAL_DEFAULTS["generator_loss"],
                 lecam_weight: float = ADVERSARIAL_DEFAULTS["lecam_weight"],
                 lecam_ema_decay: float = ADVERSARIAL_DEFAULTS["lecam_ema_decay"], **loss_params):
        perceptual_weight = float(loss_params.get("perceptual_weight", TAMING_LOSS_DEFAULTS["perceptual_weight"]))
        if perceptual_weight > 0:
            def make_lpips():
                return build_taming_lpips(vgg_ckpt_path, allow_random_vgg)
        else:
            make_lpips = _NoPerceptual
        # Cooperative super().__init__() would reach taming's __init__ without arguments, so
        # call it directly (it initialises nn.Module).  taming's constructor calls the
        # module-level name LPIPS, which downloads: point it at the offline builder meanwhile.
        saved = vqperceptual.LPIPS
        vqperceptual.LPIPS = make_lpips
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # taming prints the GAN loss name
                VQLPIPSWithDiscriminator.__init__(self, disc_start, **loss_params)
        finally:
            vqperceptual.LPIPS = saved
        if perceptual_weight <= 0:
            del self.perceptual_loss
            self.register_load_state_dict_pre_hook(_drop_perceptual_keys)

        self.use_gan = bool(use_gan)
        self.generator_loss = str(generator_loss)
        self.g_loss_fn = get_g_loss(self.generator_loss)
        self.lecam = build_lecam(lecam_weight, lecam_ema_decay)
        # generator_step keeps D(fake) for the discriminator step (one D forward fewer); off
        # when the discriminator is DDP-wrapped (DDP wants each forward followed by its backward).
        self.reuse_fake_logits = True
        self.disc_update_every = int(disc_update_every)
        if self.disc_update_every < 1:
            raise UserError(f"train.disc_update_every must be >= 1, got {disc_update_every}")
        # taming reads self.disc_factor in forward; with the GAN off it must be 0 there too.
        self.configured_disc_factor = float(self.disc_factor)
        if not self.use_gan:
            self.disc_factor = 0.0
            why = gan_off_reason or "train.use_gan is false"
            log.warning(f"{why}: the taming loss keeps its discriminator (so checkpoints load) but "
                        f"disc_factor is 0 (configured {self.configured_disc_factor:g}); the GAN term is "
                        "never computed and the discriminator is never trained.")

    # ---- construction from a config ------------------------------------------------------
    @classmethod
    def build(cls, cfg) -> "TamingLossCalculator":
        """From an ``ExperimentConfig`` (or its DictConfig): ``lossconfig.params`` are taming's
        constructor arguments; ``train`` gives use_gan, disc_update_every and the VGG file."""
        # The rules validate runs; numbers written as text ("1e4") are converted below.
        data = config_data(cfg)
        raise_for_errors(cls.param_rules(data, check_types=False), "taming loss")
        params = as_dict(cfg.lossconfig.params) if cfg.lossconfig is not None else {}
        for key, value in list(params.items()):
            kind = _PARAM_TYPES.get(key)
            try:
                params[key] = kind(value) if kind is not None and not isinstance(value, bool) else value
            except (TypeError, ValueError):
                what = "a whole number" if kind is _whole_number else "a number"
                raise UserError(f"lossconfig.params.{key} must be {what}, got {value!r}") from None
        if "disc_in_channels" not in params:
            ddconfig = as_dict(cfg.model_args).get("ddconfig") or {}
            params["disc_in_channels"] = int(ddconfig.get("out_ch", TAMING_LOSS_DEFAULTS["disc_in_channels"]))
        train = cfg.train
        use_gan = bool(train.use_gan)
        reason = None
        spec, variant = spec_for_config(cfg)
        if use_gan and variant is not None and not spec.variants[variant].gan:
            use_gan, reason = False, f"model_variant {variant} trains without a discriminator"
        disc_start = params.pop("disc_start")
        return cls(disc_start, use_gan=use_gan, disc_update_every=train.disc_update_every,
                   vgg_ckpt_path=train.vgg_ckpt_path, allow_random_vgg=bool(train.allow_random_vgg),
                   gan_off_reason=reason, **params)

    @classmethod
    def param_rules(cls, data: Dict[str, Any], check_types: bool = True) -> List[Finding]:
        """taming's constructor names (and, with ``check_types``, value types), plus what its
        constructor cannot catch: a missing ``disc_start``, an unknown ``disc_loss``, and
        ``disc_conditional`` (VQGAN training never passes the conditioning input)."""
        params = (data.get("lossconfig") or {}).get("params") or {}
        accepted = constructor_parameters(VQLPIPSWithDiscriminator)
        accepted.update({k: v for k, v in constructor_parameters(cls).items() if k in ADVERSARIAL_DEFAULTS})
        out = param_findings("taming", params, accepted, check_types)
        said = {f.path for f in out}
        use_gan = (data.get("train") or {}).get("use_gan", True) is not False
        out += [f for f in adversarial_findings("lossconfig.params", params, use_gan) if f.path not in said]
        if "disc_start" not in params:
            out.append(Finding(ERROR, "lossconfig.params.disc_start", "missing_loss_param",
                               "lossconfig.params.disc_start is missing (taming's VQLPIPSWithDiscriminator has no "
                               "default): the global step at which the GAN term starts",
                               "add e.g. disc_start: 10000"))
        disc_loss = params.get("disc_loss", TAMING_LOSS_DEFAULTS["disc_loss"])
        if isinstance(disc_loss, str) and disc_loss not in D_LOSSES:
            out.append(Finding(ERROR, "lossconfig.params.disc_loss", "bad_value",
                               f"lossconfig.params.disc_loss {disc_loss!r} is unknown; valid choices: "
                               f"{', '.join(sorted(D_LOSSES))}", f"use one of {', '.join(sorted(D_LOSSES))}"))
        # Its discriminator is built even with use_gan false (so checkpoints load).
        size = (data.get("data") or {}).get("image_size", DataSection.image_size)
        # build converts text ("64") and whole floats (64.0) and refuses the rest with its own
        # message; the sizes of what it would build are judged here.
        disc = [_as_whole(params.get(k)) for k in ("disc_in_channels", "disc_num_layers", "disc_ndf")]
        out += patchgan_findings("lossconfig.params", *disc, size)
        if params.get("disc_conditional"):
            out.append(Finding(ERROR, "lossconfig.params.disc_conditional", "bad_value",
                               "disc_conditional: true needs a conditioning input that VQGAN training never "
                               "passes (taming's VQModel fails its own assert)", "set disc_conditional: false",
                               [("lossconfig.params.disc_conditional", False)]))
        return out

    # ---- the GAN schedule ----------------------------------------------------------------
    @property
    def disc_start(self) -> int:
        return self.discriminator_iter_start

    @property
    def has_perceptual(self) -> bool:
        return "perceptual_loss" in self._modules

    def disc_factor_at(self, global_step: int) -> float:
        """taming's ``adopt_weight(disc_factor, step, disc_start)``, and 0 when use_gan is false."""
        return disc_factor_at(self.configured_disc_factor, global_step, self.discriminator_iter_start,
                              self.use_gan)

    def gan_term_active(self, global_step: int) -> bool:
        """True when the generator loss has a non-zero GAN term at ``global_step``."""
        return self.disc_factor_at(global_step) != 0 and self.discriminator_weight != 0

    def should_update_discriminator(self, global_step: int) -> bool:
        """use_gan, ``global_step >= disc_start`` (disc_factor non-zero) and
        ``global_step % disc_update_every == 0``."""
        return self.disc_factor_at(global_step) != 0 and global_step % self.disc_update_every == 0

    # ---- taming's call ---------------------------------------------------------------------
    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step,
                last_layer=None, cond=None, split="train"):
        """taming's ``VQLPIPSWithDiscriminator.forward`` contract (see the module docstring)."""
        if optimizer_idx == 0:
            if self.gan_term_active(global_step) and self.generator_loss != "hinge":
                return self._generator_loss_two_pass(codebook_loss, inputs, reconstructions, global_step,
                                                     last_layer, split)
            if self.gan_term_active(global_step):
                return VQLPIPSWithDiscriminator.forward(self, codebook_loss, inputs, reconstructions, 0,
                                                        global_step, last_layer=last_layer, cond=cond,
                                                        split=split)
            return self._generator_loss_without_gan(codebook_loss, inputs, reconstructions, global_step, split)
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx!r}")

    def _nll(self, inputs, reconstructions):
        """taming's reconstruction terms: ``(nll_loss, rec_loss, p_loss)``, the same operations."""
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros(1, device=inputs.device)
        return torch.mean(rec_loss), rec_loss, p_loss

    @staticmethod
    def _generator_log(split, loss, codebook_loss, nll_loss, rec_loss, p_loss, d_weight, disc_factor, g_loss):
        return {f"{split}/total_loss": loss.clone().detach().mean(),
                f"{split}/quant_loss": codebook_loss.detach().mean(),
                f"{split}/nll_loss": nll_loss.detach().mean(),
                f"{split}/rec_loss": rec_loss.detach().mean(),
                f"{split}/p_loss": p_loss.detach().mean(),
                f"{split}/d_weight": d_weight.detach(),
                f"{split}/disc_factor": torch.tensor(disc_factor),
                f"{split}/g_loss": g_loss.detach().mean()}

    def _generator_loss_without_gan(self, codebook_loss, inputs, reconstructions, global_step, split):
        # taming's generator branch with its GAN summand (d_weight * 0 * g_loss) left out:
        # nll + 0 is nll exactly, so value and gradients are unchanged.
        nll_loss, rec_loss, p_loss = self._nll(inputs, reconstructions)
        loss = nll_loss + self.codebook_weight * codebook_loss.mean()
        zero = torch.zeros((), device=inputs.device)
        return loss, self._generator_log(split, loss, codebook_loss, nll_loss, rec_loss, p_loss, zero,
                                         self.disc_factor_at(global_step), zero)

    def _generator_loss_two_pass(self, codebook_loss, inputs, reconstructions, global_step, last_layer, split):
        """taming's generator branch (``optimizer_idx == 0``) step by step, with this
        calculator's ``generator_loss`` in place of its ``-mean(logits_fake)``."""
        nll_loss, rec_loss, p_loss = self._nll(inputs, reconstructions)
        logits_fake = self.discriminator(reconstructions.contiguous())
        g_loss = self.g_loss_fn(logits_fake)
        try:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
        except RuntimeError:
            # taming's own fallback: no graph (evaluation) gives weight 0.
            if self.training:
                raise
            d_weight = torch.tensor(0.0)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        return loss, self._generator_log(split, loss, codebook_loss, nll_loss, rec_loss, p_loss, d_weight,
                                         disc_factor, g_loss)

    def _generator_loss_one_pass(self, codebook_loss, inputs, reconstructions, global_step, last_layer,
                                 keep_fake_graph, split):
        """taming's GAN generator loss with the discriminator evaluated once, on a detached copy.

        Upstream backpropagates ``g_loss`` through the discriminator twice (in the adaptive
        weight's ``autograd.grad`` and again in ``loss.backward()``) and runs ``D(fake)`` again
        in the discriminator update.  Here ``D`` sees ``xd = reconstructions.detach()``;
        ``dg/dxd`` is computed once and injected into the generator graph (``_InjectGrad``), so
        value and gradients are taming's: d(g)/d(theta) = (dg/dxrec) . (dxrec/dtheta).  With
        ``keep_fake_graph`` the discriminator parameters take part in ``D(xd)`` and its graph is
        kept for :meth:`discriminator_step` (``xd`` is a leaf: nothing reaches the generator).
        """
        nll_loss, rec_loss, p_loss = self._nll(inputs, reconstructions)
        xd = reconstructions.contiguous().detach().requires_grad_(True)
        with contextlib.nullcontext() if keep_fake_graph else requires_grad_off(self.discriminator):
            logits_fake = self.discriminator(xd)
        g_loss = self.g_loss_fn(logits_fake)
        (g_grad_xd,) = torch.autograd.grad(g_loss, xd, retain_graph=keep_fake_graph)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(reconstructions, last_layer, grad_outputs=g_grad_xd, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        g_term = _InjectGrad.apply(reconstructions, g_loss.detach(), g_grad_xd)
        loss = nll_loss + d_weight * disc_factor * g_term + self.codebook_weight * codebook_loss.mean()
        log = self._generator_log(split, loss, codebook_loss, nll_loss, rec_loss, p_loss, d_weight, disc_factor,
                                  g_loss)
        return loss, log, (logits_fake if keep_fake_graph else None)

    def _discriminator_loss(self, inputs, reconstructions, global_step, cond, split, logits_fake=None):
        # taming's optimizer_idx == 1 branch, without the unused L1/LPIPS computation.
        # ``logits_fake``: D(fake) already computed (with its graph) by the generator step.
        real = inputs.contiguous().detach()
        fake = reconstructions.contiguous().detach()
        if cond is not None:
            real, fake = torch.cat((real, cond), dim=1), torch.cat((fake, cond), dim=1)
        logits_real = self.discriminator(real)
        if logits_fake is None:
            logits_fake = self.discriminator(fake)
        factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        # The LeCAM anchors move only on training steps (the calculator in train mode).
        d_loss, lecam_loss = regularised_d_loss(self.disc_loss(logits_real, logits_fake), self.lecam, logits_real,
                                                logits_fake, factor, self.training)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        if lecam_loss is not None:
            log[f"{split}/lecam_loss"] = lecam_loss.detach()
        return d_loss, log

    # ---- the trainer's API -----------------------------------------------------------------
    def generator_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], global_step: int,
                       split: str = "train") -> GeneratorOutput:
        """One generator forward and its loss (taming's values; see the module docstring).

        No gradient of the returned loss reaches the discriminator's parameters.  When a
        discriminator step follows at this step, ``D(fake)`` is computed here once and handed
        to :meth:`discriminator_step` through ``out.extra``; pass that same ``out``.
        """
        x = batch["image"]
        # Through the (possibly DDP-wrapped) model, so DDP sees the forward.
        xrec, qloss, codes = model(x, return_codes=True)
        extra: Dict[str, Any] = {"codebook_loss": qloss.detach(), "global_step": global_step}
        if not self.gan_term_active(global_step):
            loss, log = self(qloss, x, xrec, 0, global_step, split=split)
        elif _fp16_autocast(xrec):
            # The one-pass path computes dg/dx without the GradScaler's scale, which fp16 can
            # underflow; taming's own forward (whose main backward is scaled) is used instead.
            with requires_grad_off(self.discriminator):
                loss, log = self(qloss, x, xrec, 0, global_step,
                                 last_layer=getattr(model, "module", model).get_last_layer(), split=split)
        elif torch.is_grad_enabled() and xrec.requires_grad:
            keep = self.reuse_fake_logits and self.should_update_discriminator(global_step) \
                and not isinstance(self.discriminator, nn.parallel.DistributedDataParallel)
            last_layer = getattr(model, "module", model).get_last_layer()
            loss, log, logits_fake = self._generator_loss_one_pass(qloss, x, xrec, global_step, last_layer,
                                                                   keep, split)
            if logits_fake is not None:
                extra["logits_fake"] = logits_fake
        else:
            # No autograd (validation): the adaptive weight cannot be computed; taming's forward
            # then uses d_weight 0 (in eval mode; in train mode it fails an assert).
            nll_loss, rec_loss, p_loss = self._nll(x, xrec)
            g_loss = self.g_loss_fn(self.discriminator(xrec.contiguous()))
            d_weight = torch.zeros((), device=x.device)
            disc_factor = self.disc_factor_at(global_step)
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * qloss.mean()
            log = self._generator_log(split, loss, qloss, nll_loss, rec_loss, p_loss, d_weight, disc_factor,
                                      g_loss)
        return GeneratorOutput(loss=loss, log=log, inputs=x, reconstructions=xrec.detach(), codes=codes,
                               extra=extra)

    def discriminator_step(self, out: GeneratorOutput, global_step: int, split: str = "train"):
        """taming's discriminator loss on ``out.inputs`` vs ``out.reconstructions`` (detached):
        no second generator pass, no gradient into the generator.  Reuses ``D(fake)`` from the
        generator step of the same ``global_step`` when it kept one."""
        logits_fake = out.extra.get("logits_fake") if out.extra.get("global_step") == global_step else None
        out.extra.pop("logits_fake", None)   # its graph is freed by this step's backward
        return self._discriminator_loss(out.inputs, out.reconstructions, global_step, None, split,
                                        logits_fake=logits_fake)


class _InjectGrad(torch.autograd.Function):
    """Value ``value``; gradient ``grad_out * grad`` with respect to ``x`` (a precomputed VJP)."""

    @staticmethod
    def forward(ctx, x, value, grad):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


__all__ = ["TamingLossCalculator", "TAMING_LOSS_DEFAULTS"]
