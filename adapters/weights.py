"""Load weights into a model with errors a user can act on.

``load_model_weights`` is ``nn.Module.load_state_dict`` with three additions:

* prefixes that wrappers add (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``) are
  stripped, so checkpoints written from wrapped models load into bare ones;
* every shape mismatch is reported at once, each with the key, the model's shape (from the
  config) and the checkpoint's shape, and which config entry to fix;
* missing and unexpected keys are listed (the first few) with a hint at the likely cause
  (another variant, ``loss.*`` entries, a different ``ddconfig``).

``load_checkpoint_state_dict(path)`` reads a state dict from a Lightning ``.ckpt``, a plain
``torch.save`` file or a ``.safetensors`` file without executing code from the file.

    >>> sd = load_checkpoint_state_dict("last.ckpt")           # doctest: +SKIP
    >>> load_model_weights(model, drop_prefixes(sd, ("loss.",)), source="last.ckpt")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from train.errors import UserError
from train.safe_load import extract_state_dict, load_checkpoint

# Prefixes that wrappers put in front of every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many keys an error message lists before "... and N more".
SHOW_KEYS = 5

# Which config entry decides the shape of a key (first matching prefix wins).
_SHAPE_HINTS = (
    ("quantize.embedding.", "n_embed / embed_dim"),
    ("quantize.embed.", "n_embed / embed_dim"),
    ("quantize.proj.", "n_embed and ddconfig.z_channels"),
    ("quantize.used", "remap (the .npy file of used codes)"),
    ("quant_conv.", "embed_dim / ddconfig.z_channels"),
    ("post_quant_conv.", "embed_dim / ddconfig.z_channels"),
    ("encoder.", "ddconfig (ch, ch_mult, z_channels, double_z, in_channels)"),
    ("decoder.", "ddconfig (ch, ch_mult, z_channels, out_ch)"),
    ("loss.discriminator.", "lossconfig.params (disc_in_channels, disc_ndf, disc_num_layers)"),
    ("discriminator.", "lossconfig.params (disc_in_channels, disc_ndf, disc_num_layers)"),
)


def _shape_hint(key: str) -> str:
    for prefix, what in _SHAPE_HINTS:
        if key.startswith(prefix):
            return what
    return "the model arguments"


def _fmt_shape(shape) -> str:
    dims = tuple(int(s) for s in shape)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOW_KEYS])
    return shown + (f" ... and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else "")


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object (Lightning ``{"state_dict": ...}`` or plain)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state dict; "
                        "save the model's state_dict() (or a Lightning .ckpt) instead")
    return dict(obj)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor],
                           prefixes: Iterable[str] = WRAPPER_PREFIXES) -> Dict[str, torch.Tensor]:
    """Remove DDP / torch.compile prefixes (repeatedly: DDP around a compiled model)."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def drop_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` without the keys that start with any of ``prefixes``."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}


def _variant_hint(missing: List[str], unexpected: List[str]) -> str:
    """Recognise a checkpoint of another TamingVQGAN variant from its quantizer keys."""
    has = set(unexpected)
    lacks = set(missing)
    if {"quantize.embedding.cluster_size", "quantize.embedding.embed_avg"} & has:
        return " The checkpoint has an EMA codebook: set model_variant: EMAVQ."
    if {"quantize.proj.weight", "quantize.embed.weight"} & has:
        return " The checkpoint has a Gumbel quantizer: set model_variant: Gumbel."
    if {"quantize.embedding.cluster_size", "quantize.embedding.embed_avg"} & lacks and \
            "quantize.embedding.weight" not in lacks:
        return (" The checkpoint has a gradient-trained codebook (VQModel) without EMA statistics: "
                "set model_variant: VQ (or NoDisc).")
    if {"quantize.proj.weight", "quantize.embed.weight"} & lacks and "quantize.embedding.weight" in has:
        return " The checkpoint has a VectorQuantizer2 codebook: set model_variant: VQ (or EMAVQ)."
    if "quantize.used" in has:
        return " The checkpoint was trained with remap: set model_args.remap to its .npy file."
    if "quantize.used" in lacks:
        return " The checkpoint was trained without remap: remove model_args.remap."
    return ""


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                       source: str = "checkpoint", allow_missing: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """Copy ``state_dict`` into ``model``; returns ``(missing, unexpected)`` key lists.

    Shape mismatches are always an error (:class:`UserError` naming each key and both
    shapes).  With ``strict``, missing or unexpected keys are an error too, except missing
    keys under one of the ``allow_missing`` prefixes (those keep their initial values).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # keys are compared against the bare model's names
    state_dict = strip_wrapper_prefixes(unwrap_state_dict(state_dict))
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{source}: entries that are not tensors: {_listing(bad)}; "
                        "this is not a model state dict")
    own = model.state_dict()

    mismatched = [(k, own[k].shape, state_dict[k].shape) for k in state_dict
                  if k in own and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if mismatched:
        # Codebook sizes are the usual culprit (n_embed / embed_dim): list them first.
        mismatched.sort(key=lambda item: not item[0].startswith("quantize."))
        lines = [f"{k}: config {_fmt_shape(a)} vs checkpoint {_fmt_shape(b)} (fix {_shape_hint(k)})"
                 for k, a, b in mismatched[:SHOW_KEYS]]
        more = f"; ... and {len(mismatched) - SHOW_KEYS} more" if len(mismatched) > SHOW_KEYS else ""
        raise UserError(f"{source}: {len(mismatched)} tensor shape(s) differ from the model the config "
                        f"builds: {'; '.join(lines)}{more}. Change the config to the checkpoint's "
                        "sizes (or use a checkpoint trained with this config).")

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict:
        allow = tuple(allow_missing)
        hard_missing = [k for k in missing if not (allow and k.startswith(allow))]
        problems = []
        if hard_missing:
            problems.append(f"missing from the checkpoint: {_listing(hard_missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not in the model: {_listing(unexpected)}")
        if problems:
            hint = _variant_hint(hard_missing, unexpected)
            if unexpected and all(k.startswith("loss.") for k in unexpected):
                hint += " The loss.* entries belong to the loss (LossCalculator), not the model: drop them."
            elif not hint:
                hint = (" Check model_type, model_variant and ddconfig against the config the checkpoint "
                        "was trained with (or load with strict=False to keep the initial values).")
            raise UserError(f"{source}: the checkpoint does not fit the model: "
                            f"{'; '.join(problems)}.{hint}")
    model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


def load_checkpoint_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read the state dict stored in ``path`` without running code from the file.

    :func:`train.safe_load.load_checkpoint`: torch's weights-only loader, with the classes of
    Lightning checkpoints as inert placeholders; ``.safetensors`` too.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}; check ckpt_path")
    state_dict, _notes = extract_state_dict(load_checkpoint(path).data)
    return dict(state_dict)
