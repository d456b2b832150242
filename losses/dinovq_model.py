"""The DinoVQ reference API: a DinoVQ network that owns its loss.

    from losses.dinovq_model import DinoVQModel
    model = DinoVQModel(img_size=(224, 224), encoder_embed_dim=768, codebook_size=8192,
                        use_gan=True, disc_start=10000)
    losses = model.compute_loss(imgs, dino_features_gt, update_type="generator", global_step=step)
    losses["total_loss"].backward()
    disc = model.compute_loss(imgs, dino_features_gt, update_type="discriminator", global_step=step)
    disc["disc_loss"].backward()

The constructor takes the network's arguments (``adapters.dinovq.DinoVQNet``) and the
loss's (``losses.dinovq_loss.DinoVQLoss``); ``model.loss_fn.discriminator`` is the
discriminator to optimise separately.  The returned keys are the reference contract (see
``losses/dinovq_loss.py``).  It sits here, with the loss family, because a network
definition never imports its loss; the trainer uses ``DinoVQNet`` and
``DinoVQLossCalculator`` instead.
"""
from __future__ import annotations

import inspect
from typing import Dict

import torch

from adapters.dinovq import DinoVQNet
from losses.dinovq_loss import DinoVQLoss

_NET_ARGS = tuple(n for n in inspect.signature(DinoVQNet).parameters)
_LOSS_ARGS = tuple(n for n in inspect.signature(DinoVQLoss).parameters if n != "disc_in_channels")


class DinoVQModel(DinoVQNet):
    """``DinoVQNet`` plus its ``DinoVQLoss`` (``loss_fn``) and ``compute_loss``.

    ``build_loss=False`` builds the network only: then ``loss_fn`` is None and
    ``compute_loss`` is unavailable.
    """

    def __init__(self, *args, build_loss: bool = True, **kwargs):
        unknown = sorted(set(kwargs) - set(_NET_ARGS) - set(_LOSS_ARGS))
        if unknown:
            raise TypeError(f"DinoVQModel got unexpected argument(s) {', '.join(unknown)}")
        super().__init__(*args, **{k: v for k, v in kwargs.items() if k in _NET_ARGS})
        loss_kwargs = {k: v for k, v in kwargs.items() if k in _LOSS_ARGS}
        self.use_gan = bool(loss_kwargs.get("use_gan", False))
        self.loss_fn = DinoVQLoss(**loss_kwargs, disc_in_channels=self.in_channels) if build_loss else None
        # The discriminator update reuses the reconstructions of the generator update that
        # ran on the very same (unmodified) image tensor.
        self._last_generator = None

    def compute_loss(self, imgs: torch.Tensor, dino_features_gt: torch.Tensor,
                     update_type: str = "generator", global_step: int = 0) -> Dict[str, torch.Tensor]:
        """The reference loss dict for a generator or a discriminator update."""
        if self.loss_fn is None:
            raise RuntimeError("this DinoVQModel was built without its loss (build_loss=False, the "
                               "trainer's path); use losses.dinovq_loss.DinoVQLossCalculator")
        if update_type == "generator":
            out = self(imgs, return_dict=True)
            if self.use_gan:  # only a discriminator update ever reads it back
                self._last_generator = (imgs, imgs._version, out["reconstructions"].detach())
            return self.loss_fn.generator_loss(imgs, out["reconstructions"], out["dino_pred"],
                                               out["vq_loss"], dino_features_gt, global_step,
                                               last_layer=self.get_last_layer())
        if update_type == "discriminator":
            if not self.use_gan:
                raise ValueError("compute_loss(update_type='discriminator') needs use_gan=True: this "
                                 "DinoVQ model has no discriminator; construct it with use_gan=True "
                                 "or only run generator updates")
            return self.loss_fn.discriminator_loss(imgs, self._reconstruct_detached(imgs), global_step)
        raise ValueError(f"unknown update_type {update_type!r}; valid choices: 'discriminator', "
                         "'generator'")

    def _reconstruct_detached(self, imgs: torch.Tensor) -> torch.Tensor:
        cached = self._last_generator
        self._last_generator = None
        if cached is not None and cached[0] is imgs and cached[1] == imgs._version:
            return cached[2]
        # No matching generator step: reconstruct without gradients and without moving the
        # EMA codebook (a second update per step would count the batch twice).
        with torch.no_grad():
            return self(imgs, return_dict=True, update_codebook=False)["reconstructions"]


__all__ = ["DinoVQModel"]
