"""The DinoVQ loss family: DINO distillation + reconstruction + VQ commitment, optional LPIPS
and PatchGAN, behind the same ``LossCalculator`` interface as the taming family.

Terms (the DinoVQ reference API's keys; every one is returned unweighted and as a ``*_weighted`` twin):

* ``dino_loss``       1 - cosine(student head, teacher patch feature), averaged over tokens
                      (BEiT v2 VQ-KD, Peng et al. 2022, eq. 1).
* ``recon_loss``      pixel MSE between input and reconstruction (both in [-1, 1]).
* ``vq_loss``         the quantizer's commitment term (the codebook itself moves by EMA,
                      see ``adapters/dinovq.py``).
* ``perceptual_loss`` taming's LPIPS (only with ``use_perceptual``), built offline by
                      ``losses.perceptual.build_taming_lpips``.
* ``gen_adv_loss``    -mean(D(x_rec)) with taming's PatchGAN (only with ``use_gan``); its
                      weight is ``disc_factor_at(step) * d_weight`` where d_weight is VQGAN's
                      adaptive weight (Esser et al. 2021, eq. 7) times ``disc_weight`` when
                      ``disc_adaptive_weight``, else ``disc_weight``.

Opt-ins in ``model_args`` (off by default, ``losses/gan.py``): ``generator_loss:
non_saturating`` makes ``gen_adv_loss`` ``mean softplus(-D(x_rec))``; ``lecam_weight > 0``
adds LeCAM's regulariser (``lecam_loss``, weighted) to ``disc_loss``, its moving averages in
``loss_fn.lecam.*``.

The discriminator update returns ``disc_loss`` (hinge, times the disc factor),
``disc_weight`` (the disc factor in force at that step: 0 before ``disc_start``),
``logits_real`` and ``logits_fake`` (means).

Where things live.  ``DinoVQLoss`` is an ``nn.Module`` holding the LPIPS network and the
discriminator.  The reference API (``losses/dinovq_model.py``) builds one inside the model
(``model.loss_fn``, so ``model.loss_fn.discriminator`` exists and its state dict carries
``loss_fn.discriminator.*``, like taming's ``loss.discriminator.*``).  The generic trainer
instead builds the network *without* a loss (``adapters.dinovq.build_dinovq``) and a
``DinoVQLossCalculator`` that owns the ``DinoVQLoss``: the model then holds generator
weights only (DDP sees no parameter that the generator step leaves without a gradient),
and the calculator's ``discriminator`` is what the trainer optimises and checkpoints.

Rules kept by both paths: when the GAN term is zero (``use_gan`` false, or before
``disc_start``) the generator step runs no discriminator forward and no adaptive-weight
gradients; the generator step never gives the discriminator a gradient (its parameters are
frozen for the forward) and the discriminator step only sees detached images.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapters.dino_features import FeatureShapeError
from adapters.dinovq import LOSS_ARG_NAMES, dinovq_rules, student_geometry
from adapters.registry import register_loss_implementation
from losses.calculator import GeneratorOutput, LossCalculator, constructor_parameters, param_findings
from losses.gan import (ADVERSARIAL_DEFAULTS, adaptive_weight, adversarial_findings, build_discriminator,
                        build_lecam, disc_factor_at, get_d_loss, get_g_loss, patchgan_findings, regularised_d_loss,
                        requires_grad_off)
from losses.perceptual import build_taming_lpips
from train.errors import Finding, UserError, raise_for_errors
from train.schema import DataSection, as_dict, config_data

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Loss functions


def check_feature_shape(features: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise ``FeatureShapeError`` unless ``features`` has exactly the ``expected`` shape."""
    expected = tuple(int(s) for s in expected)
    got = tuple(features.shape) if isinstance(features, torch.Tensor) else None
    if got != expected:
        b, n, d = expected
        raise FeatureShapeError(
            f"DINO teacher features have shape {got}, expected (B, (H/patch_size)*(W/patch_size), "
            f"dino_dim) = ({b}, {n}, {d}); extract them with the teacher and image size of this "
            "config (set model_args.dino_dim to the teacher's width, and re-run extract-features "
            "if the cache was made for another image size)")


def dino_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per token, averaged (BEiT v2's VQ-KD objective), in fp32."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def recon_mse(inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(reconstructions.float(), inputs.float())


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(value), device=like.device)


# ---------------------------------------------------------------------------------------
# The loss module


class DinoVQLoss(nn.Module):
    """Owns LPIPS and the discriminator; computes the reference API's generator / discriminator terms."""

    def __init__(self, dino_loss_weight: float = 1.0, recon_loss_weight: float = 1.0,
                 vq_loss_weight: float = 1.0, use_perceptual: bool = False,
                 perceptual_weight: float = 1.0, vgg_ckpt_path: Optional[str] = None,
                 allow_random_vgg: bool = False, use_gan: bool = False, disc_start: int = 10000,
                 disc_weight: float = 0.5, disc_factor: float = 1.0, disc_dim: int = 64,
                 disc_num_layers: int = 3, disc_adaptive_weight: bool = True,
                 disc_loss: str = "hinge", disc_in_channels: int = 3,
                 generator_loss: str = ADVERSARIAL_DEFAULTS["generator_loss"],
                 lecam_weight: float = ADVERSARIAL_DEFAULTS["lecam_weight"],
                 lecam_ema_decay: float = ADVERSARIAL_DEFAULTS["lecam_ema_decay"]):
        super().__init__()
        self.weights = {"dino_loss": float(dino_loss_weight), "recon_loss": float(recon_loss_weight),
                        "vq_loss": float(vq_loss_weight), "perceptual_loss": float(perceptual_weight)}
        self.use_perceptual = bool(use_perceptual)
        self.use_gan = bool(use_gan)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.disc_adaptive_weight = bool(disc_adaptive_weight)
        self.d_loss = get_d_loss(disc_loss)
        self.g_loss_fn = get_g_loss(generator_loss)
        # LeCAM only with a discriminator to regularise (None: nothing built, nothing saved).
        self.lecam = build_lecam(lecam_weight, lecam_ema_decay) if self.use_gan else None
        self.perceptual = None
        if self.use_perceptual:
            # taming's LPIPS freezes its own parameters and stays in eval mode.
            self.perceptual = build_taming_lpips(vgg_ckpt_path=vgg_ckpt_path,
                                                 allow_random_vgg=allow_random_vgg).eval()
        # No discriminator at all without the GAN: nothing to build, optimise or save.
        self.discriminator = (build_discriminator(disc_in_channels, disc_num_layers, disc_dim)
                              if self.use_gan else None)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # a frozen metric network, never in training mode
        return self

    # ---- schedule ------------------------------------------------------------------
    def disc_factor_at(self, global_step: int) -> float:
        return disc_factor_at(self.disc_factor, global_step, self.disc_start, self.use_gan)

    # ---- generator -----------------------------------------------------------------
    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       dino_pred: torch.Tensor, vq_loss: torch.Tensor, dino_features: torch.Tensor,
                       global_step: int = 0,
                       last_layer: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The reference API's generator dict: base terms, optional terms, their weighted twins, total."""
        check_feature_shape(dino_features, dino_pred.shape)
        terms = {"dino_loss": dino_cosine_loss(dino_pred, dino_features),
                 "recon_loss": recon_mse(inputs, reconstructions),
                 "vq_loss": vq_loss.float()}
        if self.perceptual is not None:
            terms["perceptual_loss"] = self.perceptual(inputs.float().contiguous(),
                                                       reconstructions.float().contiguous()).mean()
        weighted = {f"{k}_weighted": self.weights[k] * v for k, v in terms.items()}
        if self.use_gan:
            g_loss, g_weighted = self._adversarial(reconstructions, weighted, global_step, last_layer)
            terms["gen_adv_loss"] = g_loss
            weighted["gen_adv_loss_weighted"] = g_weighted
        total = sum(weighted.values())
        return {"total_loss": total, **terms, **weighted}

    def _adversarial(self, reconstructions, weighted, global_step, last_layer):
        factor = self.disc_factor_at(global_step)
        if factor == 0.0:
            # The GAN term is zero: skip the discriminator and the adaptive-weight grads.
            zero = torch.zeros((), device=reconstructions.device)
            return zero, zero
        # Frozen for the forward, so backward builds no edge into the discriminator.
        with requires_grad_off(self.discriminator):
            logits_fake = self.discriminator(reconstructions.contiguous())
        g_loss = self.g_loss_fn(logits_fake.float())
        if not self.disc_adaptive_weight:
            d_weight = self.disc_weight
        elif last_layer is not None and torch.is_grad_enabled() and g_loss.requires_grad:
            nll = weighted["recon_loss_weighted"] + weighted.get("perceptual_loss_weighted", 0.0)
            d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
        else:
            # No graph (validation under no_grad): taming's VQLPIPSWithDiscriminator falls
            # back to d_weight = 0 there, and so do we.
            d_weight = 0.0
        return g_loss, d_weight * factor * g_loss

    # ---- discriminator -------------------------------------------------------------
    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int = 0) -> Dict[str, torch.Tensor]:
        """The reference API's discriminator dict.  Both images are detached here."""
        if not self.use_gan:
            raise ValueError("discriminator update requested but use_gan is False: this DinoVQ model "
                             "has no discriminator; set use_gan=True or only run generator updates")
        factor = self.disc_factor_at(global_step)
        if factor == 0.0:
            # Before disc_start: a loss whose backward reaches no discriminator parameter, so
            # an optimizer step leaves the discriminator untouched (AdamW skips grad None,
            # weight decay included).  No discriminator forward either.
            zero = torch.zeros((), device=inputs.device)
            return {"disc_loss": torch.zeros((), device=inputs.device, requires_grad=True),
                    "disc_weight": zero, "logits_real": zero, "logits_fake": zero}
        logits_real = self.discriminator(inputs.detach().contiguous()).float()
        logits_fake = self.discriminator(reconstructions.detach().contiguous()).float()
        # The LeCAM anchors move only on training steps (the loss in train mode).
        d_loss, lecam_loss = regularised_d_loss(self.d_loss(logits_real, logits_fake), self.lecam, logits_real,
                                                logits_fake, factor, self.training)
        extra = {} if lecam_loss is None else {"lecam_loss": lecam_loss.detach()}
        return {"disc_loss": d_loss,
                "disc_weight": _scalar(factor, inputs),
                "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean(), **extra}


def loss_kwargs_from_config(cfg) -> Dict[str, object]:
    """``DinoVQLoss`` arguments from an ``ExperimentConfig``.

    Loss settings come from ``model_args`` (the reference API's constructor names).  The GAN
    is on only when both ``model_args.use_gan`` (default false) and the global
    ``train.use_gan`` (default true) are true.  ``train.vgg_ckpt_path`` and
    ``train.allow_random_vgg`` supply the VGG settings the model args leave out.
    """
    args = as_dict(cfg.model_args)
    train = cfg.train
    kwargs = {k: args[k] for k in LOSS_ARG_NAMES if k in args}
    kwargs["use_gan"] = bool(args.get("use_gan", False)) and bool(getattr(train, "use_gan", True))
    if kwargs.get("vgg_ckpt_path") is None and getattr(train, "vgg_ckpt_path", None):
        kwargs["vgg_ckpt_path"] = train.vgg_ckpt_path
    if "allow_random_vgg" not in kwargs:
        kwargs["allow_random_vgg"] = bool(getattr(train, "allow_random_vgg", False))
    if "disc_in_channels" not in kwargs and "in_channels" in args:
        kwargs["disc_in_channels"] = int(args["in_channels"])
    return kwargs


# ---------------------------------------------------------------------------------------
# The trainer's interface


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / DataParallel keep the model in .module


@register_loss_implementation("dinovq")
class DinoVQLossCalculator(LossCalculator):
    """``LossCalculator`` for DinoVQ.

    The batch is ``{"image": (B, 3, H, W) in [-1, 1], "dino_features": (B, N, dino_dim)}``:
    the teacher features arrive in the batch (the DinoVQ registration's batch hook,
    ``adapters.dinovq.teacher_features_hook``, adds them from the frozen teacher or a feature
    cache); a loss never fetches data itself.

    ``discriminator`` is ``loss_fn.discriminator`` (None without the GAN); checkpoint it as
    ``discriminator.*``.
    """

    family = "dinovq"

    def __init__(self, loss_fn: DinoVQLoss, disc_update_every: int = 1):
        super().__init__()
        self.loss_fn = loss_fn
        self.disc_update_every = max(1, int(disc_update_every))

    @classmethod
    def build(cls, cfg) -> "DinoVQLossCalculator":
        """From an ``ExperimentConfig``; the config must pass the DinoVQ rules about crops."""
        findings: List[Finding] = []
        dinovq_rules(config_data(cfg), None, findings)
        raise_for_errors([f for f in findings if f.path.startswith("data.")], "DinoVQ")
        (h, w), _ = student_geometry(cfg)
        if h != w:
            raise UserError(f"model_args.img_size {[h, w]} is not square: training crops are square; "
                            f"set model_args.img_size: [{h}, {h}] and data.image_size: {h}")
        if (h, w) != (int(cfg.data.image_size),) * 2:
            raise UserError(f"data.image_size is {cfg.data.image_size} but model_args.img_size is {[h, w]}: "
                            f"DinoVQ trains on square crops of its own input size; set data.image_size: {h}")
        kwargs = loss_kwargs_from_config(cfg)
        if as_dict(cfg.model_args).get("use_gan") and not kwargs["use_gan"]:
            # The one message a loss family may emit: the GAN the model args ask for is off.
            log.warning("train.use_gan is false: DinoVQ trains without its GAN although model_args.use_gan "
                        "is true (no discriminator, no discriminator optimizer, disc_factor 0)")
        return cls(DinoVQLoss(**kwargs), disc_update_every=getattr(cfg.train, "disc_update_every", 1))

    @classmethod
    def param_rules(cls, data: Dict[str, Any], check_types: bool = True) -> List[Finding]:
        """DinoVQ's loss settings live in model_args (checked by the DinoVQ rules); anything
        in ``lossconfig.params`` must at least be a ``DinoVQLoss`` argument."""
        params = (data.get("lossconfig") or {}).get("params") or {}
        out = param_findings("dinovq", params, constructor_parameters(DinoVQLoss), check_types)
        args = data.get("model_args") or {}
        if isinstance(args, dict) and args.get("use_gan") is True and (data.get("train") or {}).get("use_gan", True):
            # The discriminator settings live in model_args; their types are the DinoVQ rules' say.
            size = (data.get("data") or {}).get("image_size", DataSection.image_size)
            disc = [args.get(k) if isinstance(args.get(k), int) else None
                    for k in ("disc_in_channels", "disc_num_layers", "disc_dim")]
            out += [f for f in patchgan_findings("model_args", *disc, size) if f.code == "disc_too_deep"]
        if isinstance(args, dict):
            gan_on = args.get("use_gan") is True and (data.get("train") or {}).get("use_gan", True) is not False
            out += adversarial_findings("model_args", args, gan_on)
        return out

    # ---- attributes the trainer reads ---------------------------------------------------
    @property
    def use_gan(self) -> bool:
        return self.loss_fn.use_gan

    @property
    def discriminator(self) -> Optional[nn.Module]:
        return self.loss_fn.discriminator

    def __setattr__(self, name, value):
        # nn.Module.__setattr__ would register an assigned module (e.g. the trainer's DDP
        # wrapper) as a second ``discriminator`` submodule; keep one, inside loss_fn.
        if name == "discriminator":
            if "loss_fn" in self._modules:
                self.loss_fn.discriminator = value
            # (before loss_fn exists: the base class's ``discriminator = None``, nothing to keep)
            return
        super().__setattr__(name, value)

    # ---- schedule -----------------------------------------------------------------------
    def disc_factor_at(self, global_step: int) -> float:
        return self.loss_fn.disc_factor_at(global_step)

    def should_update_discriminator(self, global_step: int) -> bool:
        return (self.loss_fn.disc_factor_at(global_step) > 0.0
                and global_step % self.disc_update_every == 0)

    # ---- steps --------------------------------------------------------------------------
    def generator_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], global_step: int,
                       split: str = "train") -> GeneratorOutput:
        images = batch["image"]
        feats = batch.get("dino_features")
        if feats is None:
            raise UserError("DinoVQ needs teacher features: the batch has no 'dino_features'; the trainer adds "
                            "them through the DinoVQ batch hook from teacher.ckpt_path (or teacher.allow_random "
                            "for tests) or data.feature_cache")
        out = model(images, return_dict=True)
        terms = self.loss_fn.generator_loss(images, out["reconstructions"], out["dino_pred"],
                                            out["vq_loss"], feats.to(images.device), global_step,
                                            last_layer=_unwrap(model).get_last_layer())
        log_ = {f"{split}/{k}": v.detach().float() for k, v in terms.items()}
        return GeneratorOutput(loss=terms["total_loss"], log=log_, inputs=images,
                               reconstructions=out["reconstructions"].detach(),
                               codes=(out["indices"],))

    def discriminator_step(self, out: GeneratorOutput, global_step: int, split: str = "train"):
        terms = self.loss_fn.discriminator_loss(out.inputs, out.reconstructions, global_step)
        return terms["disc_loss"], {f"{split}/{k}": v.detach().float() for k, v in terms.items()}
