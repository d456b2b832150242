"""``train.ema_decay``: an exponential moving average of the generator's weights.

    python -m train fit CONFIG --data /images train.ema_decay=0.999
    python -m train eval RUN --weights ema        # the default when the run has EMA weights

Laid out as latent-diffusion's ``LitEma`` (``ldm/modules/ema.py``, Rombach et al. 2022) keeps
it in its checkpoints, so LDM-style tools read the shadows: buffers ``decay`` (float32),
``num_updates`` (int32) and one shadow per trainable parameter, named as the parameter with
the dots removed (``encoder.conv_in.weight`` -> ``encoderconv_inweight``); in a state dict they
sit under ``model_ema.``.  The update is LitEma's::

    num_updates += 1
    d = min(decay, (1 + num_updates) / (10 + num_updates))     # short runs: a shorter average
    shadow -= (1 - d) * (shadow - param)

It runs once per optimizer step, after the step, on the device, without reading anything
back to the host (the step count is mirrored as a Python int).  Weight EMA for tokenizers is
part of MaskBit's recipe (Weber et al. 2024).  The trainer's checkpoint holds the buffers in a
``model_ema`` entry and ``last.safetensors`` holds them as ``model_ema.*`` keys next to the
raw weights; ``eval`` and ``encode`` use the shadows when present (``--weights ema|raw``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

PREFIX = "model_ema."
WEIGHT_CHOICES = ("ema", "raw")


def shadow_name(param_name: str) -> str:
    """LitEma's buffer name for a parameter: its dotted name without the dots."""
    return param_name.replace(".", "")


class WeightEMA(nn.Module):
    """Shadows of ``model``'s parameters that have ``requires_grad`` (the generator's)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.register_buffer("decay", torch.tensor(float(decay), dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int32))
        self._decay, self._updates = float(decay), 0
        self.names: Dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[name] = shadow_name(name)
                self.register_buffer(self.names[name], p.detach().clone())
        self._pairs = [(p, getattr(self, self.names[n])) for n, p in model.named_parameters() if n in self.names]

    @torch.no_grad()
    def update(self) -> None:
        self._updates += 1
        self.num_updates.add_(1)
        d = min(self._decay, (1 + self._updates) / (10 + self._updates))
        params = [p.detach() for p, _ in self._pairs]
        shadows = [s for _, s in self._pairs]
        torch._foreach_lerp_(shadows, params, 1.0 - d)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Mirror the restored counter on the host (read once, at load time).
        self._updates = int(self.num_updates)
        self._decay = float(self.decay)

    def prefixed_state(self) -> Dict[str, torch.Tensor]:
        """The buffers as ``model_ema.*`` keys (the layout of an LDM checkpoint)."""
        return {PREFIX + k: v for k, v in self.state_dict().items()}


def split_ema(weights: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(model weights, EMA buffers without the prefix)`` of a flat weights dict."""
    model = {k: v for k, v in weights.items() if not k.startswith(PREFIX)}
    ema = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    return model, ema


def apply_ema(model_weights: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``model_weights`` with each parameter that has a shadow in ``ema`` replaced by it."""
    out = dict(model_weights)
    for name in model_weights:
        s = shadow_name(name)
        if s in ema and s not in ("decay", "num_updates"):
            out[name] = ema[s]
    return out


def choose_weights(model_weights: Dict[str, torch.Tensor], ema: Optional[Dict[str, torch.Tensor]],
                   which: Optional[str], command: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(weights to load, "ema" | "raw")``: EMA weights by default when the source has them."""
    from train.errors import UserError

    if which not in (None,) + WEIGHT_CHOICES:
        raise UserError(f"{command} --weights {which!r} is unknown; valid choices: {', '.join(WEIGHT_CHOICES)}")
    if which == "raw" or (which is None and not ema):
        return model_weights, "raw"
    if not ema:
        raise UserError(f"{command} --weights ema: the checkpoint has no EMA weights (it was trained without "
                        "train.ema_decay); use --weights raw")
    return apply_ema(model_weights, ema), "ema"


def add_weights_argument(parser) -> None:
    """``--weights ema|raw`` of ``eval``, ``encode`` and ``decode``."""
    parser.add_argument("--weights", choices=WEIGHT_CHOICES,
                        help="ema: the weight EMA (train.ema_decay), raw: the trained weights "
                             "(default: ema when the checkpoint has it)")


__all__ = ["WeightEMA", "split_ema", "apply_ema", "choose_weights", "add_weights_argument", "shadow_name", "PREFIX", "WEIGHT_CHOICES"]
