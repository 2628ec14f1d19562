"""Expert weights ``[G, N, K]`` applied to tokens in the padded contiguous layout.

``GroupedLinear`` is the high-precision reference (a loop of matmuls, one per expert);
``FP8GroupedLinear`` has the same parameter and runs its three GEMMs in FP8:

    fprop  y[seg g]  = m_grouped(x_q[1x128 along K],  W_q[g][128x128])
    dgrad  dx[seg g] = m_grouped(dy_q[1x128 along N], (W[g]^T)_q[128x128])   exact transpose
    wgrad  dW[g]     = k_grouped((dy^T)_q, (x^T)_q)   both 1x128 along tokens, FP32 out

Segments are padded to multiples of 128 rows (or 256: ``segment_rows``, which lets the
m-grouped GEMMs take 256-row tiles), so the token count of each expert is a legal wgrad
contraction length without any further padding. No bias (MoE experts have none).

Given ``src_tokens`` (``MoELayout.src_tokens``), x is the tokens ``[T, K]`` and the layer
reads the padded rows ``x[src_tokens]`` itself: the FP8 casts gather them
(``per_token_cast_permuted``), so the permuted high-precision copy is only made where a
high-precision GEMM reads it (fprop or wgrad of a partial recipe), and dgrad sums the rows'
gradients back onto their tokens. (W^T)_q is cast from W as in ``linear_function`` (with W_q
in the forward's dual cast under ``save_fp8_weight``, else alone in backward).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._autocast import autocast_off
from .._checks import FLOAT_DTYPES, check_bool, check_tensor
from . import _custom_ops as ops
from .linear_function import (GROUP, backward_operands, check_main_grad, compute_dtype,
                              forward_weight_casts, fuses_swiglu, saved_for_backward)
from ..quant.reference import swiglu_backward_ref, swiglu_ref
from .moe_layout import gather_rows, scatter_add_rows
from .recipe import FP8Recipe


def segment_matmul(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """High-precision ``out[seg g] = a[seg g] @ b[g].T`` (differentiable; reads the offsets
    on the host, which is why only the reference and fallback paths use it)."""
    bounds = group_offsets.tolist()
    parts = [a[bounds[g]:bounds[g + 1]] @ b[g].t() for g in range(b.shape[0])]
    parts.append(a.new_zeros(a.shape[0] - bounds[-1], b.shape[1]))  # spare rows of no expert
    return torch.cat(parts)


def swiglu_grad(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dh for the input silu(gate) * up of h = [gate | up], given its gradient: the ops
    (and so the bits) autograd runs for ``F.silu(gate) * up`` on the chunks of h."""
    return torch.cat(swiglu_backward_ref(grad, *h.chunk(2, dim=-1)), dim=-1)


def segment_wgrad(dy: torch.Tensor, x: torch.Tensor, group_offsets: torch.Tensor) -> torch.Tensor:
    """float32 ``dW[g] = dy[seg g].T @ x[seg g]`` (zeros for an empty segment)."""
    bounds = group_offsets.tolist()
    return torch.stack([dy[s:e].float().t() @ x[s:e].float()
                        for s, e in zip(bounds[:-1], bounds[1:])])


def _forward(x, weight, group_offsets, src_tokens, recipe: FP8Recipe, out_dtype: torch.dtype,
             need_dx: bool, need_dw: bool, segment_rows: int = GROUP, swiglu: bool = False):
    """The grouped forward GEMM and what backward needs for the gradients asked for:
    (y, (xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight)). x: the rows ``[M, K]``, or
    with ``src_tokens`` ``[M]`` the tokens ``[T, K]`` they copy (then x_hp is the tokens),
    or with ``swiglu`` the rows [gate | up] ``[M, 2K]`` of the input silu(gate) * up (then
    x_hp is that input)."""
    pow2, backend = recipe.pow2_scale, recipe.backend_arg
    x_hp = x
    with autocast_off(x.device.type):
        rowwise, colwise = recipe.fprop_fp8, need_dw and recipe.wgrad_fp8
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            if fuses_swiglu(recipe, need_dw):  # SwiGLU made inside the casts
                x_rows = x_hp = None
                x_fp8, x_scale, xt_fp8, xt_scale = ops.cast_swiglu_layouts(gate, up, pow2, colwise, backend)
            else:  # a high-precision GEMM reads the input
                x_rows = x_hp = swiglu_ref(gate, up)
                x_fp8, x_scale, xt_fp8, xt_scale = ops.cast_1x128_layouts(
                    x_rows, pow2, rowwise, colwise, backend)
        elif src_tokens is not None and rowwise:  # the permutation fused into the casts
            x_rows = None
            x_fp8, x_scale, xt_fp8, xt_scale = ops.cast_1x128_permuted_layouts(
                x, src_tokens, pow2, colwise, backend)
        else:  # the rows in high precision: the fprop GEMM reads them
            x_rows = x if src_tokens is None else gather_rows(x, src_tokens)
            x_fp8, x_scale, xt_fp8, xt_scale = ops.cast_1x128_layouts(
                x_rows, pow2, rowwise, colwise, backend)
        w_fp8, w_scale, w_t_fp8, w_t_scale = forward_weight_casts(weight, recipe, need_dx)

        if recipe.fprop_fp8:
            # The grouped kernel writes BF16 (DeepGEMM's contract).
            y = ops.grouped_gemm_nt_contiguous(x_fp8, x_scale, w_fp8, w_scale, group_offsets,
                                               False, segment_rows, backend).to(out_dtype)
        else:
            y = segment_matmul(x_rows.to(out_dtype), weight.to(out_dtype), group_offsets)

        saved = saved_for_backward(x_hp, xt_fp8, xt_scale, weight, w_t_fp8, w_t_scale, recipe,
                                   need_dx, need_dw)
    # A new tensor of the Function's own, as the dense layer returns: with the GEMM op's
    # output returned as is (the BF16 case, where .to() is a no-op), Dynamo's trace of
    # the Function under CUDA autocast gave its backward all-zero output gradients
    # (torch 2.11, H100; found with scripts/trace_custom_ops.py).
    return torch.ops.aten._unsafe_view(y, y.shape), saved


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Autograd of the grouped ``y[seg g] = x[seg g] @ weight[g].T`` on FP8 GEMMs.

    ``apply(x, weight, group_offsets, recipe, out_dtype[, src_tokens[, segment_rows[,
    swiglu]]])``: x the rows ``[M, K]``, or with ``src_tokens`` int64 ``[M]`` the tokens
    ``[T, K]`` that the rows copy, or with ``swiglu`` the rows [gate | up] ``[M, 2K]`` whose
    silu(gate) * up the layer reads; see ``FP8GroupedLinear``.
    """

    @staticmethod
    def forward(ctx, x, weight, group_offsets, recipe: FP8Recipe, out_dtype: torch.dtype,
                src_tokens=None, segment_rows: int = GROUP, swiglu: bool = False):
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (recipe.accumulate_into_main_grad
                                              and weight.requires_grad)
        y, saved = _forward(x, weight, group_offsets, src_tokens, recipe, out_dtype,
                            need_dx, need_dw, segment_rows, swiglu)
        # SwiGLU's backward reads its input (gate and up), which the layer does not copy.
        ctx.save_for_backward(*saved, group_offsets, src_tokens, x if swiglu and need_dx else None)
        ctx.recipe, ctx.need_dw, ctx.segment_rows = recipe, need_dw, segment_rows
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.num_tokens = x.shape[0]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight, group_offsets,
         src_tokens, swiglu_input) = ctx.saved_tensors
        if x_hp is not None and src_tokens is not None:
            x_hp = gather_rows(x_hp, src_tokens)  # the rows of a high-precision wgrad
        recipe: FP8Recipe = ctx.recipe
        backend = recipe.backend_arg
        grad_out_hp = grad_out.contiguous()  # [M, N], K-major rows for the casts
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.need_dw
        dx = dw = None
        with autocast_off(grad_out.device.type):
            dgrad_q, wgrad_q = need_dx and recipe.dgrad_fp8, need_dw and recipe.wgrad_fp8
            dy_fp8, dy_scale, dyt_fp8, dyt_scale, w_t_fp8, w_t_scale = backward_operands(
                grad_out_hp, weight, w_t_fp8, w_t_scale, recipe, dgrad_q, wgrad_q)

            if need_dx:
                if recipe.dgrad_fp8:
                    dx = ops.grouped_gemm_nt_contiguous(dy_fp8, dy_scale, w_t_fp8, w_t_scale,
                                                        group_offsets, False, ctx.segment_rows, backend)
                else:
                    dx = segment_matmul(grad_out_hp, weight.to(grad_out_hp.dtype).transpose(1, 2),
                                        group_offsets)
                dx = dx.to(ctx.x_dtype)
                if src_tokens is not None:  # rows -> tokens: each token's k copies summed
                    dx = scatter_add_rows(dx, src_tokens, ctx.num_tokens)
                if swiglu_input is not None:
                    dx = swiglu_grad(swiglu_input, dx)

            if need_dw:
                if recipe.accumulate_into_main_grad:
                    ops.k_grouped_gemm_nt_accumulate_(dyt_fp8, dyt_scale, xt_fp8, xt_scale,
                                                      group_offsets, weight.main_grad, backend)
                elif recipe.wgrad_fp8:
                    dw = ops.grouped_gemm_nt_contiguous(dyt_fp8, dyt_scale, xt_fp8, xt_scale,
                                                        group_offsets, True, GROUP, backend).to(ctx.w_dtype)
                else:
                    dw = segment_wgrad(grad_out_hp, x_hp, group_offsets).to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None


def check_segment_rows(segment_rows, rows: int, rows_name: str) -> int:
    """segment_rows is 128 or 256 and divides the row count."""
    if isinstance(segment_rows, bool) or segment_rows not in (GROUP, 2 * GROUP):
        raise ValueError(f"segment_rows: expected {GROUP} or {2 * GROUP}, got {segment_rows!r}")
    if rows % segment_rows:
        raise ValueError(f"{rows_name}: expected rows padded to a multiple of segment_rows = "
                         f"{segment_rows}, got {rows}")
    return segment_rows


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


class GroupedLinear(nn.Module):
    """``num_experts`` bias-free linear layers, weight ``[G, out_features, in_features]``,
    applied to rows sorted by expert: ``forward(x [M, K], group_offsets int32 [G+1])``, or
    ``forward(x [T, K], group_offsets, src_tokens int64 [M])`` to the rows ``x[src_tokens]``
    (``MoELayout.src_tokens``: a value T is a zero row), M rows out either way.
    ``segment_rows`` (128 or 256, ``MoELayout.align``) is what every offset is a multiple
    of; the FP8 layer's GEMMs may take 256-row tiles on 256-row segments. With ``swiglu``,
    x is the rows [gate | up] ``[M, 2K]`` and the layer is applied to silu(gate) * up
    (the FP8 layer casts that product without writing it: ``quant.swiglu_cast``).

    The high-precision reference of ``FP8GroupedLinear`` (same parameter, same init as
    ``nn.Linear`` per expert).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts = _check_int("num_experts", num_experts)
        self.in_features = _check_int("in_features", in_features)
        self.out_features = _check_int("out_features", out_features)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features,
                                               device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default, per expert
        if self.weight.device.type != "meta":
            nn.init.uniform_(self.weight, -bound, bound)

    def _check_inputs(self, x: torch.Tensor, group_offsets: torch.Tensor,
                      src_tokens: Optional[torch.Tensor], swiglu: bool = False) -> int:
        """The checks of ``forward``'s arguments; returns M, the number of rows."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(2,))
        check_bool("swiglu", swiglu)
        if swiglu and src_tokens is not None:
            raise ValueError("src_tokens: a SwiGLU input (swiglu=True) is already the rows; pass None")
        width = 2 * self.in_features if swiglu else self.in_features
        if x.shape[1] != width:
            raise ValueError(f"x: expected shape [{'T' if src_tokens is not None else 'M'}, "
                             f"{width}]{' ([gate | up])' if swiglu else ''}, got {tuple(x.shape)}")
        check_tensor("group_offsets", group_offsets, dtypes=(torch.int32,), ndims=(1,))
        if group_offsets.shape[0] != self.num_experts + 1:
            raise ValueError(f"group_offsets: expected shape ({self.num_experts + 1},), got "
                             f"{tuple(group_offsets.shape)}")
        if src_tokens is None:
            return x.shape[0]
        # Values are not checked: reading them would sync a CUDA stream.
        check_tensor("src_tokens", src_tokens, dtypes=(torch.int64,), ndims=(1,))
        return src_tokens.shape[0]

    def forward(self, x: torch.Tensor, group_offsets: torch.Tensor,
                src_tokens: Optional[torch.Tensor] = None, segment_rows: int = GROUP,
                swiglu: bool = False) -> torch.Tensor:
        rows = self._check_inputs(x, group_offsets, src_tokens, swiglu)
        check_segment_rows(segment_rows, rows, "x" if src_tokens is None else "src_tokens")
        if src_tokens is not None:
            x = gather_rows(x, src_tokens)
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = swiglu_ref(gate, up)
        return segment_matmul(x, self.weight.to(compute_dtype(x)), group_offsets)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}")


class FP8GroupedLinear(GroupedLinear):
    """``GroupedLinear`` with FP8 fprop, dgrad (m-grouped GEMMs) and wgrad (k-grouped).

    ``forward(x, group_offsets, src_tokens=None, segment_rows=128, swiglu=False)``: x
    ``[M, K]`` (M a multiple of segment_rows), rows sorted by expert, or x the tokens
    ``[T, K]`` and ``src_tokens`` int64 ``[M]`` the token of each row (the permutation then
    happens inside the FP8 casts), or with ``swiglu`` x the rows [gate | up] ``[M, 2K]``
    (silu(gate) * up made inside the casts); group_offsets int32 ``[G+1]``, multiples of
    segment_rows (128 or 256) from 0 to M: the native kernel trusts that promise.
    in_features and out_features must be multiples of 128. Output ``[M, N]`` in x's dtype
    (or autocast's), computed through the kernels' BF16 output.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int,
                 device=None, dtype=None, *, recipe: Optional[FP8Recipe] = None):
        recipe = FP8Recipe() if recipe is None else recipe
        if not isinstance(recipe, FP8Recipe):
            raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, int) and not isinstance(value, bool) and value % GROUP:
                raise ValueError(f"{name}: expected a multiple of {GROUP}, got {value}")
        super().__init__(num_experts, in_features, out_features, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_grouped(cls, module: GroupedLinear,
                     recipe: Optional[FP8Recipe] = None) -> "FP8GroupedLinear":
        """An FP8GroupedLinear sharing ``module``'s weight Parameter."""
        if not isinstance(module, GroupedLinear):
            raise TypeError(f"module: expected a GroupedLinear, got {type(module).__name__}")
        new = cls(module.num_experts, module.in_features, module.out_features, device="meta",
                  recipe=recipe)
        new.weight = module.weight
        return new

    def forward(self, x: torch.Tensor, group_offsets: torch.Tensor,
                src_tokens: Optional[torch.Tensor] = None, segment_rows: int = GROUP,
                swiglu: bool = False) -> torch.Tensor:
        rows = self._check_inputs(x, group_offsets, src_tokens, swiglu)
        check_segment_rows(segment_rows, rows, "x" if src_tokens is None else "src_tokens")
        if self.recipe.accumulate_into_main_grad:
            check_main_grad(self.weight)
        out_dtype = compute_dtype(x)
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return _forward(x, self.weight, group_offsets, src_tokens, self.recipe, out_dtype,
                            False, False, segment_rows, swiglu)[0]
        return FP8GroupedLinearFunction.apply(x, self.weight, group_offsets, self.recipe,
                                              out_dtype, src_tokens, segment_rows, swiglu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"
