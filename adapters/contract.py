"""The model contract: what every registered model answers, whatever its type.

The trainer, the loss families, ``eval`` and ``migrate`` only use these members, so they
never ask which model they hold:

* ``forward(x)`` -> ``(reconstruction, quantizer_loss)`` (taming's and rosinality's shape);
  ``forward(x, return_codes=True)`` -> ``(reconstruction, quantizer_loss, codes)`` with
  ``codes`` a tuple of LongTensors, one (B, h, w) map per codebook, in ``codebook_names``
  order.  Losses call it through the (possibly DDP-wrapped) model so DDP sees the forward.
* ``codebook_names`` / ``codebook_sizes``: one entry per codebook (usage statistics).
* ``encode_code(x)``: the code maps alone (a tuple as ``forward``'s ``codes``), without
  the decoder and deterministic in eval mode (``python -m train encode``);
  ``decode_code(*codes)``: code maps back to images.
* ``get_last_layer()``: the decoder's last weight (the adaptive GAN weight).
* ``generator_parameters()``: what the generator optimizer owns (EMA codebooks are buffers
  updated by EMA, never by the optimizer).
* ``before_step(global_step)`` -> ``{log name: value}``: called by the trainer before each
  step (GumbelVQ's temperature schedule); most models do nothing and return ``{}``.
* ``init_codebook_from_data(images, seed, batch_size)``: EMA codebooks start from encoder
  outputs (``train.init_codebook_from_data``); models without one refuse with a message.
* ``codebook_vectors(images, batch_size)`` -> one (N, dim) float tensor per codebook: the
  encoder outputs of ``images`` in the space codes are looked up in (eval mode, no grad);
  ``set_codes(index, ids, vectors)`` -> the tensors it changed: codes ``ids`` of codebook
  ``index`` become ``vectors`` with their EMA statistics reset (a count of 1, as the data
  start).  Together they are k-means starts (``train.init_codebook_kmeans_iters``) and
  dead-code restarts (``train.dead_code_threshold``, ``train/dead_codes.py``); models
  without such codebooks refuse with a message.

Models store nothing about the last batch.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from train.errors import UserError


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """The quantized ``z_q`` forward, the identity to ``z`` backward: the straight-through
    estimator of van den Oord et al. (VQ-VAE, 2017), which every quantizer here uses.

    taming and rosinality write it ``z + (z_q - z).detach()``, whose value is ``z_q`` only up
    to rounding (an ulp here and there), so a model's forward and the decoding of its own
    codes differed by a grey level on a few pixels.  ``z_q.detach() + (z - z.detach())`` has
    the same gradient (``z - z.detach()`` hands the incoming gradient to ``z`` unchanged and
    nothing reaches ``z_q``) and its value is ``z_q`` exactly (``z - z`` is 0 for finite z),
    so ``forward(x)`` is ``decode_code(*encode_code(x))`` bit for bit.
    """
    return z_q.detach() + (z - z.detach())


class Tokenizer(nn.Module):
    """Base class of every registered model (defaults for the optional members)."""

    codebook_names: Tuple[str, ...] = ("codebook",)

    @property
    def codebook_sizes(self) -> Tuple[int, ...]:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def get_last_layer(self) -> torch.Tensor:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def encode_code(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Code maps of ``x``, one (B, h, w) LongTensor per codebook.  This default runs the
        whole forward; models override it to skip the decoder."""
        return tuple(self(x, return_codes=True)[2])

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def before_step(self, global_step: int) -> Dict[str, float]:
        return {}

    def init_codebook_from_data(self, images: torch.Tensor, seed: int = 0, batch_size: int = 16):
        raise UserError(f"train.init_codebook_from_data: {type(self).__name__} has no EMA codebook to start "
                        "from data; set train.init_codebook_from_data=false")

    def codebook_vectors(self, images: torch.Tensor, batch_size: int = 16) -> Tuple[torch.Tensor, ...]:
        raise UserError(f"{type(self).__name__} has no codebook to start or restart from encoder outputs; set "
                        "train.init_codebook_kmeans_iters=0 and train.dead_code_threshold=null")

    def set_codes(self, index: int, ids: torch.Tensor, vectors: torch.Tensor) -> List[torch.Tensor]:
        raise UserError(f"{type(self).__name__} has no codebook to start or restart from encoder outputs; set "
                        "train.init_codebook_kmeans_iters=0 and train.dead_code_threshold=null")


def encode_in_chunks(model: nn.Module, fn, images: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    """``fn(chunk)`` over ``images`` ``batch_size`` at a time, in eval mode without gradients,
    on the model's device (the training mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            return [fn(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
