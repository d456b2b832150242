"""Model-type registry: where model types plug in.  One dict, one decorator, loud on duplicates.

Modelled on fvcore's ``Registry`` (duplicate names are refused) and timm's
``register_model`` (the registration sits on the builder, in the model's own module; names
listed with wildcards); unknown names get difflib near matches, as mmengine's builders do.

A registration declares everything the rest of the tool needs to know about a model type,
so nothing outside the adapter asks which model it is:

==================  ====================================================================
field               meaning
==================  ====================================================================
name, aliases       canonical name and other spellings (``VQGAN``, upstream class paths)
variants            ``VariantSpec`` per variant, and the default variant
loss                the ``LossFamilySpec`` it trains with (canonical target + aliases);
                    the family's implementation registers itself in ``losses/``
builder             ``builder(cfg) -> model`` (the decorated function)
accepted_args       ``accepted_args(variant) -> (names, strict)``: model_args it takes;
                    strict: other names are errors (else warnings)
rules               ``rules(data, variant, out)``: append ``Finding``s about model_args
                    (the builder runs the same rules before it builds anything)
gan_settings        ``gan_settings(data) -> (use_gan, params)``: where the GAN switch and the
                    discriminator settings live in this type's config
codebooks           ``codebooks(variant) -> names``: one name per codebook the model has
ema_codebook        ``ema_codebook(variant) -> bool``: codebook(s) updated by EMA
vector_codebook     ``vector_codebook(variant) -> bool``: code vectors that encoder outputs
                    can start and restart (``codebook_vectors`` / ``set_codes``)
tiny_config         ``tiny_config() -> dict``: a CPU-sized config in the schema's shape
opt_in_args         model_args names of opt-in features (e.g. ``codebook_l2_norm``): another
                    type (or variant) given one gets an error naming who takes it, not a warning
stock_incompatible  ``stock_incompatible(data) -> reason or None``: why upstream's own code would
                    decode a model of this config differently (``migrate --export`` refuses it)
batch_hook          optional ``batch_hook(cfg, device) -> fn(batch, step) -> batch``: adds
                    what the loss family needs to each batch (DinoVQ's teacher features)
==================  ====================================================================

    >>> from adapters.registry import resolve_model
    >>> resolve_model("taming.models.vqgan.EMAVQ")
    ('TamingVQGAN', 'EMAVQ')
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from train.errors import DELETE, ERROR, INFO, WARNING, Finding, UserError, near


class RegistryError(UserError, KeyError):
    """An unknown or duplicate registry name.  ``str()`` is the full, readable message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


@dataclass(frozen=True)
class VariantSpec:
    name: str
    description: str
    # Upstream classes whose state-dict layout this variant reproduces.
    upstream: Tuple[str, ...] = ()
    # False: the variant trains without a discriminator whatever train.use_gan says.
    gan: bool = True


@dataclass(frozen=True)
class LossFamilySpec:
    name: str
    description: str
    # Canonical loss target and the spellings that resolve to it.
    target: str
    aliases: Tuple[str, ...] = ()


def _no_rules(data: Dict[str, Any], variant: Optional[str], out: list) -> None:
    return None


def _gan_in_train_and_lossconfig(data: Dict[str, Any]) -> Tuple[Any, Any]:
    """taming's layout: ``train.use_gan`` and the discriminator settings in ``lossconfig.params``."""
    return (data.get("train") or {}).get("use_gan", True), (data.get("lossconfig") or {}).get("params") or {}


@dataclass
class ModelTypeSpec:
    name: str
    description: str
    loss: LossFamilySpec
    builder: Callable[[Any], Any]
    variants: Dict[str, VariantSpec] = field(default_factory=dict)
    default_variant: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    # upstream class path -> variant (or None for the type's default)
    upstream_classes: Dict[str, Optional[str]] = field(default_factory=dict)
    accepted_args: Callable[[Optional[str]], Tuple[List[str], bool]] = lambda variant: ([], False)
    rules: Callable[[Dict[str, Any], Optional[str], list], None] = _no_rules
    gan_settings: Callable[[Dict[str, Any]], Tuple[Any, Any]] = _gan_in_train_and_lossconfig
    codebooks: Callable[[Optional[str]], Tuple[str, ...]] = lambda variant: ("codebook",)
    ema_codebook: Callable[[Optional[str]], bool] = lambda variant: False
    # Codebook(s) of code vectors that encoder outputs can start (k-means) and restart (dead codes).
    vector_codebook: Callable[[Optional[str]], bool] = lambda variant: False
    tiny_config: Callable[[], Dict[str, Any]] = dict
    batch_hook: Optional[Callable[[Any, Any], Optional[Callable]]] = None
    stock_incompatible: Callable[[Dict[str, Any]], Optional[str]] = lambda data: None
    opt_in_args: Tuple[str, ...] = ()
    # Added to a variant_mismatch fix that suggests dropping the variant (why it has none).
    mismatch_hint: str = ""

    @property
    def loss_family(self) -> str:
        return self.loss.name


_MODEL_TYPES: Dict[str, ModelTypeSpec] = {}
_LOSS_FAMILIES: Dict[str, LossFamilySpec] = {}
_LOSS_IMPLEMENTATIONS: Dict[str, type] = {}
# lower-cased alias -> (type name, variant or None)
_MODEL_ALIASES: Dict[str, Tuple[str, Optional[str]]] = {}
# loss target spelling -> family name
_LOSS_TARGETS: Dict[str, str] = {}


def _suggest(value: str, choices: List[str]) -> str:
    near = difflib.get_close_matches(value, choices, n=3, cutoff=0.5)
    if not near:
        lowered = {c.lower(): c for c in choices}
        near = [lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=3, cutoff=0.5)]
    return f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def _add_loss_family(spec: LossFamilySpec) -> None:
    if _LOSS_FAMILIES.get(spec.name) == spec:
        return      # a second model type trained with the same family
    if spec.name in _LOSS_FAMILIES:
        raise RegistryError(f"loss family registry: {spec.name!r} is already registered (with another "
                            "target); declare the same LossFamilySpec, or pick another family name")
    for target in (spec.target, *spec.aliases):
        if target in _LOSS_TARGETS:
            raise RegistryError(f"loss family registry: target {target!r} is already registered "
                                f"(by {_LOSS_TARGETS[target]!r})")
    _LOSS_FAMILIES[spec.name] = spec
    for target in (spec.target, *spec.aliases):
        _LOSS_TARGETS[target] = spec.name


def register_model_type(name: str, **fields) -> Callable:
    """Decorator for a builder: registers the model type ``name`` with ``fields`` (see the
    module docstring) and returns the builder unchanged.  Taken names or aliases are errors.

        @register_model_type("vqvae2", description=..., loss=LossFamilySpec(...), ...)
        def build_vqvae2(cfg): ...
    """
    def decorate(builder: Callable) -> Callable:
        if isinstance(fields.get("loss"), str):      # an already registered family, by name
            fields["loss"] = get_loss_family(fields["loss"])
        spec = ModelTypeSpec(name=name, builder=builder, **fields)
        keys = [spec.name, *spec.aliases, *spec.upstream_classes]
        for key in keys:
            if key.lower() in _MODEL_ALIASES:
                owner = _MODEL_ALIASES[key.lower()][0]
                raise RegistryError(f"model type registry: {key!r} is already registered (by {owner!r}); "
                                    "pick another name or remove the old registration")
        _add_loss_family(spec.loss)
        _MODEL_TYPES[spec.name] = spec
        _MODEL_ALIASES[spec.name.lower()] = (spec.name, None)
        for alias in spec.aliases:
            _MODEL_ALIASES[alias.lower()] = (spec.name, None)
        for path, variant in spec.upstream_classes.items():
            _MODEL_ALIASES[path.lower()] = (spec.name, variant)
        return builder
    return decorate


def register_loss_implementation(family: str) -> Callable:
    """Class decorator for a ``LossCalculator`` subclass: the implementation of ``family``
    (whose target the model type declared).  Used in ``losses/``."""
    def decorate(cls: type) -> type:
        if family in _LOSS_IMPLEMENTATIONS:
            raise RegistryError(f"loss family registry: {family!r} already has an implementation "
                                f"({_LOSS_IMPLEMENTATIONS[family].__name__})")
        _LOSS_IMPLEMENTATIONS[family] = cls
        return cls
    return decorate


def list_model_types(pattern: str = "*") -> List[str]:
    return sorted(n for n in _MODEL_TYPES if fnmatch.fnmatch(n, pattern))


def get_model_type(name: str) -> ModelTypeSpec:
    """Look up a model type by name, alias or upstream class path."""
    hit = _MODEL_ALIASES.get(str(name).lower())
    if hit is None:
        choices = list(_MODEL_TYPES) + [a for spec in _MODEL_TYPES.values() for a in spec.aliases]
        raise RegistryError(f"model type registry: unknown model_type {name!r}.{_suggest(str(name), choices)} "
                            f"Known model types: {', '.join(list_model_types())}.")
    return _MODEL_TYPES[hit[0]]


def resolve_model(name: str, variant: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Return (canonical type, canonical variant) for a type name/alias and optional variant.

    An upstream class path fixes the variant (``taming.models.vqgan.GumbelVQ`` -> Gumbel).
    Raises :class:`RegistryError` for unknown names or a variant the type does not have.
    """
    hit = _MODEL_ALIASES.get(str(name).lower())
    spec = get_model_type(name)
    implied = hit[1] if hit else None
    if variant is None:
        return spec.name, implied or spec.default_variant
    return spec.name, resolve_variant(spec, variant)


def resolve_variant(spec: ModelTypeSpec, variant: str) -> str:
    for v in spec.variants:
        if v.lower() == str(variant).lower():
            return v
    if not spec.variants:
        raise RegistryError(f"model type {spec.name!r} has no variants; got model_variant {variant!r}. "
                            "Remove model_variant.")
    raise RegistryError(f"model type {spec.name!r} has no variant {variant!r}."
                        f"{_suggest(str(variant), list(spec.variants))} "
                        f"Its variants: {', '.join(spec.variants)}.")


def types_with_variant(variant: str) -> List[str]:
    """Model types that do have ``variant`` (used to suggest the right model_type)."""
    return [n for n, s in _MODEL_TYPES.items() if any(v.lower() == str(variant).lower() for v in s.variants)]


def spec_for_config(cfg) -> Tuple[ModelTypeSpec, Optional[str]]:
    """``(spec, canonical variant)`` of a typed config; unknown names -> RegistryError."""
    spec = get_model_type(cfg.model_type)
    variant = getattr(cfg, "model_variant", None)
    return spec, (resolve_variant(spec, variant) if variant else spec.default_variant)


# ----------------------------------------------------------------------------------
# Sizes: bounds every model type's rules share.  Far above any published tokenizer, far
# below what would make ``fit`` try to allocate terabytes (``n_embed: 1e10``, ``ch: 1e6``)
# instead of stopping with a finding.

MAX_CODES = 2 ** 20          # codebook entries (LlamaGen / MAGVIT-v2 use up to 2^18)
MAX_WIDTH = 8192             # channels / embedding width of any layer
MAX_BLOCKS = 64              # residual or transformer blocks per stack
MAX_IMAGE_SIZE = 4096        # pixels per side of a training crop or a model's input size
IMAGE_CHANNELS = 3           # training images are decoded to RGB (train/data.py)


def int_findings(out: List[Finding], path: str, value: Any, low: int, high: int, what: str) -> bool:
    """An error unless ``value`` is an integer in [low, high]; True when it is."""
    if not (isinstance(value, int) and not isinstance(value, bool)):
        fixed = None
        if isinstance(value, float) and value == value and abs(value) < 2 ** 63 and value == int(value):
            fixed = int(value)
        out.append(Finding(ERROR, path, "bad_type", f"{path} is {value!r}; expected an integer ({what})",
                           f"write {path.split('.')[-1]}: {fixed}" if fixed is not None and low <= fixed <= high
                           else f"write an integer from {low} to {high}",
                           [(path, fixed)] if fixed is not None and low <= fixed <= high else []))
        return False
    if not low <= value <= high:
        bound = f">= {low}" if value < low else f"<= {high}"
        out.append(Finding(ERROR, path, "bad_value" if value < low else "too_large",
                           f"{path} is {value}; {what} must be {bound}",
                           f"write a {path.split('.')[-1]} from {low} to {high}"))
        return False
    return True


def number_findings(out: List[Finding], path: str, value: Any, low: float, high: float, what: str,
                    high_open: bool = False) -> bool:
    """An error unless ``value`` is a finite number in [low, high] (or [low, high))."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and \
        low <= value and (value < high if high_open else value <= high)
    if not ok:
        span = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        out.append(Finding(ERROR, path, "bad_value" if isinstance(value, (int, float)) else "bad_type",
                           f"{path} is {value!r}; {what} must be a number in {span}",
                           f"write a number in {span}"))
    return ok


def file_findings(out: List[Finding], path: str, value: Any, what: str) -> None:
    """A file the config names (e.g. ``ckpt_path``) must be text naming an existing file."""
    import os

    if value is None:
        return
    if not isinstance(value, str) or not value:
        out.append(Finding(ERROR, path, "bad_type", f"{path} is {value!r}; expected the path of {what}",
                           f"write the path of {what}, or remove {path.split('.')[-1]}"))
    elif not os.path.isfile(value):
        out.append(Finding(ERROR, path, "file_not_found", f"{path}: file not found: {value}",
                           f"check the path of {what}, or remove {path.split('.')[-1]}"))


def model_arg_findings(spec: ModelTypeSpec, data: Dict[str, Any], variant: Optional[str]) -> List[Finding]:
    """Findings for ``model_args`` names the type does not take (``spec.accepted_args``).

    A near miss is an error with a rename fix; other names are errors for strict types and
    warnings ("ignored") for the others.  ``validate`` and the builders both call this.
    """
    out: List[Finding] = []
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        return out
    variant = variant or spec.default_variant
    names, strict = spec.accepted_args(variant)
    for key in args:
        if key in names:
            continue
        path = f"model_args.{key}"
        takers = [n for n, other in _MODEL_TYPES.items() if key in other.opt_in_args and n != spec.name]
        if takers:
            out.append(Finding(ERROR, path, "opt_in_unsupported",
                               f"model_args.{key} is an opt-in of model type {' / '.join(takers)}; {spec.name} "
                               "cannot use it (it would be silently ignored)",
                               f"remove {key}, or set model_type: {takers[0]}", [(path, DELETE)]))
            continue
        close = near(key, names)
        if close and close not in args:
            out.append(Finding(ERROR, path, "unknown_model_arg",
                               f"unknown argument {key!r} (did you mean {close!r}?): {spec.name} has no "
                               f"model argument {key!r}",
                               f"rename it to {close}", [(path, DELETE), (f"model_args.{close}", args[key])]))
        elif strict:
            others = [v for v in spec.variants if v != variant and key in spec.accepted_args(v)[0]]
            takers = f" ({', '.join(others)} take{'s' if len(others) == 1 else ''} it)" if others else ""
            hint = f" (did you mean {close!r}?)" if close else ""
            out.append(Finding(ERROR, path, "unknown_model_arg",
                               f"unknown argument {key!r}{hint}: {spec.name}{' ' + variant if variant else ''} "
                               f"does not take it{takers}",
                               f"remove it; valid names: {', '.join(n for n in names if n != 'model_variant')}",
                               [(path, DELETE)]))
        else:
            out.append(Finding(WARNING, path, "ignored_model_arg",
                               f"{spec.name} ignores model_args {key} (it takes "
                               f"{', '.join(n for n in names if n != 'model_variant')})",
                               "remove it, or check that model_type is the one you meant"))
    return out


def check_model_args(spec: ModelTypeSpec, data: Dict[str, Any], variant: Optional[str]) -> List[Finding]:
    """Every model-args finding of a config: accepted names, then the type's own rules."""
    out = model_arg_findings(spec, data, variant)
    spec.rules(data, variant or spec.default_variant, out)
    return out


def variant_rule(data: Dict[str, Any], spec: Optional[ModelTypeSpec], out: List[Finding]) -> Optional[str]:
    """Check ``model_variant`` against the type; return the canonical variant that applies.

    The classic mistake (a legacy config with ``model_type: vqvae2`` and ``model_variant:
    EMAVQ``) is a ``variant_mismatch`` error whose fix names the type that has the variant.
    """
    variant = data.get("model_variant")
    if spec is None or variant is None:
        return spec.default_variant if spec else None
    try:
        return resolve_variant(spec, variant)
    except RegistryError:
        pass
    owners = [t for t in types_with_variant(variant) if t != spec.name]
    if owners:
        owner = owners[0]
        lose = ""
        target = (data.get("lossconfig") or {}).get("target")
        if target:
            fam = loss_family_of_target(str(target))
            if fam and fam != spec.loss_family:
                lose = f"; its {fam} loss (lossconfig) would be silently dropped"
        message = (f"model_type {spec.name!r} has no variant {variant!r}: {variant!r} is a {owner} variant, so "
                   f"the {spec.name} adapter would be built{lose}")
        fix = (f"set model_type: {owner} (keeps model_variant {variant!r} and its loss); or, if {spec.name} was "
               f"meant, remove model_variant (model_args.model_variant)")
        if spec.mismatch_hint:
            fix += f" and lossconfig ({spec.mismatch_hint}; its loss is {spec.loss.target})"
        out.append(Finding(ERROR, "model_variant", "variant_mismatch", message, fix, [("model_type", owner)]))
        return variant
    choices = list(spec.variants)
    close = near(str(variant), choices)
    if choices:
        out.append(Finding(ERROR, "model_variant", "unknown_variant",
                           f"model_type {spec.name!r} has no variant {variant!r} (variants: {', '.join(choices)})",
                           f"set model_variant: {close}" if close else f"use one of {', '.join(choices)}",
                           [("model_variant", close)] if close else []))
    else:
        out.append(Finding(ERROR, "model_variant", "unknown_variant",
                           f"model_type {spec.name!r} has no variants; model_variant {variant!r} means nothing",
                           "remove model_variant", [("model_variant", DELETE)]))
    return None


def variant_findings(spec: ModelTypeSpec, data: Dict[str, Any]) -> List[Finding]:
    out: List[Finding] = []
    variant_rule(data, spec, out)
    return out


def loss_target_rule(data: Dict[str, Any], spec: Optional[ModelTypeSpec], out: List[Finding]) -> Optional[str]:
    """Check ``lossconfig.target`` against the model type; return the loss family that applies
    (``"none"`` for taming's DummyLoss, None when unknown)."""
    if spec is None:
        return None
    loss = data.get("lossconfig") or {}
    target = loss.get("target")
    if target is None:
        return spec.loss_family
    fixed, note = canonical_loss_target(str(target))
    if note:
        out.append(Finding(INFO, "lossconfig.target", "vendored_target", note,
                           f"write target: {fixed}", [("lossconfig.target", fixed)]))
    family = loss_family_of_target(fixed)
    if fixed in NO_LOSS_TARGETS:
        return "none"
    if family is None:
        close = near(fixed, known_loss_targets())
        out.append(Finding(ERROR, "lossconfig.target", "unknown_loss_target",
                           f"unknown loss target {target!r}",
                           f"use {close}" if close else f"use one of {', '.join(known_loss_targets())}",
                           [("lossconfig.target", close)] if close else []))
        return None
    if family != spec.loss_family and not any(f.code == "variant_mismatch" for f in out):
        own = get_loss_family(spec.loss_family)
        takers = [n for n in list_model_types() if get_model_type(n).loss_family == family]
        out.append(Finding(ERROR, "lossconfig.target", "loss_family_mismatch",
                           f"model_type {spec.name!r} takes the {spec.loss_family} loss family, but lossconfig.target "
                           f"is the {family} family ({fixed})"
                           + (f", the loss of model_type {takers[0]!r}" if takers else "")
                           + "; it would be silently dropped",
                           f"set model_type: {takers[0]} to use this loss, or set lossconfig.target: {own.target}"
                           if takers else f"set lossconfig.target: {own.target}",
                           [("model_type", takers[0])] if takers else []))
    return family


def get_loss_family(name: str) -> LossFamilySpec:
    if name not in _LOSS_FAMILIES:
        raise RegistryError(f"loss family registry: unknown family {name!r}.{_suggest(name, list(_LOSS_FAMILIES))}")
    return _LOSS_FAMILIES[name]


def get_loss_implementation(family: str) -> type:
    """The ``LossCalculator`` subclass registered for ``family`` (``losses/`` must be imported)."""
    if family not in _LOSS_IMPLEMENTATIONS:
        raise RegistryError(f"loss family {family!r} has no implementation registered; import the losses "
                            "package (import losses) before building a loss")
    return _LOSS_IMPLEMENTATIONS[family]


def list_loss_families() -> List[str]:
    return sorted(_LOSS_FAMILIES)


VENDORED_PREFIXES = ("models.taming.", "model.taming.", "src.taming.", "taming_transformers.taming.")


def canonical_loss_target(target: str) -> Tuple[str, Optional[str]]:
    """Map a loss target to its installed spelling.

    Returns (canonical target, note).  Vendored copies of taming
    (``models.taming.modules...``) resolve to the installed ``taming.modules...`` path, and
    the note says so.  Unknown targets come back unchanged with note None.
    """
    for prefix in VENDORED_PREFIXES:
        if target.startswith(prefix):
            fixed = "taming." + target[len(prefix):]
            return fixed, f"vendored target {target!r} resolves to the installed {fixed!r}"
    return target, None


def loss_family_of_target(target: str) -> Optional[str]:
    """Family name for a (canonicalised) loss target, or None when unknown."""
    fixed, _ = canonical_loss_target(target)
    return _LOSS_TARGETS.get(fixed)


def known_loss_targets() -> List[str]:
    return sorted(_LOSS_TARGETS)


# Loss targets that mean "no loss" (taming's DummyLoss): the model trains on nothing.
NO_LOSS_TARGETS = ("taming.modules.losses.vqperceptual.DummyLoss",)

# Upstream model classes that are not first-stage tokenizers: what they are.
NOT_FIRST_STAGE = {
    "taming.models.cond_transformer.Net2NetTransformer": "a second-stage transformer over VQGAN codes",
    "taming.models.vqgan.VQSegmentationModel": "a segmentation-map VQ model (conditioning stage)",
    "taming.models.dummy_cond_stage.DummyCondStage": "a dummy conditioning stage",
    "ldm.models.diffusion.ddpm.LatentDiffusion": "a latent diffusion model (second stage)",
    "ldm.models.autoencoder.AutoencoderKL": "a KL autoencoder (continuous latents, no codebook)",
}
