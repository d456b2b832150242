"""``python -m train validate PATH... [--json] [--fix OUT]``: every finding, with its fix.

Validation collects every finding before reporting (as pydantic and OmegaConf do): each
has a level (error / warning / info), a dotted key path, a machine code, a message and a
fix.  ``--fix OUT`` writes a corrected config in the input's own format.

Exit codes: 0 no errors (warnings allowed), 1 any error, 2 unusable file (missing, empty,
unparseable, a directory, not a config) -- one line naming the file.

    python -m train validate configs/legacy/taming_vqvae2_mismatch.json
    python -m train validate configs/legacy/taming_vqvae2_mismatch.json --fix fixed.json
"""
from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from adapters import registry
from train.config import (Normalized, SECTION_CLASSES, accepted_model_args, apply_overrides, canonicalize,
                          normalize, to_structured, type_errors, unknown_keys)
from train import atomic
from train.errors import UserError

DELETE = object()  # a fix operation that removes the key

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass
class Finding:
    level: str        # error | warning | info
    path: str         # dotted key path in the normalized config
    code: str         # machine-readable code
    message: str
    fix: str = ""
    # operations that --fix applies: (normalized dotted path, new value or DELETE)
    ops: List[Tuple[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self) -> Dict[str, str]:
        return {"level": self.level, "path": self.path, "code": self.code, "message": self.message,
                "fix": self.fix}


# Discriminator settings of taming's loss that do nothing when use_gan is false.
DISC_KEYS = ("disc_start", "disc_weight", "disc_factor", "disc_num_layers", "disc_in_channels", "disc_ndf",
             "disc_loss", "disc_conditional", "use_actnorm")
DDCONFIG_INT_KEYS = ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels")


def _near(value: str, choices: Sequence[str]) -> Optional[str]:
    hits = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return hits[0] if hits else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce_like(value, default):
    """Best-effort conversion of ``value`` to the type of ``default`` (for --fix), or None."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            return None
        if isinstance(default, int):
            f = float(value)
            return int(f) if f == int(f) else None
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        return None
    return None


# ----------------------------------------------------------------------------------
# Rules.  Each takes the normalized data and appends findings.

def rule_model_type(data: Dict[str, Any], out: List[Finding]) -> Optional[registry.ModelTypeSpec]:
    model_type = data.get("model_type")
    if model_type is None:
        out.append(Finding(ERROR, "model_type", "missing_model_type", "no model type given",
                           f"set model_type to one of {', '.join(registry.list_model_types())}"))
        return None
    if model_type in registry.NOT_FIRST_STAGE:
        out.append(Finding(ERROR, "model_type", "not_first_stage",
                           f"{model_type} is {registry.NOT_FIRST_STAGE[model_type]}, not a first-stage tokenizer; "
                           "this tool trains first-stage VQ tokenizers",
                           "point the tool at the first-stage config (e.g. its first_stage_config / a VQGAN YAML) "
                           "instead"))
        return None
    try:
        return registry.get_model_type(str(model_type))
    except registry.RegistryError as exc:
        spec_names = registry.list_model_types()
        near = _near(str(model_type), spec_names)
        out.append(Finding(ERROR, "model_type", "unknown_model_type", str(exc),
                           f"set model_type: {near}" if near else f"use one of {', '.join(spec_names)}",
                           [("model_type", near)] if near else []))
        return None


def rule_variant(data: Dict[str, Any], spec, out: List[Finding]) -> Optional[str]:
    variant = data.get("model_variant")
    if spec is None or variant is None:
        return spec.default_variant if spec else None
    try:
        return registry.resolve_variant(spec, variant)
    except registry.RegistryError:
        pass
    owners = [t for t in registry.types_with_variant(variant) if t != spec.name]
    if owners:
        owner = owners[0]
        drop = "model_args.model_variant"
        own_loss = registry.get_loss_family(spec.loss_family).target
        lose = ""
        target = (data.get("lossconfig") or {}).get("target")
        if target:
            fam = registry.loss_family_of_target(str(target))
            if fam and fam != spec.loss_family:
                lose = f"; its {fam} loss (lossconfig) would be silently dropped"
        message = (f"model_type {spec.name!r} has no variant {variant!r}: {variant!r} is a {owner} variant, so "
                   f"the {spec.name} adapter would be built{lose}")
        fix = (f"set model_type: {owner} (keeps model_variant {variant!r} and its loss); or, if {spec.name} was "
               f"meant, remove model_variant ({drop})")
        if spec.name == "vqvae2":
            fix += (" and lossconfig (VQ-VAE-2's codebooks are always EMA; its loss is "
                    f"{own_loss})")
        out.append(Finding(ERROR, "model_variant", "variant_mismatch", message, fix, [("model_type", owner)]))
        return variant
    choices = list(spec.variants)
    near = _near(str(variant), choices)
    if choices:
        out.append(Finding(ERROR, "model_variant", "unknown_variant",
                           f"model_type {spec.name!r} has no variant {variant!r} (variants: {', '.join(choices)})",
                           f"set model_variant: {near}" if near else f"use one of {', '.join(choices)}",
                           [("model_variant", near)] if near else []))
    else:
        out.append(Finding(ERROR, "model_variant", "unknown_variant",
                           f"model_type {spec.name!r} has no variants; model_variant {variant!r} means nothing",
                           "remove model_variant", [("model_variant", DELETE)]))
    return None


def _effective_spec(data, spec, out) -> Optional[registry.ModelTypeSpec]:
    """The model type after a variant_mismatch fix (so later rules judge the intended model)."""
    for f in out:
        if f.code == "variant_mismatch":
            return registry.get_model_type(f.ops[0][1])
    return spec


def rule_loss_target(data: Dict[str, Any], spec, out: List[Finding]) -> Optional[str]:
    """Check the loss target against the model type; return the loss family that applies."""
    if spec is None:
        return None
    loss = data.get("lossconfig") or {}
    target = loss.get("target")
    if target is None:
        return spec.loss_family
    fixed, note = registry.canonical_loss_target(str(target))
    if note:
        out.append(Finding(INFO, "lossconfig.target", "vendored_target", note,
                           f"write target: {fixed}", [("lossconfig.target", fixed)]))
    family = registry.loss_family_of_target(fixed)
    if fixed == "taming.modules.losses.vqperceptual.DummyLoss":
        return "none"
    if family is None:
        near = _near(fixed, registry.known_loss_targets())
        out.append(Finding(ERROR, "lossconfig.target", "unknown_loss_target",
                           f"unknown loss target {target!r}",
                           f"use {near}" if near else f"use one of {', '.join(registry.known_loss_targets())}",
                           [("lossconfig.target", near)] if near else []))
        return None
    if family != spec.loss_family and not any(f.code == "variant_mismatch" for f in out):
        own = registry.get_loss_family(spec.loss_family)
        takers = [n for n in registry.list_model_types() if registry.get_model_type(n).loss_family == family]
        out.append(Finding(ERROR, "lossconfig.target", "loss_family_mismatch",
                           f"model_type {spec.name!r} takes the {spec.loss_family} loss family, but lossconfig.target "
                           f"is the {family} family ({fixed}); it would be silently dropped",
                           f"set model_type: {takers[0]} to use this loss, or set lossconfig.target: {own.target}"
                           if takers else f"set lossconfig.target: {own.target}",
                           [("model_type", takers[0])] if takers else []))
    return family


def _loss_signature(family: str) -> Optional[Dict[str, inspect.Parameter]]:
    """Constructor parameters of the installed loss class a family's target names."""
    import importlib

    target = registry.get_loss_family(family).target
    module_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        return None
    params = dict(inspect.signature(cls.__init__ if not hasattr(cls, "__dataclass_fields__") else cls).parameters)
    params.pop("self", None)
    params = {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return params


def rule_loss_params(data: Dict[str, Any], family: Optional[str], out: List[Finding]) -> None:
    if family in (None, "none"):
        return
    params = (data.get("lossconfig") or {}).get("params") or {}
    if not isinstance(params, dict):
        out.append(Finding(ERROR, "lossconfig.params", "bad_type", "lossconfig.params must be a mapping",
                           "write params as key: value pairs"))
        return
    signature = _loss_signature(family)
    if signature is None:
        return
    for key, value in params.items():
        path = f"lossconfig.params.{key}"
        if key not in signature:
            near = _near(key, list(signature))
            out.append(Finding(ERROR, path, "unknown_loss_param",
                               f"the {family} loss has no parameter {key!r}"
                               + (f" (nearest valid: {near!r})" if near else ""),
                               f"rename it to {near}" if near else
                               f"remove it; valid parameters: {', '.join(signature)}",
                               [(path, DELETE), (f"lossconfig.params.{near}", value)] if near else [(path, DELETE)]))
            continue
        default = signature[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            if key == "disc_start" and not _is_int(value):
                _type_finding(out, path, value, 0, "an integer (steps)")
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                _type_finding(out, path, value, default, "true or false")
        elif isinstance(default, (int, float)):
            if not _is_number(value):
                _type_finding(out, path, value, default, "a number")
        elif isinstance(default, str) and not isinstance(value, str):
            _type_finding(out, path, value, default, "a string")


def _type_finding(out, path, value, default, what):
    fixed = _coerce_like(value, default)
    out.append(Finding(ERROR, path, "bad_type", f"{path} is {value!r} ({type(value).__name__}); expected {what}",
                       f"write {path.split('.')[-1]}: {fixed!r}" if fixed is not None else f"write {what}",
                       [(path, fixed)] if fixed is not None else [(path, DELETE)]))


def rule_schema(data: Dict[str, Any], out: List[Finding]) -> None:
    for path, suggestion in unknown_keys({k: v for k, v in data.items() if not k.startswith("_")}):
        out.append(Finding(ERROR, path, "unknown_key", f"unknown key {path!r}.{suggestion}",
                           "rename or remove it", [(path, DELETE)]))
    for path, message in type_errors(data):
        section, _, key = path.partition(".")
        default = None
        if section in SECTION_CLASSES and key:
            default = getattr(SECTION_CLASSES[section](), key, None)
        fixed = _coerce_like(data[section][key], default) if key and default is not None else None
        out.append(Finding(ERROR, path, "bad_type", f"{path}: {message}",
                           f"write {key}: {fixed!r}" if fixed is not None else "write a value of the right type "
                           "or remove the key (the default applies)",
                           [(path, fixed)] if fixed is not None else [(path, DELETE)]))


def rule_extras(norm: Normalized, out: List[Finding]) -> None:
    for path in norm.data.get("extras", {}):
        out.append(Finding(WARNING, f"extras.{path}", "ignored_key",
                           f"{path} is not used by this tool and is ignored (kept in the config's extras)",
                           "remove it if it is stale, or check its spelling"))
    upstream = norm.data.get("upstream", {})
    if "data" in upstream:
        target = (upstream["data"] or {}).get("target")
        out.append(Finding(INFO, "upstream.data", "upstream_data",
                           f"the upstream data section ({target}) is read for batch size and image size only",
                           "pass --data FOLDER|FILELIST|builtin to fit"))
    if "lightning" in upstream:
        out.append(Finding(INFO, "upstream.lightning", "upstream_lightning",
                           "the lightning section is read for max_steps / accumulate_grad_batches only",
                           "set train.* keys to control training"))
    for path, note in norm.notes:
        out.append(Finding(INFO, path, "renamed_key", note, f"write it as {path} in the native config"))


def rule_gan(data: Dict[str, Any], family: Optional[str], out: List[Finding]) -> None:
    train = data.get("train") or {}
    use_gan = train.get("use_gan", True)
    params = (data.get("lossconfig") or {}).get("params") or {}
    if family == "dinovq":
        params = data.get("model_args") or {}
        use_gan = params.get("use_gan", False)
    if not isinstance(params, dict) or not isinstance(use_gan, bool):
        return
    present = [k for k in DISC_KEYS if k in params]
    if not use_gan and present:
        out.append(Finding(INFO, "train.use_gan", "gan_settings_inert",
                           f"use_gan is false: the discriminator settings {', '.join(present)} are inert "
                           "(disc_factor 0, no discriminator step or optimizer)",
                           "set use_gan: true to train with the GAN, or remove them"))
    max_steps = train.get("max_steps")
    disc_start = params.get("disc_start", 0 if family != "taming" else None)
    if use_gan and _is_int(max_steps) and _is_int(disc_start) and disc_start >= max_steps:
        out.append(Finding(WARNING, "lossconfig.params.disc_start", "gan_never_starts",
                           f"disc_start {disc_start} is at or beyond max_steps {max_steps}: the GAN never starts",
                           "lower disc_start, raise max_steps, or set use_gan: false"))


def rule_train_values(data: Dict[str, Any], out: List[Finding]) -> None:
    """Values the right type but out of range, which torch / numpy would otherwise reject with
    a traceback mid-start (``Invalid learning rate: -1.0``, negative seeds, num_workers) or
    silently turn into NaN weights (``grad_clip: nan``)."""
    train = data.get("train") or {}
    if not isinstance(train, dict):
        return

    def bad(key, message, fix, default_fits=True):
        # --fix removes the key where the default is a sound value; a learning rate has none.
        out.append(Finding(ERROR, f"train.{key}", "bad_value", f"train.{key} is {train[key]!r}: {message}",
                           fix, [(f"train.{key}", DELETE)] if default_fits else []))

    def number(key):
        # YAML reads "nan" or "1e-4" as text; the typed config turns such text into floats.
        value = train.get(key)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None     # a type error, reported by rule_schema
        return float(value) if _is_number(value) else None

    for key in ("learning_rate", "base_learning_rate"):
        value = number(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            bad(key, "a learning rate must be a positive number", f"write e.g. {key}: 4.5e-6",
                default_fits=False)
    value = number("grad_clip")
    if value is not None and not (math.isfinite(value) and value > 0):
        bad("grad_clip", "the clipping norm must be a positive number", "write e.g. grad_clip: 1.0, or null")
    value = number("weight_decay")
    if value is not None and not (math.isfinite(value) and value >= 0):
        bad("weight_decay", "weight decay must be a number >= 0", "write weight_decay: 0.0 (none) or e.g. 0.01")
    for key in ("seed", "num_workers"):
        value = train.get(key)
        if _is_int(value) and value < 0:
            bad(key, "it must be >= 0", f"write a {key} >= 0")


def rule_codebook_init(data: Dict[str, Any], spec, variant: Optional[str], out: List[Finding]) -> None:
    """train.init_codebook_from_data needs an EMA codebook, and must not replace loaded weights."""
    if (data.get("train") or {}).get("init_codebook_from_data") is not True or spec is None:
        return
    path = "train.init_codebook_from_data"
    if spec.name == "TamingVQGAN" and variant not in (None, "EMAVQ"):   # None: variant unknown, reported
        out.append(Finding(ERROR, path, "codebook_init_needs_ema",
                           f"init_codebook_from_data starts EMA codebooks from data; TamingVQGAN {variant} learns "
                           "its codebook by gradients and has no EMA statistics to start",
                           "set train.init_codebook_from_data: false (or model_variant: EMAVQ)",
                           [(path, False)]))
    elif (data.get("model_args") or {}).get("ckpt_path"):
        out.append(Finding(ERROR, path, "codebook_init_overwrites_weights",
                           "init_codebook_from_data would replace the codebook loaded from model_args.ckpt_path",
                           "set train.init_codebook_from_data: false to keep the loaded codebook",
                           [(path, False)]))


def rule_taming_model_args(data: Dict[str, Any], variant: Optional[str], out: List[Finding]) -> None:
    args = data.get("model_args") or {}
    for key in ("n_embed", "embed_dim", "ddconfig"):
        if key not in args:
            out.append(Finding(ERROR, f"model_args.{key}", "missing_model_arg",
                               f"TamingVQGAN needs model_args.{key}", f"add model_args.{key}"))
    for key in ("n_embed", "embed_dim"):
        if key in args and (not _is_int(args[key]) or args[key] <= 0):
            fixed = _coerce_like(args[key], 1)
            out.append(Finding(ERROR, f"model_args.{key}", "bad_type" if not _is_int(args[key]) else "bad_value",
                               f"model_args.{key} is {args[key]!r}; expected a positive integer",
                               f"write {key}: {fixed}" if fixed and fixed > 0 else "write a positive integer",
                               [(f"model_args.{key}", fixed)] if fixed and fixed > 0 else []))
    dd = args.get("ddconfig")
    if dd is None:
        return
    if not isinstance(dd, dict):
        out.append(Finding(ERROR, "model_args.ddconfig", "bad_type", "ddconfig must be a mapping",
                           "write ddconfig as key: value pairs"))
        return
    for key in DDCONFIG_INT_KEYS:
        path = f"model_args.ddconfig.{key}"
        if key not in dd:
            out.append(Finding(ERROR, path, "missing_model_arg", f"ddconfig needs {key}", f"add {path}"))
            continue
        value = dd[key]
        if not _is_int(value):
            _type_finding(out, path, value, 1, "an integer")
        elif value <= 0:
            out.append(Finding(ERROR, path, "bad_value", f"{path} is {value}; sizes must be positive",
                               f"set {key} to a positive integer"))
    ch_mult = dd.get("ch_mult")
    if not isinstance(ch_mult, (list, tuple)) or not ch_mult or not all(_is_int(m) for m in ch_mult):
        out.append(Finding(ERROR, "model_args.ddconfig.ch_mult", "bad_type",
                           f"ddconfig.ch_mult is {ch_mult!r}; expected a non-empty list of integers",
                           "e.g. ch_mult: [1, 1, 2, 2, 4]"))
        ch_mult = None
    elif any(m <= 0 for m in ch_mult):
        out.append(Finding(ERROR, "model_args.ddconfig.ch_mult", "bad_value", "ch_mult entries must be positive",
                           "use positive channel multipliers"))
    if ch_mult and _is_int(dd.get("ch")) and dd["ch"] > 0:
        widths = sorted({dd["ch"] * m for m in [1, *ch_mult] if _is_int(m)})
        odd = [w for w in widths if w % 32]
        if odd:
            out.append(Finding(ERROR, "model_args.ddconfig.ch", "groupnorm_width",
                               f"channel widths {odd} (ch x ch_mult) are not multiples of 32, which taming's "
                               "GroupNorm(32 groups) needs", "use ch: 32, 64, 128, ..."))
    if variant == "Gumbel" and _is_int(args.get("embed_dim")) and _is_int(dd.get("z_channels")) \
            and args["embed_dim"] != dd["z_channels"]:
        out.append(Finding(ERROR, "model_args.embed_dim", "gumbel_embed_dim",
                           f"Gumbel: embed_dim ({args['embed_dim']}) must equal ddconfig.z_channels "
                           f"({dd['z_channels']}): upstream GumbelQuantize is built for z_channels inputs",
                           f"set embed_dim: {dd['z_channels']}", [("model_args.embed_dim", dd["z_channels"])]))
    if dd.get("double_z") is True and variant != "KL":
        out.append(Finding(ERROR, "model_args.ddconfig.double_z", "double_z_on_vq",
                           "double_z: true doubles the encoder's output channels (for KL autoencoders); a VQ "
                           "model's quant_conv expects z_channels and would fail",
                           "set double_z: false", [("model_args.ddconfig.double_z", False)]))
    resolution = dd.get("resolution")
    attn = dd.get("attn_resolutions", [])
    if ch_mult and _is_int(resolution) and resolution > 0 and isinstance(attn, (list, tuple)):
        levels = [resolution // (2 ** i) for i in range(len(ch_mult))]
        unreachable = [a for a in attn if a not in levels]
        if unreachable:
            keep = [a for a in attn if a in levels]
            out.append(Finding(WARNING, "model_args.ddconfig.attn_resolutions", "attn_unreachable",
                               f"attn_resolutions {unreachable} are never reached (levels: {levels}); "
                               "no attention is built there",
                               f"use resolutions from {levels}, e.g. attn_resolutions: {keep or [levels[-1]]}",
                               [("model_args.ddconfig.attn_resolutions", keep or [levels[-1]])]))
        if resolution % (2 ** (len(ch_mult) - 1)):
            out.append(Finding(ERROR, "model_args.ddconfig.resolution", "bad_value",
                               f"resolution {resolution} is not divisible by the total downsampling "
                               f"{2 ** (len(ch_mult) - 1)}", "use a multiple of it"))
    params = (data.get("lossconfig") or {}).get("params") or {}
    if isinstance(params, dict) and "disc_in_channels" in params and _is_int(dd.get("out_ch")):
        if params["disc_in_channels"] != dd["out_ch"]:
            out.append(Finding(ERROR, "lossconfig.params.disc_in_channels", "disc_channels_mismatch",
                               f"disc_in_channels {params['disc_in_channels']} differs from the model's out_ch "
                               f"{dd['out_ch']}: the discriminator could not read the reconstructions",
                               f"set disc_in_channels: {dd['out_ch']}",
                               [("lossconfig.params.disc_in_channels", dd["out_ch"])]))


def rule_vqvae2_model_args(data: Dict[str, Any], out: List[Finding]) -> None:
    args = data.get("model_args") or {}
    for key in ("in_channel", "channel", "n_res_block", "n_res_channel", "embed_dim", "n_embed"):
        if key in args:
            value = args[key]
            if not _is_int(value):
                _type_finding(out, f"model_args.{key}", value, 1, "an integer")
            elif value < (0 if key == "n_res_block" else 1):
                out.append(Finding(ERROR, f"model_args.{key}", "bad_value",
                                   f"model_args.{key} is {value}; it must be "
                                   f"{'0 or more' if key == 'n_res_block' else 'positive'}",
                                   f"set {key} to a {'non-negative' if key == 'n_res_block' else 'positive'} integer"))


def rule_dinovq_model_args(data: Dict[str, Any], out: List[Finding]) -> None:
    args = data.get("model_args") or {}
    ints = ("encoder_embed_dim", "codebook_size", "patch_size", "dino_dim", "disc_start", "disc_dim",
            "disc_num_layers")
    for key in ints:
        if key in args and not _is_int(args[key]):
            _type_finding(out, f"model_args.{key}", args[key], 1, "an integer")
    for key in ("dino_loss_weight", "recon_loss_weight", "vq_loss_weight", "perceptual_weight", "disc_weight"):
        if key in args and not _is_number(args[key]):
            _type_finding(out, f"model_args.{key}", args[key], 1.0, "a number")
    img_size = args.get("img_size")
    data_size = (data.get("data") or {}).get("image_size")
    if img_size is not None and _is_int(data_size):
        sizes = img_size if isinstance(img_size, (list, tuple)) else [img_size, img_size]
        if any(s != data_size for s in sizes):
            out.append(Finding(ERROR, "data.image_size", "image_size_mismatch",
                               f"data.image_size {data_size} differs from model_args.img_size {img_size!r}: "
                               "DinoVQ's position embeddings and token grid are built for img_size",
                               f"set data.image_size: {sizes[0]}" if sizes[0] == sizes[-1] else
                               "make them agree", [("data.image_size", sizes[0])] if sizes[0] == sizes[-1] else []))
    teacher = data.get("teacher") or {}
    if not teacher.get("ckpt_path") and not teacher.get("allow_random") and \
            not (data.get("data") or {}).get("feature_cache"):
        out.append(Finding(WARNING, "teacher.ckpt_path", "teacher_weights_missing",
                           "no DINO teacher weights: fit needs teacher.ckpt_path (a local DINO / DINOv2 checkpoint) "
                           "or a data.feature_cache made by extract-features",
                           "set teacher.ckpt_path=/path/to/dino_vitbase16_pretrain.pth"))
    img, patch = args.get("img_size"), args.get("patch_size", 16)
    if img is not None and _is_int(patch) and patch > 0:
        sizes = img if isinstance(img, (list, tuple)) else [img, img]
        if not all(_is_int(s) and s > 0 and s % patch == 0 for s in sizes):
            out.append(Finding(ERROR, "model_args.img_size", "bad_value",
                               f"img_size {img!r} must be positive multiples of patch_size {patch}",
                               "use a multiple of patch_size"))


def rule_model_arg_names(data: Dict[str, Any], spec, variant: Optional[str], out: List[Finding]) -> None:
    args = data.get("model_args") or {}
    # TamingVQGAN without a variant is VQ, as the builder reads it; other types have none.
    accepted = accepted_model_args(spec.name, variant or "VQ") if spec is not None else None
    if accepted is None or not isinstance(args, dict):
        return
    names, strict = accepted
    for key in args:
        if key in names:
            continue
        path = f"model_args.{key}"
        near = _near(key, names)
        if near and near not in args:
            out.append(Finding(ERROR, path, "unknown_model_arg",
                               f"{spec.name} has no model argument {key!r} (nearest valid: {near!r})",
                               f"rename it to {near}", [(path, DELETE), (f"model_args.{near}", args[key])]))
        elif strict:
            out.append(Finding(ERROR, path, "unknown_model_arg",
                               f"{spec.name}{' ' + variant if variant else ''} takes no model argument {key!r}",
                               f"remove it; valid names: {', '.join(n for n in names if n != 'model_variant')}",
                               [(path, DELETE)]))
        else:
            out.append(Finding(WARNING, path, "ignored_model_arg",
                               f"{spec.name} does not use model_args.{key}; it is ignored",
                               "remove it, or check that model_type is the one you meant"))


def collect(norm: Normalized) -> List[Finding]:
    """Run every rule on a normalized config and return all findings."""
    data = norm.data
    out: List[Finding] = []
    rule_schema(data, out)
    spec = rule_model_type(data, out)
    variant = rule_variant(data, spec, out)
    spec = _effective_spec(data, spec, out)
    family = rule_loss_target(data, spec, out)
    rule_loss_params(data, family, out)
    if not any(f.code in ("variant_mismatch", "loss_family_mismatch") for f in out):
        rule_model_arg_names(data, spec, variant if spec is not None and spec.variants else None, out)
    if spec is not None and spec.name == "TamingVQGAN":
        rule_taming_model_args(data, variant if spec.variants else None, out)
    elif spec is not None and spec.name == "vqvae2":
        rule_vqvae2_model_args(data, out)
    elif spec is not None and spec.name == "DinoVQ":
        rule_dinovq_model_args(data, out)
    rule_gan(data, family, out)
    rule_train_values(data, out)
    rule_codebook_init(data, spec, variant if spec is not None and spec.variants else None, out)
    rule_extras(norm, out)
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(out, key=lambda f: order[f.level])


def validate_file(path: str, overrides: Sequence[str] = ()) -> Tuple[Normalized, List[Finding]]:
    norm = normalize(path)
    if overrides:
        norm.data = apply_overrides(norm.data, overrides)
    return norm, collect(norm)


def load_checked(path: str, overrides: Sequence[str] = ()):
    """Load a config for training: any validation error stops here with every finding.

    Returns the typed config.  Raises UserError (exit 2) listing each error and its fix,
    e.g. the seed-002 ``vqvae2`` + ``EMAVQ`` mismatch, instead of training the wrong model.
    """
    norm, findings = validate_file(path, overrides)
    errors = [f for f in findings if f.level == ERROR]
    if errors:
        lines = "; ".join(f"{f.path}: {f.message} (fix: {f.fix})" for f in errors)
        raise UserError(f"{path}: {len(errors)} config error(s): {lines}. "
                        f"`python -m train validate {path} --fix OUT` writes a corrected copy")
    return to_structured(canonicalize(norm.data))


# ----------------------------------------------------------------------------------
# --fix

def _set_path(doc: Dict[str, Any], keys: Tuple[str, ...], value) -> None:
    node = doc
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def _source_keys(norm: Normalized, path: str) -> Optional[Tuple[str, ...]]:
    if path in norm.keymap:
        return norm.keymap[path]
    parent, _, leaf = path.rpartition(".")
    while parent:
        if parent in norm.keymap:
            return norm.keymap[parent] + tuple(path[len(parent) + 1:].split("."))
        parent, _, more = parent.rpartition(".")
    if norm.fmt == "native":
        return tuple(path.split("."))
    if norm.fmt == "legacy_json":
        head, _, rest = path.partition(".")
        base = {"train": ("train_args",), "data": ("train_args",), "model_args": ("model_args",),
                "lossconfig": ("model_args", "lossconfig")}.get(head)
        return base + tuple(rest.split(".")) if base and rest else None
    return None


def _value_for_source(norm: Normalized, path: str, value):
    """Translate a normalized value into the source format's spelling."""
    if norm.fmt == "taming_yaml" and path == "model_type" and value is not DELETE:
        spec = registry.get_model_type(value)
        variant = norm.data.get("model_variant") or spec.default_variant
        for cls, var in spec.upstream_classes.items():
            if var == variant and "." in cls:
                return cls
    return value


def fix_document(norm: Normalized, findings: List[Finding]) -> Dict[str, Any]:
    """Apply every finding's fix operations to a copy of the source document."""
    doc = copy.deepcopy(norm.raw)
    for finding in findings:
        for path, value in finding.ops:
            keys = _source_keys(norm, path)
            if keys is None:
                continue
            _set_path(doc, keys, _value_for_source(norm, path, value))
    return doc


def write_document(doc: Dict[str, Any], path: str, syntax: str) -> None:
    text = json.dumps(doc, indent=2) + "\n" if syntax == "json" else yaml.safe_dump(doc, sort_keys=False)
    atomic.write_text(path, text)


def fix_file(path: str, out_path: str) -> Tuple[List[Finding], List[Finding]]:
    """Write a corrected copy of ``path`` to ``out_path``; return (before, after) findings."""
    norm, before = validate_file(path)
    doc = fix_document(norm, before)
    write_document(doc, out_path, norm.data.get("_syntax", "json"))
    _, after = validate_file(out_path)
    return before, after


# ----------------------------------------------------------------------------------
# CLI

def _print_findings(path: str, findings: List[Finding], stream) -> None:
    errors = sum(f.level == ERROR for f in findings)
    warnings = sum(f.level == WARNING for f in findings)
    status = "FAIL" if errors else "ok"
    print(f"{path}: {status} ({errors} error(s), {warnings} warning(s))", file=stream)
    for f in findings:
        print(f"  {f.level:<7} {f.path}: {f.message} [{f.code}]", file=stream)
        if f.fix:
            print(f"          fix: {f.fix}", file=stream)


def cli_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train validate",
                                     description="Check configs; print every finding with its fix.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--json", action="store_true", help="print findings as JSON")
    parser.add_argument("--fix", metavar="OUT", help="write a corrected config (same format as the input); "
                        "with several inputs, OUT is a folder")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return 2 if exc.code else 0
    results: Dict[str, Any] = {}
    worst = 0
    for path in args.paths:
        if "=" in path and not os.path.exists(path):
            print(f"error: {path}: validate takes config files only, not key=value overrides; "
                  "put the value in the file (or pass overrides to fit)", file=sys.stderr)
            worst = 2
            continue
        try:
            norm, findings = validate_file(path)
        except UserError as exc:
            if args.json:
                results[path] = {"error": str(exc), "findings": []}
            else:
                print(f"error: {exc}", file=sys.stderr)
            worst = 2
            continue
        fixed_to = None
        if args.fix:
            out_path = args.fix
            if len(args.paths) > 1 or os.path.isdir(args.fix):
                os.makedirs(args.fix, exist_ok=True)
                out_path = os.path.join(args.fix, os.path.basename(path))
            doc = fix_document(norm, findings)
            write_document(doc, out_path, norm.data.get("_syntax", "json"))
            fixed_to = out_path
            _, after = validate_file(out_path)
            remaining = [f for f in after if f.level == ERROR]
        if args.json:
            results[path] = {"format": norm.fmt, "findings": [f.as_dict() for f in findings]}
            if fixed_to:
                results[path]["fixed"] = {"path": fixed_to, "remaining_errors": [f.as_dict() for f in remaining]}
        else:
            _print_findings(path, findings, sys.stdout)
            if fixed_to:
                note = "validates clean" if not remaining else f"{len(remaining)} error(s) need a manual fix"
                print(f"  wrote corrected config to {fixed_to} ({note})")
        errors = any(f.level == ERROR for f in findings)
        worst = max(worst, 1 if errors else 0)
    if args.json:
        print(json.dumps(results, indent=2))
    return worst
