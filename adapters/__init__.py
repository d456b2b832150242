"""Model types and their registry.

Every model an adapter builds is an ``nn.Module`` with:

* ``forward(x)`` -> ``(reconstruction, quantizer_loss)`` (taming / rosinality contract;
  DinoVQ documents its own outputs),
* ``get_last_layer()`` -> the decoder's last weight (for the adaptive GAN weight),
* ``generator_parameters()`` -> the parameters the generator optimizer owns (EMA
  codebooks are excluded: they are updated by EMA only),
* ``codebook_sizes`` -> tuple with the number of codes of each codebook (for usage stats).

Code indices of a batch (``GeneratorOutput.indices``): TamingVQGAN models return them from
``model(x, return_pred_indices=True)`` -> ``(reconstruction, quantizer_loss, indices)`` with
``indices`` a (B, h, w) LongTensor (latent-diffusion's keyword).  Losses call it through the
possibly DDP-wrapped model so DDP sees the forward; ``model.forward_with_indices(x)`` is the
same call on an unwrapped model.  Models store nothing about the last batch.

Weights: ``adapters.weights.load_model_weights(model, state_dict, strict=True, source=...)``
strips DDP prefixes and raises ``UserError`` naming mismatched keys and both shapes.
"""
from adapters.registry import (RegistryError, get_builder, get_model_type, list_model_types,
                               resolve_model)


def build_model(cfg):
    """Build the model an ``ExperimentConfig`` describes (see ``adapters/registry.py``)."""
    return get_builder(cfg.model_type)(cfg)


__all__ = ["build_model", "RegistryError", "get_builder", "get_model_type", "list_model_types",
           "resolve_model"]
