"""The DinoVQ loss family: DINO distillation + reconstruction + VQ commitment, optional LPIPS
and PatchGAN, behind the same ``LossCalculator`` interface as the taming family.

Terms (seed 000; every one is returned unweighted and as a ``*_weighted`` twin):

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

The discriminator update returns ``disc_loss`` (hinge, times the disc factor),
``disc_weight`` (the disc factor in force at that step: 0 before ``disc_start``),
``logits_real`` and ``logits_fake`` (means).

Where things live.  ``DinoVQLoss`` is an ``nn.Module`` holding the LPIPS network and the
discriminator.  The seed's API builds one inside the model (``model.loss_fn``, so
``model.loss_fn.discriminator`` exists and a seed-style state dict carries
``loss_fn.discriminator.*``, like taming's ``loss.discriminator.*``).  The generic trainer
instead builds the model *without* a loss (``adapters.dinovq.build_dinovq``) and a
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
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.calculator import GeneratorOutput, LossCalculator
from losses.gan import adaptive_weight, build_discriminator, disc_factor_at, get_d_loss, requires_grad_off
from train.errors import UserError

log = logging.getLogger(__name__)


class FeatureShapeError(UserError, ValueError):
    """Teacher features whose shape does not match the student's token grid.

    A ``UserError`` (a feature cache made for another image size or teacher is bad input)
    and a ``ValueError`` (wrong arguments to ``compute_loss``).
    """


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
    """Owns LPIPS and the discriminator; computes the seed's generator / discriminator terms."""

    def __init__(self, dino_loss_weight: float = 1.0, recon_loss_weight: float = 1.0,
                 vq_loss_weight: float = 1.0, use_perceptual: bool = False,
                 perceptual_weight: float = 1.0, vgg_ckpt_path: Optional[str] = None,
                 allow_random_vgg: bool = False, use_gan: bool = False, disc_start: int = 10000,
                 disc_weight: float = 0.5, disc_factor: float = 1.0, disc_dim: int = 64,
                 disc_num_layers: int = 3, disc_adaptive_weight: bool = True,
                 disc_loss: str = "hinge", disc_in_channels: int = 3):
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
        self.perceptual = None
        if self.use_perceptual:
            from losses.perceptual import build_taming_lpips

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
        """The seed's generator dict: base terms, optional terms, their weighted twins, total."""
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
        g_loss = -logits_fake.float().mean()
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
        """The seed's discriminator dict.  Both images are detached here."""
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
        return {"disc_loss": factor * self.d_loss(logits_real, logits_fake),
                "disc_weight": _scalar(factor, inputs),
                "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}


LOSS_ARG_NAMES = ("dino_loss_weight", "recon_loss_weight", "vq_loss_weight", "use_perceptual",
                  "perceptual_weight", "vgg_ckpt_path", "allow_random_vgg", "use_gan", "disc_start",
                  "disc_weight", "disc_factor", "disc_dim", "disc_num_layers", "disc_adaptive_weight",
                  "disc_loss", "disc_in_channels")


def loss_kwargs_from_config(cfg) -> Dict[str, object]:
    """``DinoVQLoss`` arguments from an ``ExperimentConfig``.

    Loss settings come from ``model_args`` (the seed's constructor names).  The GAN is on
    only when both ``model_args.use_gan`` (the seed's switch, default false) and the global
    ``train.use_gan`` (default true) are true.  ``train.vgg_ckpt_path`` and
    ``train.allow_random_vgg`` supply the VGG settings the model args leave out.
    """
    from train.schema import as_dict

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


class DinoVQLossCalculator(LossCalculator):
    """``LossCalculator`` for DinoVQ (registry: ``losses.dinovq_loss:DinoVQLossCalculator``).

    The batch is ``{"image": (B, 3, H, W) in [-1, 1], "dino_features": (B, N, dino_dim)}``.
    When ``"dino_features"`` is missing, the calculator asks its ``feature_source`` (set by
    :meth:`build`): the frozen teacher online (``adapters.dino_teacher``), or the cache of
    ``data.feature_cache`` looked up by ``batch["path"]``.  The teacher is kept out of this
    module's parameters and state dict (it is never trained nor saved), but follows
    ``.to(device)``.

    ``discriminator`` is ``loss_fn.discriminator`` (None without the GAN); checkpoint it as
    ``discriminator.*``.
    """

    family = "dinovq"

    def __init__(self, loss_fn: DinoVQLoss, disc_update_every: int = 1, feature_source=None):
        super().__init__()
        self.loss_fn = loss_fn
        self.disc_update_every = max(1, int(disc_update_every))
        # A plain attribute in a list: not a submodule, so never in state_dict / parameters.
        self._feature_source = [feature_source]

    @classmethod
    def build(cls, cfg, feature_source="auto") -> "DinoVQLossCalculator":
        """From an ``ExperimentConfig``.  ``feature_source="auto"`` uses the feature cache
        when ``data.feature_cache`` is set and the teacher of ``cfg.teacher`` otherwise;
        ``None`` means the trainer always supplies ``batch["dino_features"]``."""
        from adapters.dino_teacher import student_geometry
        from train.schema import as_dict

        (h, w), _ = student_geometry(cfg)
        size = int(cfg.data.image_size)
        if (h, w) != (size, size):
            raise UserError(f"data.image_size is {size} but model_args.img_size is {[h, w]}: DinoVQ trains on "
                            f"square crops of its own input size; set data.image_size: {h} and "
                            f"model_args.img_size: [{h}, {h}]" if h == w else
                            f"model_args.img_size {[h, w]} is not square: training crops are square; "
                            f"set model_args.img_size: [{h}, {h}] and data.image_size: {h}")
        kwargs = loss_kwargs_from_config(cfg)
        if as_dict(cfg.model_args).get("use_gan") and not kwargs["use_gan"]:
            # The one message a loss family may emit: the GAN the model args ask for is off.
            log.warning("train.use_gan is false: DinoVQ trains without its GAN although model_args.use_gan "
                        "is true (no discriminator, no discriminator optimizer, disc_factor 0)")
        calc = cls(DinoVQLoss(**kwargs),
                   disc_update_every=getattr(cfg.train, "disc_update_every", 1))
        if feature_source == "auto":
            if getattr(cfg.data, "feature_cache", None):
                from train.features import FeatureCache

                feature_source = FeatureCache.for_config(cfg)
            else:
                from adapters.dino_teacher import build_teacher

                feature_source = build_teacher(cfg)
        calc.feature_source = feature_source
        return calc

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
        if name == "feature_source":
            # The teacher must not become a submodule (no state_dict / parameters entries).
            self.__dict__["_feature_source"] = [value]
            return
        super().__setattr__(name, value)

    @property
    def feature_source(self):
        return self._feature_source[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if isinstance(self.feature_source, nn.Module):
            self.feature_source._apply(fn, *args, **kwargs)
        return self

    # ---- schedule -----------------------------------------------------------------------
    def disc_factor_at(self, global_step: int) -> float:
        return self.loss_fn.disc_factor_at(global_step)

    def should_update_discriminator(self, global_step: int) -> bool:
        return (self.loss_fn.disc_factor_at(global_step) > 0.0
                and global_step % self.disc_update_every == 0)

    # ---- steps --------------------------------------------------------------------------
    def features_for(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher features of ``batch``: given, looked up in the cache, or computed."""
        feats = batch.get("dino_features")
        if feats is not None:
            return feats.to(batch["image"].device)
        source = self.feature_source
        if source is None:
            raise UserError("DinoVQ needs teacher features: the batch has no 'dino_features' and no "
                            "teacher or feature cache is configured; set teacher.ckpt_path (or "
                            "teacher.allow_random for tests) or data.feature_cache")
        if hasattr(source, "features_for_batch"):
            return source.features_for_batch(batch)
        from adapters.dino_teacher import features_for_batch

        return features_for_batch(source, batch["image"])

    def generator_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], global_step: int,
                       split: str = "train") -> GeneratorOutput:
        images = batch["image"]
        feats = self.features_for(batch)
        out = model(images, return_dict=True)
        terms = self.loss_fn.generator_loss(images, out["reconstructions"], out["dino_pred"],
                                            out["vq_loss"], feats, global_step,
                                            last_layer=_unwrap(model).get_last_layer())
        log_ = {f"{split}/{k}": v.detach().float() for k, v in terms.items()}
        return GeneratorOutput(loss=terms["total_loss"], log=log_, inputs=images,
                               reconstructions=out["reconstructions"].detach(),
                               indices=out["indices"])

    def discriminator_step(self, out: GeneratorOutput, global_step: int, split: str = "train"):
        terms = self.loss_fn.discriminator_loss(out.inputs, out.reconstructions, global_step)
        return terms["disc_loss"], {f"{split}/{k}": v.detach().float() for k, v in terms.items()}
