"""The tool's version, recorded in evaluation reports (``python -m train eval --json``) so a
figure can be traced to the code that computed it."""
__version__ = "0.13.0"

__all__ = ["__version__"]
