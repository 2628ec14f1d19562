"""A whole SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, as one autograd Function on FP8 GEMMs.

Run as three ``FP8Linear`` layers, the MLP's backward hands d(gate) and d(up) between
autograd Functions in high precision: SwiGLU's backward writes them, and the gate and up
layers read them back to cast them. As one Function the backward makes them inside the
casts instead (``quant.swiglu_backward_cast``: one read of the gradient, gate and up; the
gradients are never written), as the forward makes silu(gate) * up inside the down
projection's casts. Output and every gradient are bit-identical to the three layers'.

Taken by ``swiglu_mlp`` for the default recipe (all three GEMMs in FP8, weights cast per
call, no ``main_grad``), bias-free layers without hooks (per module or global) and a
training step that needs every gradient; anything else runs the three layers as they are.
x's gradient is the two projections' sum, handed on as one tensor: where x has another
consumer, autograd adds it to that sum, not to each term in turn (the same value, possibly
another last bit).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from .._autocast import autocast_off
from .._checks import FLOAT_DTYPES, check_tensor
from . import _custom_ops as ops
from .linear import FP8Linear, swiglu_linear
from .linear_function import _plain_weight, compute_dtype, fuses_swiglu_backward, gemm_out_dtype
from .recipe import FP8Recipe
from .shared_input_cast import cast_input_layouts


class FP8SwiGLUMLPFunction(torch.autograd.Function):
    """Autograd of ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T`` on FP8 GEMMs, for the
    default recipe and a step that needs every gradient.

    ``apply(x, w_gate, w_up, w_down, recipe, out_dtype)``: x ``[..., K]``, w_gate and w_up
    ``[I, K]``, w_down ``[N, I]``, all dims multiples of 128. Prefer ``fp8_swiglu_mlp``.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, recipe: FP8Recipe, out_dtype: torch.dtype):
        pow2, backend = recipe.pow2_scale, recipe.backend_arg
        k, n = x.shape[-1], w_down.shape[0]
        y_dtype = gemm_out_dtype(out_dtype)
        with autocast_off(x.device.type):
            # The shared cast: the gate and up layers would cast the same x once between them.
            x_fp8, x_scale, xt_fp8, xt_scale = cast_input_layouts(x, x.reshape(-1, k), pow2, True, True, backend)
            gate = ops.fprop_cast_weight(x_fp8, x_scale, w_gate, pow2, y_dtype, backend).to(out_dtype)
            up = ops.fprop_cast_weight(x_fp8, x_scale, w_up, pow2, y_dtype, backend).to(out_dtype)
            h_fp8, h_scale, ht_fp8, ht_scale = ops.cast_swiglu_layouts(gate, up, pow2, True, backend)
            y = ops.fprop_cast_weight(h_fp8, h_scale, w_down, pow2, y_dtype, backend).to(out_dtype)
        ctx.save_for_backward(xt_fp8, xt_scale, gate, up, ht_fp8, ht_scale, w_gate, w_up, w_down)
        ctx.recipe, ctx.x_shape, ctx.x_dtype = recipe, x.shape, x.dtype
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], n))

    @staticmethod
    def backward(ctx, grad_out):
        xt_fp8, xt_scale, gate, up, ht_fp8, ht_scale, w_gate, w_up, w_down = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        pow2, backend = recipe.pow2_scale, recipe.backend_arg
        # Autograd may hand an expanded (stride-0) gradient; the GEMMs need K-major rows.
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        with autocast_off(grad_out.device.type):
            dh, dw_down = ops.linear_grads(grad_out, w_down, ht_fp8, ht_scale, pow2,
                                           gemm_out_dtype(gate.dtype), backend)
            dx_gate, dx_up, dw_gate, dw_up = ops.swiglu_input_grads(
                dh.to(gate.dtype), gate, up, w_gate, w_up, xt_fp8, xt_scale, pow2,
                gemm_out_dtype(ctx.x_dtype), backend)
            # As autograd sums the gradients the two layers hand x.
            dx = dx_gate.to(ctx.x_dtype) + dx_up.to(ctx.x_dtype)
        return (dx.reshape(ctx.x_shape), dw_gate.to(w_gate.dtype), dw_up.to(w_up.dtype),
                dw_down.to(w_down.dtype), None, None)


def fp8_swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   recipe: FP8Recipe | None = None) -> torch.Tensor:
    """``F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)`` on FP8 GEMMs as
    one Function: the same bits, output and gradients, as ``fp8_linear`` on the two
    projections and ``fp8_swiglu_linear`` on the third. x ``[..., K]`` (any float dtype),
    w_gate and w_up ``[I, K]``, w_down ``[N, I]``, dims multiples of 128; ``recipe`` all-FP8
    without ``save_fp8_weight`` or ``accumulate_into_main_grad`` (default: ``FP8Recipe()``).
    """
    recipe = FP8Recipe() if recipe is None else recipe
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
    if not fuses_swiglu_backward(recipe):
        raise ValueError(f"recipe: the one-Function MLP runs every GEMM in FP8 without "
                         f"save_fp8_weight or accumulate_into_main_grad, got {recipe}; run the "
                         "three layers (swiglu_mlp does so by itself)")
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_tensor(name, w, dtypes=FLOAT_DTYPES, ndims=(2,))
        if not _plain_weight(w):
            raise TypeError(f"{name}: expected a high-precision weight, got a pre-cast "
                            f"{type(w).__name__}; run the three layers")
        if w.shape[0] % 128 or w.shape[1] % 128 or w.numel() == 0:
            raise ValueError(f"{name}: expected dims that are positive multiples of 128, got "
                             f"{tuple(w.shape)}")
    k, inner = w_gate.shape[1], w_gate.shape[0]
    if w_up.shape != w_gate.shape or w_down.shape[1] != inner:
        raise ValueError(f"w_up, w_down: expected [{inner}, {k}] and [N, {inner}] to match w_gate "
                         f"{tuple(w_gate.shape)}, got {tuple(w_up.shape)} and {tuple(w_down.shape)}")
    if x.dim() < 1 or x.shape[-1] != k or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty [..., {k}] to match w_gate {tuple(w_gate.shape)}, "
                         f"got {tuple(x.shape)}")
    return FP8SwiGLUMLPFunction.apply(x, w_gate, w_up, w_down, recipe, compute_dtype(x))


def runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks, its own or those registered for every module
    (``register_module_forward_hook`` and its kin): one Function in place of a layer's call
    would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
                or nn_module._global_backward_pre_hooks)


def _runs_as_written(module: nn.Module) -> bool:
    """An ``FP8Linear`` without a bias, a subclass forward or hooks, whose weight needs its
    gradient: what the one Function replaces exactly."""
    return (isinstance(module, FP8Linear) and type(module).forward is FP8Linear.forward
            and module.bias is None and _plain_weight(module.weight) and module.weight.requires_grad
            and not runs_hooks(module))


def swiglu_mlp(gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
               x: torch.Tensor) -> torch.Tensor:
    """``down_proj(F.silu(gate_proj(x)) * up_proj(x))``: one FP8 Function for three bias-free
    ``FP8Linear`` layers of one all-FP8 recipe when a training step needs every gradient
    (``FP8SwiGLUMLPFunction``: the same bits); otherwise the layers themselves
    (``swiglu_linear`` still fuses the product into an ``FP8Linear`` down projection)."""
    layers = (gate_proj, up_proj, down_proj)
    if (torch.is_grad_enabled() and x.requires_grad and x.numel() > 0 and x.dtype in FLOAT_DTYPES
            and all(_runs_as_written(m) for m in layers)
            and gate_proj.recipe == up_proj.recipe == down_proj.recipe
            and fuses_swiglu_backward(down_proj.recipe)
            # Shapes that do not chain run the layers, which say what is wrong.
            and x.shape[-1] == gate_proj.in_features and up_proj.weight.shape == gate_proj.weight.shape
            and down_proj.in_features == gate_proj.out_features):
        return FP8SwiGLUMLPFunction.apply(x, gate_proj.weight, up_proj.weight, down_proj.weight,
                                          down_proj.recipe, compute_dtype(x))
    return swiglu_linear(down_proj, gate_proj(x), up_proj(x))
