"""MoE experts, ``down(silu(gate) * up)`` of ``[gate | up] = gate_up(x[src_tokens])``, as one
autograd Function on the grouped FP8 GEMMs.

Run as two ``FP8GroupedLinear`` Functions, the experts' backward hands d[gate | up] from
one to the other in high precision: SwiGLU's backward writes it, and the gate_up projection
reads it back to cast it. As one Function the backward makes it inside its casts instead
(``_custom_ops.cast_swiglu_grad_both``: one read of the gradient and of [gate | up]), as
the forward makes silu(gate) * up inside the down projection's casts. Output and every
gradient are bit-identical to the two layers'.

``FP8MoE`` and transformers experts through fp8train take it where ``fuses_expert_block``
says so (the default recipe, a step that needs every gradient); anything else runs the two
layers.
"""
from __future__ import annotations

import torch

from .._autocast import autocast_off
from . import _custom_ops as ops
from .grouped_linear import _forward
from .linear_function import GROUP, cast_weight_transposed, fuses_swiglu_backward
from .moe_layout import scatter_add_rows
from .recipe import FP8Recipe


def _grouped_grads(d_casts: tuple, weight, xt_fp8, xt_scale, group_offsets, segment_rows: int,
                   recipe: FP8Recipe, x_dtype: torch.dtype):
    """dgrad (rows [M, K] in x_dtype) and wgrad (float32 [G, N, K]) of a grouped layer from
    its output gradient's casts (d_fp8, d_scale, dt_fp8, dt_scale), as
    ``FP8GroupedLinearFunction``'s backward runs them."""
    d_fp8, d_scale, dt_fp8, dt_scale = d_casts
    backend = recipe.backend_arg
    w_t_fp8, w_t_scale = cast_weight_transposed(weight, recipe.pow2_scale, backend)
    dx = ops.grouped_gemm_nt_contiguous(d_fp8, d_scale, w_t_fp8, w_t_scale, group_offsets, False,
                                        segment_rows, backend).to(x_dtype)
    dw = ops.grouped_gemm_nt_contiguous(dt_fp8, dt_scale, xt_fp8, xt_scale, group_offsets, True, GROUP,
                                        backend)
    return dx, dw


class FP8GroupedSwiGLUFunction(torch.autograd.Function):
    """Autograd of ``y[seg g] = (silu(gate) * up)[seg g] @ w_down[g].T`` with ``[gate | up] =
    x[src_tokens][seg g] @ w_gate_up[g].T`` on the grouped FP8 GEMMs, for the default recipe
    and a step that needs every gradient.

    ``apply(x, w_gate_up, w_down, group_offsets, src_tokens, recipe, out_dtype, segment_rows)``:
    x the tokens ``[T, H]``, src_tokens int64 ``[M]`` (``MoELayout.src_tokens``), w_gate_up
    ``[G, 2I, H]``, w_down ``[G, H, I]``; returns the rows ``[M, H]``.
    """

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, group_offsets, src_tokens, recipe: FP8Recipe,
                out_dtype: torch.dtype, segment_rows: int):
        h, (xt_fp8, xt_scale, *_) = _forward(x, w_gate_up, group_offsets, src_tokens, recipe, out_dtype,
                                             True, True, segment_rows)
        y, (ht_fp8, ht_scale, *_) = _forward(h, w_down, group_offsets, None, recipe, out_dtype, True, True,
                                             segment_rows, swiglu=True)
        ctx.save_for_backward(xt_fp8, xt_scale, h, ht_fp8, ht_scale, w_gate_up, w_down, group_offsets,
                              src_tokens)
        ctx.recipe, ctx.segment_rows, ctx.x_dtype, ctx.num_tokens = recipe, segment_rows, x.dtype, x.shape[0]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xt_fp8, xt_scale, h, ht_fp8, ht_scale, w_gate_up, w_down, group_offsets, src_tokens = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        with autocast_off(grad_out.device.type):
            dy = ops.cast_1x128_layouts(grad_out.contiguous(), recipe.pow2_scale, True, True, recipe.backend_arg)
            dh, dw_down = _grouped_grads(dy, w_down, ht_fp8, ht_scale, group_offsets, ctx.segment_rows,
                                         recipe, h.dtype)
            d_gate_up = ops.cast_swiglu_grad_layouts(h, dh, recipe.pow2_scale, recipe.backend_arg)
            dx_rows, dw_gate_up = _grouped_grads(d_gate_up, w_gate_up, xt_fp8, xt_scale, group_offsets,
                                                 ctx.segment_rows, recipe, ctx.x_dtype)
            dx = scatter_add_rows(dx_rows, src_tokens, ctx.num_tokens)  # rows -> their tokens
        return (dx, dw_gate_up.to(w_gate_up.dtype), dw_down.to(w_down.dtype), None, None, None, None, None)


def fuses_expert_block(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       recipe: FP8Recipe) -> bool:
    """Whether experts gating with SwiGLU run as ``FP8GroupedSwiGLUFunction``: the default
    recipe (every GEMM in FP8, weights cast per call, no ``main_grad``), in a training step
    that needs every gradient, over at least one token."""
    return (torch.is_grad_enabled() and x.requires_grad and w_gate_up.requires_grad
            and w_down.requires_grad and x.shape[0] > 0 and fuses_swiglu_backward(recipe))
