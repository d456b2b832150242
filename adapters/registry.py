"""Model-type registry: one dict, one decorator, loud on duplicates, helpful on typos.

Modelled on fvcore's ``Registry`` (refuse duplicate names) and timm's ``register_model``
(list with wildcards); unknown names get difflib near matches as mmengine's builders do.

Each model type records its variants, the aliases users write for it (including upstream
class paths such as ``taming.models.vqgan.EMAVQ``), the loss family it takes and where its
builder lives.  Builders are named as ``"module:function"`` strings and imported lazily,
so a model type whose builder has not been written yet says so clearly instead of failing
at import time.

    >>> from adapters.registry import resolve_model
    >>> resolve_model("taming.models.vqgan.EMAVQ")
    ('TamingVQGAN', 'EMAVQ')
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple


class RegistryError(KeyError):
    """An unknown or duplicate registry name.  ``str()`` is the full, readable message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


@dataclass(frozen=True)
class VariantSpec:
    name: str
    description: str
    # Upstream classes whose state-dict layout this variant reproduces.
    upstream: Tuple[str, ...] = ()


@dataclass(frozen=True)
class LossFamilySpec:
    name: str
    description: str
    # Canonical loss target and the spellings that resolve to it.
    target: str
    aliases: Tuple[str, ...] = ()
    # "module:Class" of the implementation (LossCalculator subclass), imported lazily.
    implementation: str = ""


@dataclass
class ModelTypeSpec:
    name: str
    description: str
    loss_family: str
    builder: str  # "module:function", imported lazily
    variants: Dict[str, VariantSpec] = field(default_factory=dict)
    default_variant: Optional[str] = None
    # Free-form aliases of the type name (other spellings, upstream class names).
    aliases: Tuple[str, ...] = ()
    # upstream class path -> variant (or None for the type's default)
    upstream_classes: Dict[str, Optional[str]] = field(default_factory=dict)


_MODEL_TYPES: Dict[str, ModelTypeSpec] = {}
_LOSS_FAMILIES: Dict[str, LossFamilySpec] = {}
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


def register_model_type(spec: ModelTypeSpec) -> ModelTypeSpec:
    """Add a model type.  A name or alias that is already taken is an error."""
    keys = [spec.name, *spec.aliases, *spec.upstream_classes]
    for key in keys:
        if key.lower() in _MODEL_ALIASES:
            owner = _MODEL_ALIASES[key.lower()][0]
            raise RegistryError(f"model type registry: {key!r} is already registered (by {owner!r}); "
                                "pick another name or remove the old registration")
    _MODEL_TYPES[spec.name] = spec
    _MODEL_ALIASES[spec.name.lower()] = (spec.name, None)
    for alias in spec.aliases:
        _MODEL_ALIASES[alias.lower()] = (spec.name, None)
    for path, variant in spec.upstream_classes.items():
        _MODEL_ALIASES[path.lower()] = (spec.name, variant)
    return spec


def register_loss_family(spec: LossFamilySpec) -> LossFamilySpec:
    """Add a loss family.  A name or target that is already taken is an error."""
    if spec.name in _LOSS_FAMILIES:
        raise RegistryError(f"loss family registry: {spec.name!r} is already registered")
    for target in (spec.target, *spec.aliases):
        if target in _LOSS_TARGETS:
            raise RegistryError(f"loss family registry: target {target!r} is already registered "
                                f"(by {_LOSS_TARGETS[target]!r})")
    _LOSS_FAMILIES[spec.name] = spec
    for target in (spec.target, *spec.aliases):
        _LOSS_TARGETS[target] = spec.name
    return spec


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
    canonical = resolve_variant(spec, variant)
    return spec.name, canonical


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


def get_loss_family(name: str) -> LossFamilySpec:
    if name not in _LOSS_FAMILIES:
        raise RegistryError(f"loss family registry: unknown family {name!r}.{_suggest(name, list(_LOSS_FAMILIES))}")
    return _LOSS_FAMILIES[name]


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


def get_builder(model_type: str) -> Callable:
    """Import and return the builder of a model type; a clear error when it is missing."""
    spec = get_model_type(model_type)
    module_name, _, func = spec.builder.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise NotImplementedError(
                f"model type {spec.name!r} is registered but its builder ({spec.builder}) is not "
                "available in this version of the tool") from None
        raise
    if not hasattr(module, func):
        raise NotImplementedError(f"model type {spec.name!r}: builder {spec.builder} is missing")
    return getattr(module, func)


def get_loss_implementation(family: str):
    """Import and return the LossCalculator subclass of a family."""
    spec = get_loss_family(family)
    module_name, _, cls = spec.implementation.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise NotImplementedError(f"loss family {family!r}: implementation {spec.implementation} "
                                      "is not available in this version of the tool") from None
        raise
    return getattr(module, cls)


# --------------------------------------------------------------------------------------
# The built-in model types and loss families.

TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"

register_loss_family(LossFamilySpec(
    name="taming",
    description="taming's VQLPIPSWithDiscriminator: L1 + LPIPS + codebook loss + PatchGAN",
    target=TAMING_LOSS,
    aliases=("taming.modules.losses.VQLPIPSWithDiscriminator",),
    implementation="losses.taming_loss:TamingLossCalculator",
))
register_loss_family(LossFamilySpec(
    name="vqvae2",
    description="VQ-VAE-2: MSE + latent_loss_weight * latent loss, optional LPIPS and PatchGAN",
    target="losses.vqvae2_loss.VQVAE2Loss",
    implementation="losses.vqvae2_loss:VQVAE2LossCalculator",
))
register_loss_family(LossFamilySpec(
    name="dinovq",
    description="DinoVQ: DINO cosine + MSE + VQ commitment, optional LPIPS and PatchGAN",
    target="losses.dinovq_loss.DinoVQLoss",
    implementation="losses.dinovq_loss:DinoVQLossCalculator",
))

register_model_type(ModelTypeSpec(
    name="TamingVQGAN",
    description="taming-transformers first-stage VQGAN (Esser et al. 2021)",
    loss_family="taming",
    builder="adapters.taming_vqgan:build_taming_vqgan",
    variants={
        "VQ": VariantSpec("VQ", "VectorQuantizer2 codebook trained by gradients",
                          ("taming.models.vqgan.VQModel", "ldm.models.autoencoder.VQModel")),
        "EMAVQ": VariantSpec("EMAVQ", "codebook updated by exponential moving averages",
                             ("taming.models.vqgan.EMAVQ",)),
        "Gumbel": VariantSpec("Gumbel", "Gumbel-softmax quantizer", ("taming.models.vqgan.GumbelVQ",)),
        "NoDisc": VariantSpec("NoDisc", "VQ model trained without a discriminator",
                              ("taming.models.vqgan.VQNoDiscModel",)),
    },
    default_variant="VQ",
    aliases=("VQGAN", "taming", "taming_vqgan"),
    upstream_classes={
        "VQModel": "VQ",
        "EMAVQ": "EMAVQ",
        "GumbelVQ": "Gumbel",
        "VQNoDiscModel": "NoDisc",
        "taming.models.vqgan.VQModel": "VQ",
        "ldm.models.autoencoder.VQModel": "VQ",
        "ldm.models.autoencoder.VQModelInterface": "VQ",
        "taming.models.vqgan.EMAVQ": "EMAVQ",
        "taming.models.vqgan.GumbelVQ": "Gumbel",
        "taming.models.vqgan.VQNoDiscModel": "NoDisc",
    },
))
register_model_type(ModelTypeSpec(
    name="vqvae2",
    description="VQ-VAE-2 (Razavi et al. 2019), rosinality/vq-vae-2-pytorch layout, EMA codebooks",
    loss_family="vqvae2",
    builder="adapters.vqvae2:build_vqvae2",
    variants={},
    aliases=("VQVAE2", "vq-vae-2", "vq_vae_2", "VQVAE", "vqvae2.VQVAE"),
))
register_model_type(ModelTypeSpec(
    name="DinoVQ",
    description="semantic tokenizer distilled from a DINO teacher (BEiT v2 VQ-KD style)",
    loss_family="dinovq",
    builder="adapters.dinovq:build_dinovq",
    variants={},
    aliases=("dinovq", "DinoVQModel", "dino_vq"),
))

# Upstream model classes that are not first-stage tokenizers: what they are.
NOT_FIRST_STAGE = {
    "taming.models.cond_transformer.Net2NetTransformer": "a second-stage transformer over VQGAN codes",
    "taming.models.vqgan.VQSegmentationModel": "a segmentation-map VQ model (conditioning stage)",
    "taming.models.dummy_cond_stage.DummyCondStage": "a dummy conditioning stage",
    "ldm.models.diffusion.ddpm.LatentDiffusion": "a latent diffusion model (second stage)",
    "ldm.models.autoencoder.AutoencoderKL": "a KL autoencoder (continuous latents, no codebook)",
}
