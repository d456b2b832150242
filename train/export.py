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

A model whose config turns on something upstream's code does not do (the model type's
registered ``stock_incompatible``, e.g. TamingVQGAN's ``codebook_l2_norm`` /
``codebook_embed_dim`` lookup) is refused (exit 2): stock taming would load it, or fail on
a shape, and decode its codes into other images.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Dict, Optional

import torch

from adapters.registry import RegistryError, get_model_type
from train import atomic
from train.config import ConfigFileError, load_yaml_text, read_config_file
from train.errors import UserError
from train.sources import Source, locate, read_state


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


def _config_of(source: Source, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The run's config as plain data: the one inside a trainer checkpoint, else the
    ``config.yaml`` beside the source; None when there is neither."""
    try:
        if isinstance(state.get("config"), str):
            doc, _ = load_yaml_text(state["config"], f"{source.state_path} (its config)")
        elif source.config_path:
            doc, _, _ = read_config_file(source.config_path)
        else:
            return None
    except ConfigFileError as exc:
        raise UserError(f"--export {source.path}: {exc}") from None
    return doc if isinstance(doc, dict) else None


def _refuse_unstock(src: str, data: Optional[Dict[str, Any]]) -> None:
    """UserError when upstream taming would decode this model differently from this tool."""
    if not data or not data.get("model_type"):
        return
    try:
        spec = get_model_type(str(data["model_type"]))
    except RegistryError:
        return
    reason = spec.stock_incompatible(data)
    if reason:
        raise UserError(f"--export {src}: refusing to export: {reason}. Stock taming would load this "
                        f"{spec.name} checkpoint (or fail on a shape) and decode every code into a different "
                        "image. Keep using it here (python -m train eval / encode / decode read the run "
                        "folder), or train without these model_args to get an exportable model")


def export_checkpoint(src: str, out_path: str, force: bool = False) -> Dict[str, Any]:
    """Write the upstream checkpoint; returns a small summary for the CLI."""
    if os.path.isdir(out_path):
        raise UserError(f"--out {out_path} is a folder; --export writes a file, e.g. --out model.ckpt")
    if os.path.exists(out_path) and not force:
        raise UserError(f"--out {out_path} exists; choose another name or pass --force")
    source = locate(src, "--export")
    state = read_state(source)
    _refuse_unstock(src, _config_of(source, state))
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
