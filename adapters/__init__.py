"""Model types and their registry.

Every model an adapter builds is an ``nn.Module`` with:

* ``forward(x)`` -> ``(reconstruction, quantizer_loss)`` (taming / rosinality contract;
  DinoVQ documents its own outputs),
* ``get_last_layer()`` -> the decoder's last weight (for the adaptive GAN weight),
* ``generator_parameters()`` -> the parameters the generator optimizer owns (EMA
  codebooks are excluded: they are updated by EMA only),
* ``codebook_sizes`` -> tuple with the number of codes of each codebook (for usage stats).
"""
from adapters.registry import (RegistryError, get_builder, get_model_type, list_model_types,
                               resolve_model)


def build_model(cfg):
    """Build the model an ``ExperimentConfig`` describes (see ``adapters/registry.py``)."""
    return get_builder(cfg.model_type)(cfg)


__all__ = ["build_model", "RegistryError", "get_builder", "get_model_type", "list_model_types",
           "resolve_model"]
