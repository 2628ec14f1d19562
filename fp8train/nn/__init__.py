"""Autograd functions and drop-in modules (FP8Linear, grouped experts, MoE)."""
from . import _custom_ops  # noqa: F401  (registers the fp8train:: torch.library ops)
from .linear import FP8Linear
from .linear_function import FP8LinearFunction, fp8_linear
from .recipe import RECIPES, FP8Recipe

__all__ = [
    "FP8Linear",
    "FP8LinearFunction",
    "fp8_linear",
    "FP8Recipe",
    "RECIPES",
]
