"""``python -m train validate PATH... [--json] [--fix OUT] [--memory-budget SIZE]``: every
finding, with its fix, and what one training step costs.

Validation collects every finding before reporting (as pydantic and OmegaConf do): each
has a level (error / warning / info), a dotted key path, a machine code, a message and a
fix.  ``--fix OUT`` writes a corrected config in the input's own format.  A config without
errors also gets its preflight cost (``train/preflight.py``: parameters, latent grid,
attention positions, peak memory of one step in fp32 and bf16, computed on the meta
device); an estimate above ``--memory-budget`` (default: the visible GPU's memory, else
this machine's RAM) is a ``memory_over_budget`` warning.

Exit codes: 0 no errors (warnings allowed), 1 any error, 2 unusable file (missing, empty,
unparseable, a directory, not a config) -- one line naming the file.

    python -m train validate configs/legacy/taming_vqvae2_mismatch.json
    python -m train validate configs/legacy/taming_vqvae2_mismatch.json --fix fixed.json
    python -m train validate configs/taming/custom_vqgan.yaml --memory-budget 24GiB
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from adapters import registry
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import (CROP_SOURCE_KEY, Normalized, SECTION_CLASSES, apply_overrides, normalize,
                          plain_data_problems, type_errors, unknown_keys)
from train import atomic, preflight
from train.schema import DataSection, config_data
from train.errors import (DELETE, ERROR, INFO, LEVEL_ORDER, WARNING, Finding, UserError, coerce_like,
                          is_int, is_number, near)

# Numeric precisions the trainer runs (fp16 also needs a GPU: checked where the device is known).
PRECISIONS = ("fp32", "bf16", "fp16")

# Discriminator settings of taming's loss that do nothing when use_gan is false.
DISC_KEYS = ("disc_start", "disc_weight", "disc_factor", "disc_num_layers", "disc_in_channels", "disc_ndf",
             "disc_loss", "disc_conditional", "use_actnorm")


# ----------------------------------------------------------------------------------
# Rules.  Each takes the normalized data and appends findings.

def rule_model_type(data: Dict[str, Any], out: List[Finding]) -> Optional[registry.ModelTypeSpec]:
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        return None     # a list or a mapping: rule_schema reported its type
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
        close = near(str(model_type), spec_names)
        out.append(Finding(ERROR, "model_type", "unknown_model_type", str(exc),
                           f"set model_type: {close}" if close else f"use one of {', '.join(spec_names)}",
                           [("model_type", close)] if close else []))
        return None


def rule_canonical_names(data: Dict[str, Any], spec, variant: Optional[str], out: List[Finding]) -> None:
    """A name read as another (``TamingVQGan`` as ``TamingVQGAN``, ``emavq`` as ``EMAVQ``,
    an alias) is reported, and ``--fix`` writes the canonical spelling.  Upstream class paths
    in taming YAML (``model.target``) are how those files name a model: no finding."""
    if spec is None or (data.get("source") or {}).get("format") == "taming_yaml":
        return
    written = data.get("model_type")
    if isinstance(written, str) and written != spec.name:
        out.append(Finding(INFO, "model_type", "noncanonical_name",
                           f"model_type {written!r} is read as {spec.name!r}",
                           f"write model_type: {spec.name}", [("model_type", spec.name)]))
    written = data.get("model_variant")
    if isinstance(written, str) and variant is not None and written != variant and \
            written.lower() == str(variant).lower():
        out.append(Finding(INFO, "model_variant", "noncanonical_name",
                           f"model_variant {written!r} is read as {variant!r}",
                           f"write model_variant: {variant}", [("model_variant", variant)]))


def _effective_spec(data, spec, out) -> Optional[registry.ModelTypeSpec]:
    """The model type after a variant_mismatch fix (so later rules judge the intended model)."""
    for f in out:
        if f.code == "variant_mismatch":
            return registry.get_model_type(f.ops[0][1])
    return spec


rule_loss_target = registry.loss_target_rule


def rule_loss_params(data: Dict[str, Any], family: Optional[str], out: List[Finding]) -> None:
    """The loss family's own parameter rules (the ones its builder runs)."""
    if family in (None, "none"):
        return
    params = (data.get("lossconfig") or {}).get("params") or {}
    if not isinstance(params, dict):
        out.append(Finding(ERROR, "lossconfig.params", "bad_type", "lossconfig.params must be a mapping",
                           "write params as key: value pairs"))
        return
    out.extend(registry.get_loss_implementation(family).param_rules(data))


def rule_schema(data: Dict[str, Any], out: List[Finding]) -> None:
    for path, suggestion in unknown_keys({k: v for k, v in data.items() if not k.startswith("_")}):
        out.append(Finding(ERROR, path, "unknown_key", f"unknown key {path!r}.{suggestion}",
                           "rename or remove it", [(path, DELETE)]))
    for path, message in type_errors(data):
        section, _, key = path.partition(".")
        default = None
        if section in SECTION_CLASSES and key:
            default = getattr(SECTION_CLASSES[section](), key, None)
        fixed = coerce_like(data[section][key], default) if key and default is not None else None
        out.append(Finding(ERROR, path, "bad_type", f"{path}: {message}",
                           f"write {key}: {fixed!r}" if fixed is not None else "write a value of the right type "
                           "or remove the key (the default applies)",
                           [(path, fixed)] if fixed is not None else [(path, DELETE)]))


def rule_input(norm: Normalized, out: List[Finding]) -> None:
    """What the file itself gets wrong: keys written twice (the parser would silently keep
    the last), ``${...}`` interpolations, values that are not plain data."""
    for where in norm.duplicates:
        path, _, line = where.partition(" (")
        out.append(Finding(ERROR, path, "duplicate_key",
                           f"{path} is written twice in the file{' (' + line if line else ''}; the parser "
                           "silently keeps the last one", "keep one of them (the value you mean)"))
    for path, problem, fix in plain_data_problems(norm.data):
        out.append(Finding(ERROR, path, "interpolation" if "interpolation" in problem else "bad_type",
                           f"{path}: {problem}", fix))


def typed_view(data: Dict[str, Any]) -> Dict[str, Any]:
    """The normalized data as the typed config will hold it, for the rules to judge.

    ``fit`` runs the rules on the typed config, where OmegaConf has already converted
    values (``batch_size: "0"`` -> 0, ``use_gan: "no"`` -> False, YAML's ``1e-4`` text ->
    0.0001); judging the raw text instead let such values pass ``validate`` and then stop
    ``fit``.  Sections that are not mappings (reported by ``rule_schema``) read as empty
    here, so no rule trips over them.
    """
    view = dict(data)
    for key, cls in SECTION_CLASSES.items():
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            view[key] = {}
            continue
        base = OmegaConf.structured(cls)
        converted = dict(section)
        for sub, value in section.items():
            if not isinstance(sub, str) or sub not in base or sub == "params":
                continue
            try:
                converted[sub] = OmegaConf.to_container(OmegaConf.merge(base, {sub: value}))[sub]
            except (OmegaConfBaseException, ValueError, TypeError):
                pass        # a type error: rule_schema reported it
        view[key] = converted
    loss = view.get("lossconfig")
    if isinstance(loss, dict) and not isinstance(loss.get("params", {}), dict):
        view["lossconfig"] = dict(loss, params={})
    if not isinstance(view.get("model_args", {}), dict):
        view["model_args"] = {}
    return view


def rule_extras(norm: Normalized, out: List[Finding]) -> None:
    for key in ("extras", "upstream"):
        if not isinstance(norm.data.get(key, {}), dict):
            out.append(Finding(ERROR, key, "bad_type", f"{key}: expected a mapping, got "
                               f"{type(norm.data[key]).__name__}", f"write {key} as key: value pairs, or remove it",
                               [(key, DELETE)]))
            return
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


def rule_gan(data: Dict[str, Any], spec, family: Optional[str], out: List[Finding]) -> None:
    train = data.get("train") or {}
    if spec is None:
        use_gan, params = train.get("use_gan", True), (data.get("lossconfig") or {}).get("params") or {}
    else:
        # Where the GAN switch and the discriminator settings live is the model type's say.
        use_gan, params = spec.gan_settings(data)
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
    if use_gan and is_int(max_steps) and is_int(disc_start) and disc_start >= max_steps:
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
        return float(value) if is_number(value) else None

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
    value = train.get("seed")
    if is_int(value) and value < 0:
        bad("seed", "it must be >= 0", "write a seed >= 0")
    rule_num_workers(train, out)
    for key in ("batch_size", "accumulate_grad_batches", "log_every", "image_every", "ckpt_every",
                "max_bad_steps", "disc_update_every"):
        value = train.get(key)
        if is_int(value) and value < 1:
            bad(key, f"train.{key} must be >= 1", f"write a {key} >= 1")
    value = train.get("max_epochs")
    if is_int(value) and value < 1:
        bad("max_epochs", "train.max_epochs must be >= 1", "write a max_epochs >= 1, or null")
    value = train.get("max_steps")
    if is_int(value) and value < 0:
        bad("max_steps", "train.max_steps must be >= 0", "write a max_steps >= 0, or null (until stopped)")
    precision = train.get("precision")
    if isinstance(precision, str) and precision not in PRECISIONS:
        close = near(precision, PRECISIONS)
        bad("precision", f"train.precision {precision!r} is unknown; valid choices: {', '.join(PRECISIONS)}",
            f"write precision: {close or 'fp32'}")
    betas = train.get("adam_betas")
    if isinstance(betas, (list, tuple)) and not (len(betas) == 2 and all(
            number_in(b) is not None and 0 <= number_in(b) < 1 for b in betas)):
        bad("adam_betas", f"train.adam_betas must be two numbers in [0, 1), got {list(betas)}",
            "write e.g. adam_betas: [0.5, 0.9] (taming's)")
    size = (data.get("data") or {}).get("image_size") if isinstance(data.get("data"), dict) else None
    if is_int(size) and size > registry.MAX_IMAGE_SIZE:
        out.append(Finding(ERROR, "data.image_size", "too_large",
                           f"data.image_size is {size}: crops over {registry.MAX_IMAGE_SIZE} pixels per side do not "
                           "fit in memory", "write an image_size of at most "
                           f"{registry.MAX_IMAGE_SIZE} (e.g. 256)", [("data.image_size", DELETE)]))
    if is_int(size) and size < 8:
        out.append(Finding(ERROR, "data.image_size", "bad_value",
                           f"data.image_size is {size}: data.image_size must be >= 8 pixels",
                           "write an image_size of at least 8 (e.g. 256)", [("data.image_size", DELETE)]))


# More DataLoader workers than this per training process is a typo, not a machine: each
# one is a process holding a copy of the file list.
MAX_NUM_WORKERS = 1024


def rule_num_workers(train: Dict[str, Any], out: List[Finding]) -> None:
    """``train.num_workers`` is ``auto`` or a whole number of worker processes >= 0."""
    value = train.get("num_workers")
    if not (is_int(value) or isinstance(value, str)):
        return      # None (the default), or a type error that rule_schema reports
    if value == "auto" or (is_int(value) and 0 <= value <= MAX_NUM_WORKERS):
        return
    path = "train.num_workers"
    fix = ("write num_workers: auto (sized from the CPUs), or a number of worker processes >= 0 "
           "(0 = load images in the training process)")
    if is_int(value) and value > MAX_NUM_WORKERS:
        problem = f"more than {MAX_NUM_WORKERS} worker processes per training process"
    elif is_int(value):
        problem = "it must be >= 0"
    else:
        problem = "it must be auto or a whole number >= 0"
    # A number written as text ("8") is fixed to the number; anything else to the default.
    digits = isinstance(value, str) and value.strip().isdigit() and int(value) <= MAX_NUM_WORKERS
    out.append(Finding(ERROR, path, "bad_value", f"{path} is {value!r}: {problem}", fix,
                       [(path, int(value) if digits else DELETE)]))


def rule_learning_rate(data: Dict[str, Any], out: List[Finding]) -> None:
    """A trainable config names a learning rate (fit has no default to fall back on)."""
    train = data.get("train") or {}
    if isinstance(train, dict) and train.get("learning_rate") is None and train.get("base_learning_rate") is None:
        out.append(Finding(ERROR, "train.learning_rate", "missing_learning_rate",
                           "no learning rate: neither train.learning_rate nor train.base_learning_rate is set",
                           "set train.learning_rate (e.g. 4.5e-6) or train.base_learning_rate (taming's, scaled "
                           "by batch size and GPUs)"))


def number_in(value) -> Optional[float]:
    """A number, or text that reads as one (YAML's "1e-4"), as a float; else None."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if is_number(value) else None


def train_value_findings(cfg) -> List[Finding]:
    """:func:`rule_train_values` on a typed config (the trainer runs the same rules)."""
    out: List[Finding] = []
    data = config_data(cfg)
    rule_train_values(data, out)
    rule_learning_rate(data, out)
    rule_optins(data, *_spec_and_variant(data), out)
    return out


def rule_codebook_init(data: Dict[str, Any], spec, variant: Optional[str], out: List[Finding]) -> None:
    """train.init_codebook_from_data needs an EMA codebook, and must not replace loaded weights."""
    if (data.get("train") or {}).get("init_codebook_from_data") is not True or spec is None:
        return
    path = "train.init_codebook_from_data"
    if variant is not None and not spec.ema_codebook(variant):   # None: variant unknown, reported
        ema = [v for v in spec.variants if spec.ema_codebook(v)]
        out.append(Finding(ERROR, path, "codebook_init_needs_ema",
                           f"init_codebook_from_data starts EMA codebooks from data; {spec.name} {variant} learns "
                           "its codebook by gradients and has no EMA statistics to start",
                           "set train.init_codebook_from_data: false"
                           + (f" (or model_variant: {ema[0]})" if ema else ""), [(path, False)]))
    elif (data.get("model_args") or {}).get("ckpt_path"):
        out.append(Finding(ERROR, path, "codebook_init_overwrites_weights",
                           "init_codebook_from_data would replace the codebook loaded from model_args.ckpt_path",
                           "set train.init_codebook_from_data: false to keep the loaded codebook",
                           [(path, False)]))


def rule_optins(data: Dict[str, Any], spec, variant: Optional[str], out: List[Finding]) -> None:
    """The training opt-ins (``train/step_optins.py``, ``train/codebook_init.py``): values in
    range, a schedule the run can follow, and a model whose codebook they can act on."""
    from train.lr_schedule import SCHEDULES

    train = data.get("train") or {}
    if not isinstance(train, dict):
        return

    def bad(key, message, fix, code="bad_value"):
        out.append(Finding(ERROR, f"train.{key}", code, f"train.{key} is {train[key]!r}: {message}", fix,
                           [(f"train.{key}", DELETE)]))

    def number(key):
        value = number_in(train.get(key))
        return None if value is None else float(value)

    iters = train.get("init_codebook_kmeans_iters")
    if is_int(iters) and iters < 0:
        bad("init_codebook_kmeans_iters", "it must be >= 0", "write init_codebook_kmeans_iters: 10 (or 0: off)")
    threshold = number("dead_code_threshold")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        bad("dead_code_threshold", "a usage threshold must be a number >= 0",
            "write e.g. dead_code_threshold: 0.05 (picks per step), or null (off)")
    every = train.get("dead_code_every")
    if is_int(every) and every < 1:
        bad("dead_code_every", "it must be >= 1", "write e.g. dead_code_every: 100")
    decay = number("ema_decay")
    if decay is not None and not (math.isfinite(decay) and 0 < decay < 1):
        bad("ema_decay", "an EMA decay must lie strictly between 0 and 1",
            "write e.g. ema_decay: 0.999, or null (off)")
    schedule = train.get("lr_schedule")
    if isinstance(schedule, str) and schedule not in SCHEDULES:
        bad("lr_schedule", f"unknown schedule; valid choices: {', '.join(SCHEDULES)}",
            f"write lr_schedule: {near(schedule, SCHEDULES) or 'constant'}")
    ratio = number("min_lr_ratio")
    if ratio is not None and not (math.isfinite(ratio) and 0 <= ratio <= 1):
        bad("min_lr_ratio", "it is a fraction of the learning rate, in [0, 1]", "write e.g. min_lr_ratio: 0.1")
    warmup, max_steps = train.get("warmup_steps"), train.get("max_steps")
    if is_int(warmup) and warmup < 0:
        bad("warmup_steps", "it must be >= 0", "write e.g. warmup_steps: 500, or 0 (none)")
    elif is_int(warmup) and is_int(max_steps) and warmup > max_steps:
        bad("warmup_steps", f"the warmup is longer than the run (train.max_steps {max_steps}): the learning "
            "rate would never reach its peak", f"write a warmup_steps of at most {max_steps} (e.g. "
            f"{max(max_steps // 20, 1)}), or raise max_steps", "warmup_longer_than_run")
    if schedule == "cosine" and max_steps is None and train.get("max_epochs") is None:
        out.append(Finding(ERROR, "train.lr_schedule", "schedule_needs_length",
                           "train.lr_schedule is 'cosine': the cosine ends at train.max_steps, and the run has no "
                           "max_steps (or max_epochs)", "set train.max_steps (e.g. max_steps: 20000), or "
                           "lr_schedule: constant", [("train.lr_schedule", DELETE)]))
    if spec is None or variant is None and spec.variants:
        return
    for key, on in (("init_codebook_kmeans_iters", is_int(iters) and iters > 0),
                    ("dead_code_threshold", threshold is not None)):
        if on and not spec.vector_codebook(variant):
            able = [v for v in spec.variants if spec.vector_codebook(v)]
            out.append(Finding(ERROR, f"train.{key}", "optin_needs_code_vectors",
                               f"train.{key} starts or restarts code vectors from encoder outputs; {spec.name}"
                               f"{' ' + variant if variant else ''} has no such codebook",
                               f"remove train.{key}" + (f" (or use model_variant: {able[0]})" if able else ""),
                               [(f"train.{key}", DELETE)]))
    if is_int(iters) and iters > 0 and (data.get("model_args") or {}).get("ckpt_path"):
        out.append(Finding(ERROR, "train.init_codebook_kmeans_iters", "codebook_init_overwrites_weights",
                           "init_codebook_kmeans_iters would replace the codebook loaded from model_args.ckpt_path",
                           "set train.init_codebook_kmeans_iters: 0 to keep the loaded codebook",
                           [("train.init_codebook_kmeans_iters", DELETE)]))


def _spec_and_variant(data: Dict[str, Any]):
    """The registry entry and variant a typed config names, or (None, None) when unknown."""
    try:
        spec = registry.get_model_type(str(data.get("model_type")))
    except (KeyError, ValueError, UserError):
        return None, None
    variant = data.get("model_variant") or spec.default_variant
    return spec, (variant if variant in spec.variants else None)


def rule_crop_size(data: Dict[str, Any], out: List[Finding]) -> None:
    """Say which crop size training uses and where it came from (``data.image_size``, an
    override, ``ddconfig.resolution`` for a legacy / taming config that names none, or the
    schema default)."""
    section = data.get("data")
    if section is not None and not isinstance(section, dict):
        return      # rule_schema reported the section's type
    size = (section or {}).get("image_size", DataSection.image_size)
    if not is_int(size) or size <= 0:
        return      # a bad value: rule_schema / rule_train_values reported it
    kind, where = data.get(CROP_SOURCE_KEY) or ("default", "")
    if kind == "config":
        said, fix = f"from {where} in the config", ""
    elif kind == "override":
        said, fix = f"from the override {where}={size}", ""
    elif kind == "resolution":
        said = f"from {where} (the config names no image size)"
        fix = "set data.image_size (or override data.image_size=N) to train at another size"
    else:
        said = "the schema default (the config names no image size)"
        fix = "set data.image_size (or override data.image_size=N) to train at another size"
    out.append(Finding(INFO, "data.image_size", "crop_size_source", f"training crops are {size} px: {said}", fix))


def collect(norm: Normalized) -> List[Finding]:
    """Run every rule on a normalized config and return all findings (errors first)."""
    # Registers the loss families' implementations (their parameter rules).  Imported here,
    # not at the top: a file that cannot be read is refused without torchvision's 1.6 s import.
    import losses  # noqa: F401
    out: List[Finding] = []
    rule_input(norm, out)
    rule_schema(norm.data, out)
    # The remaining rules judge values as fit will hold them (see typed_view).
    data = typed_view(norm.data)
    spec = rule_model_type(data, out)
    variant = registry.variant_rule(data, spec, out)
    rule_canonical_names(data, spec, variant, out)
    spec = _effective_spec(data, spec, out)
    family = rule_loss_target(data, spec, out)
    rule_loss_params(data, family, out)
    variant = variant if spec is not None and spec.variants else None
    if spec is not None:
        if not any(f.code in ("variant_mismatch", "loss_family_mismatch") for f in out):
            out.extend(registry.model_arg_findings(spec, data, variant))
        spec.rules(data, variant or spec.default_variant, out)
    rule_gan(data, spec, family, out)
    rule_train_values(data, out)
    rule_crop_size(data, out)
    if spec is not None:      # only a model this tool trains needs a learning rate
        rule_learning_rate(data, out)
    rule_codebook_init(data, spec, variant, out)
    rule_optins(data, spec, variant or (spec.default_variant if spec is not None else None), out)
    rule_extras(norm, out)
    return sorted(out, key=lambda f: LEVEL_ORDER[f.level])


def validate_file(path: str, overrides: Sequence[str] = ()) -> Tuple[Normalized, List[Finding]]:
    norm = normalize(path)
    if overrides:
        norm.data = apply_overrides(norm.data, overrides)
    return norm, collect(norm)


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

def cost_of(norm: Normalized, findings: List[Finding], budget) -> Tuple[Optional["preflight.Cost"], Optional[str]]:
    """``(cost, None)``, or ``(None, why not)``; appends a warning to ``findings`` when the
    estimate exceeds ``budget`` (``(bytes, where from)``).  Configs with errors get none:
    the model they describe cannot be built."""
    if any(f.level == ERROR for f in findings):
        return None, None
    try:
        from train.config import canonicalize, to_structured

        cost = preflight.estimate(to_structured(canonicalize(norm.data)))
    except UserError as exc:
        return None, str(exc)
    over = preflight.budget_finding(cost, budget)
    if over is not None:
        findings.insert(sum(f.level == ERROR for f in findings), over)
    return cost, None


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
    parser.add_argument("--memory-budget", metavar="SIZE", help="warn when one training step needs more memory "
                        "(e.g. 24GiB, 500MB; default: the visible GPU's memory, else this machine's RAM)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return 2 if exc.code else 0
    try:
        budget = ((preflight.parse_budget(args.memory_budget), "--memory-budget")
                  if args.memory_budget is not None else preflight.default_budget())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        cost, no_cost = cost_of(norm, findings, budget)
        if args.json:
            results[path] = {"format": norm.fmt, "findings": [f.as_dict() for f in findings]}
            if cost is not None:
                results[path]["cost"] = dict(cost.as_dict(), budget_bytes=budget[0], budget_source=budget[1])
            elif no_cost:
                results[path]["cost"] = {"error": no_cost}
            if fixed_to:
                results[path]["fixed"] = {"path": fixed_to, "remaining_errors": [f.as_dict() for f in remaining]}
        else:
            _print_findings(path, findings, sys.stdout)
            if cost is not None:
                for line in preflight.cost_lines(cost, budget):
                    print(f"  {line}")
            elif no_cost:
                print(f"  cost: not estimated: {no_cost}")
            if fixed_to:
                note = "validates clean" if not remaining else f"{len(remaining)} error(s) need a manual fix"
                print(f"  wrote corrected config to {fixed_to} ({note})")
        errors = any(f.level == ERROR for f in findings)
        worst = max(worst, 1 if errors else 0)
    if args.json:
        print(json.dumps(results, indent=2))
    return worst
