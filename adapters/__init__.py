"""Model types and their registry.

Importing this package registers the built-in model types: each adapter module registers
its type where it is defined (``@register_model_type`` on its builder; see
``adapters/registry.py`` for what a registration declares).  Every model answers the
contract in ``adapters/contract.py``.  Adding a model type is one new module here (plus its
loss family in ``losses/``) and one import line below.

Weights: ``adapters.weights.load_model_weights(model, state_dict, strict=True, source=...)``
strips DDP prefixes and raises ``UserError`` naming mismatched keys and both shapes.
"""
from adapters import dinovq, taming_vqgan, vqvae2  # noqa: F401  (registers the built-in types)
from adapters.registry import (RegistryError, get_model_type, list_model_types, resolve_model,
                               variant_findings)
from train.errors import raise_for_errors
from train.schema import config_data


def build_model(cfg):
    """Build the model an ``ExperimentConfig`` describes.

    The model-type and variant rules run first (the ones ``validate`` runs), so a
    ``vqvae2`` config with an ``EMAVQ`` variant is refused with its fix instead of building
    the wrong model; the builder then runs its type's own rules.
    """
    spec = get_model_type(cfg.model_type)
    raise_for_errors(variant_findings(spec, config_data(cfg)), f"model_type {spec.name}")
    return spec.builder(cfg)


__all__ = ["build_model", "RegistryError", "get_model_type", "list_model_types", "resolve_model"]
