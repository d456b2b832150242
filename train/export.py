"""Export back to upstream taming: a plain ``{"state_dict": ...}`` checkpoint.

    python -m train migrate --export DIR --out model.ckpt

``DIR`` is a folder written by ``python -m train migrate`` (``model.safetensors``, optional
``discriminator.safetensors``, ``train_state.pt``), a run folder of ``python -m train fit``
(its ``checkpoints/last.ckpt``), or such a ``.ckpt`` file itself.  The output holds::

    {"state_dict": {encoder.*, decoder.*, quantize.*, quant_conv.*, post_quant_conv.*,
                    loss.discriminator.*},
     "global_step": int, "epoch": int}

-- upstream key names, tensors and ints only.  ``taming.models.vqgan.VQModel(...,
ckpt_path=FILE)`` (``init_from_ckpt`` reads ``["state_dict"]``) and ``load_state_dict`` take
it; upstream's ``loss.perceptual_loss.*`` (fixed LPIPS weights) are not written, so load
with ``strict=False`` or build the loss first, as ``init_from_ckpt`` does.  Migrating the
exported file again gives identical tensors (the round trip is tested).
"""
from __future__ import annotations

import collections
import os
from typing import Any, Dict

import torch

from train import atomic
from train.errors import UserError
from train.sources import locate, read_state


def upstream_state_dict(model_sd: Dict[str, torch.Tensor], loss_sd: Dict[str, torch.Tensor]
                        ) -> Dict[str, torch.Tensor]:
    """Upstream's Lightning-module key names: the model's own, and ``loss.`` + the loss's
    ``discriminator.*`` entries."""
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in model_sd.items():
        out[key] = value
    for key, value in (loss_sd or {}).items():
        if key.startswith("discriminator."):
            out["loss." + key] = value
    return out


def export_checkpoint(src: str, out_path: str, force: bool = False) -> Dict[str, Any]:
    """Write the upstream checkpoint; returns a small summary for the CLI."""
    if os.path.isdir(out_path):
        raise UserError(f"--out {out_path} is a folder; --export writes a file, e.g. --out model.ckpt")
    if os.path.exists(out_path) and not force:
        raise UserError(f"--out {out_path} exists; choose another name or pass --force")
    state = read_state(locate(src, "--export"))
    model_sd = state.get("model") or {}
    if not model_sd:
        raise UserError(f"--export {src}: no model weights found")
    sd = upstream_state_dict(model_sd, state.get("loss") or {})
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
               "global_step": int(state.get("global_step") or 0), "epoch": int(state.get("epoch") or 0)}
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    atomic.save_torch(payload, out_path)
    n_disc = sum(k.startswith("loss.discriminator.") for k in sd)
    return {"tensors": len(sd), "discriminator_tensors": n_disc, "global_step": payload["global_step"],
            "epoch": payload["epoch"]}
