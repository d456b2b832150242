"""Loss families behind one ``LossCalculator`` interface."""
from losses.calculator import GeneratorOutput, LossCalculator

__all__ = ["LossCalculator", "GeneratorOutput"]
