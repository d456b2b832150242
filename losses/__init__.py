"""Loss families behind one ``LossCalculator`` interface.

Importing this package registers every family's implementation with the model-type
registry (``adapters/registry.py``).
"""
from losses.calculator import GeneratorOutput, LossCalculator
from losses.dinovq_loss import DinoVQLossCalculator
from losses.taming_loss import TamingLossCalculator
from losses.vqvae2_loss import VQVAE2LossCalculator

__all__ = ["LossCalculator", "GeneratorOutput", "TamingLossCalculator", "VQVAE2LossCalculator",
           "DinoVQLossCalculator"]
