"""``FP8Linear``: a drop-in ``nn.Linear`` whose three GEMMs run in FP8.

Same constructor, parameters and state_dict keys as ``nn.Linear`` (it is a subclass, so
code that checks ``isinstance(m, nn.Linear)`` keeps working); master weights stay in their
own dtype and only the GEMM operands are quantized, per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear_function import GROUP, fp8_linear, fp8_swiglu_linear
from .recipe import FP8Recipe


def _check_recipe(recipe) -> FP8Recipe:
    if recipe is None:
        return FP8Recipe()
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
    return recipe


def fp8_eligible_dims(in_features: int, out_features: int) -> Optional[str]:
    """None if a linear layer of these dims can run its GEMMs in FP8, else the reason why
    not (every GEMM contracts over K or N, which must be whole 128-blocks)."""
    bad = [f"{name}={value}" for name, value in (("in_features", in_features),
                                                 ("out_features", out_features))
           if value <= 0 or value % GROUP]
    return f"{', '.join(bad)} not a multiple of {GROUP}" if bad else None


class FP8Linear(nn.Linear):
    """``nn.Linear`` with FP8 fprop, dgrad and wgrad (1x128 activations, 128x128 weights).

    Args: as ``nn.Linear`` (in_features and out_features multiples of 128), plus
    ``recipe``: an ``FP8Recipe`` (default: all three GEMMs in FP8, float32 scales).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, *, recipe: Optional[FP8Recipe] = None):
        recipe = _check_recipe(recipe)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        why = fp8_eligible_dims(in_features, out_features)
        if recipe.any_fp8 and why:
            raise ValueError(f"in_features/out_features: {why}; keep this layer nn.Linear "
                             "(convert_to_fp8 does so automatically)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Optional[FP8Recipe] = None) -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s parameters (same Parameter objects, so an
        optimizer built before the swap keeps tracking them)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        recipe = _check_recipe(recipe)
        # Built on the meta device so no throwaway weight is allocated and initialised.
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta", recipe=recipe)
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        return module

    def forward(self, input: torch.Tensor, swiglu_up: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``nn.Linear``'s forward; with ``swiglu_up`` the layer reads silu(input) * swiglu_up
        (the down projection of a SwiGLU MLP, input the gate), cast to FP8 as it is made
        (``fp8_swiglu_linear``)."""
        if swiglu_up is not None:
            return fp8_swiglu_linear(input, swiglu_up, self.weight, self.bias, self.recipe)
        return fp8_linear(input, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def swiglu_linear(down_proj: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``down_proj(F.silu(gate) * up)``, a SwiGLU MLP's down projection: an ``FP8Linear``
    makes the product inside its input casts (the same bits, output and gradients, without
    the high-precision product); any other module reads the product."""
    if isinstance(down_proj, FP8Linear):
        return down_proj(gate, swiglu_up=up)
    return down_proj(F.silu(gate) * up)
