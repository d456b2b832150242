"""``LossCalculator``: one interface in front of every loss family.

``LossCalculator.from_config(cfg)`` looks up the model type's loss family in the registry
(``adapters/registry.py``) and returns the subclass registered for it
(``@register_loss_implementation(family)``):

* ``losses.taming_loss.TamingLossCalculator`` -- taming's real ``VQLPIPSWithDiscriminator``
* ``losses.vqvae2_loss.VQVAE2LossCalculator`` -- VQ-VAE-2 MSE + latent loss
* ``losses.dinovq_loss.DinoVQLossCalculator`` -- DinoVQ distillation losses

The trainer (``train/trainer.py``) only uses the methods below, so it never needs to know
which family it drives.  Generator and discriminator steps are separate; the
discriminator step reuses the generator step's reconstructions (detached), so a training
iteration runs the generator once.

Families keep taming's contract for logs: ``(loss, log)`` with ``"{split}/name"`` keys and
detached scalar tensors as values.  A loss never logs or prints by itself, except the
single ``use_gan: false`` warning.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from adapters.registry import get_loss_implementation, get_model_type
from losses import lecam
from train.errors import DELETE, ERROR, Finding, is_int, is_number, near, type_finding


def constructor_parameters(cls: Callable) -> Dict[str, inspect.Parameter]:
    """Keyword parameters of a loss class's constructor (or a dataclass's fields)."""
    target = cls if hasattr(cls, "__dataclass_fields__") else cls.__init__
    params = dict(inspect.signature(target).parameters)
    params.pop("self", None)
    return {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def param_findings(family: str, params: Dict[str, Any], signature: Dict[str, inspect.Parameter],
                   check_types: bool = True) -> List[Finding]:
    """``lossconfig.params`` checked against a constructor: unknown names (with the nearest
    valid one) and, with ``check_types``, values whose type differs from the default's."""
    out: List[Finding] = []
    for key, value in params.items():
        path = f"lossconfig.params.{key}"
        if key not in signature:
            close = near(key, list(signature))
            out.append(Finding(ERROR, path, "unknown_loss_param",
                               f"the {family} loss has no parameter {key!r}."
                               + (f" Did you mean {close!r}?" if close else ""),
                               f"rename it to {close}" if close else
                               f"remove it; valid parameters: {', '.join(signature)}",
                               [(path, DELETE), (f"lossconfig.params.{close}", value)] if close else [(path, DELETE)]))
            continue
        if not check_types:
            continue
        default = signature[key].default
        if value is None and default not in (inspect.Parameter.empty, None):
            # null is not "the default": the constructor would get None and fail.
            out.append(Finding(ERROR, path, "bad_type", f"{path} is null; expected {type(default).__name__} "
                               f"(default {default!r})", f"remove {key} to get the default, or write a value",
                               [(path, DELETE)]))
            continue
        if default is inspect.Parameter.empty or default is None or value is None:
            if key == "disc_start" and not is_int(value):
                type_finding(out, path, value, 0, "an integer (steps)")
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                type_finding(out, path, value, default, "true or false")
        elif isinstance(default, (int, float)):
            if not is_number(value):
                type_finding(out, path, value, default, "a number")
        elif isinstance(default, str) and not isinstance(value, str):
            type_finding(out, path, value, default, "a string")
    return out


@dataclass
class GeneratorOutput:
    """What a generator step hands to the trainer and to the discriminator step."""

    loss: torch.Tensor                      # scalar to backpropagate
    log: Dict[str, torch.Tensor]            # "{split}/name" -> detached scalar
    inputs: torch.Tensor                    # the batch images, (B, C, H, W) in [-1, 1]
    reconstructions: torch.Tensor           # detached reconstructions, same shape
    codes: Tuple[torch.Tensor, ...] = ()    # code maps, one per codebook (the model contract)
    extra: Dict[str, Any] = field(default_factory=dict)


class LossCalculator(nn.Module):
    """Base class.  Subclasses implement one loss family."""

    family: str = ""

    # ---- construction ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "LossCalculator":
        """Build the calculator for ``cfg`` (an ``ExperimentConfig``)."""
        spec = get_model_type(cfg.model_type)
        impl = get_loss_implementation(spec.loss_family)
        if cls is not LossCalculator and not issubclass(impl, cls):
            raise TypeError(f"{cls.__name__}.from_config: config is for loss family {spec.loss_family!r}")
        return impl.build(cfg)

    @classmethod
    def build(cls, cfg) -> "LossCalculator":  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def param_rules(cls, data: Dict[str, Any], check_types: bool = True) -> List[Finding]:
        """Findings about ``lossconfig.params`` of a config (plain data in the schema's
        shape).  ``validate`` reports them; :meth:`build` refuses on their errors."""
        return []

    # ---- the GAN schedule --------------------------------------------------------
    use_gan: bool = False
    # No class-level default here: a class attribute ``discriminator = None`` would shadow
    # the submodule that nn.Module registers when a subclass assigns one.
    discriminator: Optional[nn.Module]

    def __init__(self):
        super().__init__()
        self.discriminator = None   # subclasses assign their discriminator (or keep None)

    def disc_factor_at(self, global_step: int) -> float:
        """The effective weight of the GAN term at ``global_step`` (0 when it is off)."""
        raise NotImplementedError

    # ---- state carried between steps (besides the discriminator) -------------------
    def running_state(self) -> Dict[str, torch.Tensor]:
        """Buffers the loss updates as it trains (LeCAM's moving averages), by state-dict
        name; empty unless an opt-in keeps some.  The checkpoint's ``loss`` entry holds them
        next to ``discriminator.*``."""
        return lecam.running_state(self)

    def load_running_state(self, state: Dict[str, torch.Tensor]) -> List[str]:
        """Restore :meth:`running_state` from ``state``; returns the names it lacked."""
        return lecam.load_running_state(self, state)

    def should_update_discriminator(self, global_step: int) -> bool:
        """True when the trainer must run a discriminator step at ``global_step``."""
        raise NotImplementedError

    # ---- steps ---------------------------------------------------------------------
    def generator_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], global_step: int,
                       split: str = "train") -> GeneratorOutput:
        """Run ``model`` on ``batch["image"]`` and return the generator loss and logs.

        ``model`` may be wrapped (DDP); ``batch`` may carry family-specific entries
        (``"dino_features"`` for DinoVQ).  No discriminator parameter receives a gradient.
        """
        raise NotImplementedError

    def discriminator_step(self, out: GeneratorOutput, global_step: int,
                           split: str = "train"):
        """Discriminator loss on ``out.inputs`` vs ``out.reconstructions`` (both detached).

        Returns ``(loss, log)``.  No generator parameter receives a gradient.
        """
        raise NotImplementedError
