"""``FP8LinearFunction``: y = x W^T + b with all three GEMMs in FP8 (DeepSeek-V3 recipe).

    fprop  y  = gemm(x_q[1x128 along K],        W_q[128x128])
    dgrad  dx = gemm(dy_q[1x128 along N],       (W^T)_q[128x128])   exact transpose of W_q
    wgrad  dW = gemm((dy^T)_q[1x128 along T],   (x^T)_q[1x128 along T])   FP32 out

Saved for backward: x^T in FP8 (cast in the same op as the forward's row-wise copy) and
either the master weight (already alive as a parameter: no extra memory, W is re-cast in
backward) or, with ``recipe.save_fp8_weight``, W^T in FP8. No high-precision activation is
kept unless the recipe runs wgrad in high precision.

(W^T)_q is cast from W directly, in one read: in the forward with ``save_fp8_weight``,
together with W_q (one dual cast), else in backward, where the cast writes (W^T)_q alone.

The wgrad contraction runs over tokens, which must be a multiple of 128: the column-wise
casts pad T with zero rows (zero rows change no scale and add nothing to dW).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autocast import autocast_off
from .._checks import FLOAT_DTYPES, check_tensor
from . import _custom_ops as ops
from .fp8_weight import FP8BlockWeight
from ..quant.reference import swiglu_backward_ref, swiglu_ref
from .recipe import FP8Recipe
from .shared_input_cast import cast_input_layouts

GROUP = 128


def cast_weight(weight: torch.Tensor, pow2_scale: bool, backend: str = ""):
    """The 128x128 FP8 copy of ``weight``. A weight that arrives already cast (an
    ``FP8BlockWeight``, e.g. from FSDP2's FP8 all-gather) is used as is: casting it again
    would only dequantize and round the same values twice."""
    if isinstance(weight, FP8BlockWeight):
        if pow2_scale and not weight.pow2_scale:
            raise ValueError("weight: the recipe asks for power-of-two scales, but this "
                             "pre-cast FP8BlockWeight has float32 scales")
        return weight.fp8_data, weight.fp8_scale
    return ops.cast_128x128(weight, pow2_scale, backend)


def cast_weight_dual(weight: torch.Tensor, pow2_scale: bool, backend: str = ""):
    """(W_q, scale, (W^T)_q, scale^T): the 128x128 casts of ``weight`` and of its transpose,
    from one pass over a high-precision weight; a pre-cast ``FP8BlockWeight``'s blocks are
    transposed as they are (the same bytes)."""
    if isinstance(weight, FP8BlockWeight):
        w_fp8, w_scale = cast_weight(weight, pow2_scale)
        return (w_fp8, w_scale, *ops.transpose_128x128(w_fp8, w_scale))
    return ops.cast_128x128_dual(weight, pow2_scale, backend)


def cast_weight_transposed(weight: torch.Tensor, pow2_scale: bool, backend: str = ""):
    """((W^T)_q, scale^T) for dgrad: cast from a high-precision weight (one read, only the
    transposed copy written), or a pre-cast ``FP8BlockWeight``'s blocks transposed."""
    if isinstance(weight, FP8BlockWeight):
        return ops.transpose_128x128(*cast_weight(weight, pow2_scale))
    return ops.cast_128x128_transposed(weight, pow2_scale, backend)


def keeps_w_t(recipe: FP8Recipe, need_dx: bool) -> bool:
    """Whether the forward makes (W^T)_q and backward keeps it (``save_fp8_weight``)."""
    return need_dx and recipe.dgrad_fp8 and recipe.save_fp8_weight


def _plain_weight(weight: torch.Tensor) -> bool:
    """A high-precision weight the layer casts itself (not a pre-cast FP8BlockWeight)."""
    return not isinstance(weight, FP8BlockWeight)


def forward_weight_casts(weight: torch.Tensor, recipe: FP8Recipe, need_dx: bool) -> tuple:
    """The weight operands the forward makes: W_q for an FP8 fprop, and (W^T)_q when backward
    keeps it (``save_fp8_weight``); one dual cast when both are needed.
    Returns (w_fp8, w_scale, w_t_fp8, w_t_scale), None where not needed."""
    pow2, backend = recipe.pow2_scale, recipe.backend_arg
    if keeps_w_t(recipe, need_dx):
        w_fp8, w_scale, w_t_fp8, w_t_scale = cast_weight_dual(weight, pow2, backend)
        if not recipe.fprop_fp8:
            w_fp8 = w_scale = None
        return w_fp8, w_scale, w_t_fp8, w_t_scale
    if recipe.fprop_fp8:
        return (*cast_weight(weight, pow2, backend), None, None)
    return None, None, None, None


def backward_operands(grad_out_hp: torch.Tensor, weight: torch.Tensor, w_t_fp8, w_t_scale,
                      recipe: FP8Recipe, dgrad_q: bool, wgrad_q: bool) -> tuple:
    """What the FP8 backward GEMMs read: dy's row-wise cast (dgrad, if ``dgrad_q``), its
    column-wise cast (wgrad, if ``wgrad_q``) from one pass, and (W^T)_q for dgrad (the
    forward's when it kept one, else re-cast from the master weight). None where not needed:
    (dy_fp8, dy_scale, dyt_fp8, dyt_scale, w_t_fp8, w_t_scale)."""
    pow2, backend = recipe.pow2_scale, recipe.backend_arg
    dy_fp8, dy_scale, dyt_fp8, dyt_scale = ops.cast_1x128_layouts(grad_out_hp, pow2, dgrad_q, wgrad_q,
                                                                  backend)
    if dgrad_q and w_t_fp8 is None:
        w_t_fp8, w_t_scale = cast_weight_transposed(weight, pow2, backend)
    return dy_fp8, dy_scale, dyt_fp8, dyt_scale, w_t_fp8, w_t_scale


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would produce: autocast's dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def gemm_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMMs write BF16 or FP32; anything but a BF16 result is produced in FP32 and
    rounded once to its dtype (FP16 through BF16 would round twice)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def saved_for_backward(x_hp, xt_fp8, xt_scale, weight, w_t_fp8, w_t_scale, recipe: FP8Recipe,
                       need_dx: bool, need_dw: bool) -> tuple:
    """What backward reads, None where a gradient is not needed:
    (xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight). The forward's (W^T)_q
    (``forward_weight_casts``) is kept when it made one; otherwise the master weight is kept
    (by reference: no extra memory) for dgrad to re-cast, and for ``main_grad``."""
    x_hp_saved = x_hp if (need_dw and not recipe.wgrad_fp8) else None
    keep_weight = (need_dx and w_t_fp8 is None) or recipe.accumulate_into_main_grad
    return xt_fp8, xt_scale, x_hp_saved, w_t_fp8, w_t_scale, weight if keep_weight else None


def fuses_swiglu(recipe: FP8Recipe, need_dw: bool) -> bool:
    """Whether a layer reading silu(gate) * up makes the product inside its FP8 casts: when
    no high-precision GEMM reads it (fprop FP8, and wgrad FP8 where a weight gradient is
    needed)."""
    return recipe.fprop_fp8 and (recipe.wgrad_fp8 or not need_dw)


def fuses_swiglu_backward(recipe: FP8Recipe) -> bool:
    """Whether a SwiGLU block (an MLP's three layers, or experts' two) may run as one Function
    whose backward makes SwiGLU's gradient inside the FP8 casts: every GEMM in FP8, weights
    cast per call (not kept from the forward), gradients returned (not added into
    ``main_grad``)."""
    return (recipe.fprop_fp8 and recipe.dgrad_fp8 and recipe.wgrad_fp8
            and not recipe.save_fp8_weight and not recipe.accumulate_into_main_grad)


def _forward(x, weight, bias, recipe: FP8Recipe, out_dtype: torch.dtype,
             need_dx: bool, need_dw: bool, up: Optional[torch.Tensor] = None):
    """The forward GEMM, and what backward needs for the gradients asked for (None for
    the rest): (y, (xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight)). With ``up`` the
    layer's input is silu(x) * up (SwiGLU, x the gate)."""
    n, k = weight.shape
    pow2, backend = recipe.pow2_scale, recipe.backend_arg
    colwise = need_dw and recipe.wgrad_fp8
    with autocast_off(x.device.type):
        if up is not None and fuses_swiglu(recipe, need_dw):
            # SwiGLU inside the casts: its high-precision product is never written.
            x_hp = None
            x_fp8, x_scale, xt_fp8, xt_scale = ops.cast_swiglu_layouts(
                x.reshape(-1, k), up.reshape(-1, k), pow2, colwise, backend)
        else:
            if up is not None:  # a high-precision GEMM reads the product
                x = swiglu_ref(x, up)
            x_hp = x.reshape(-1, k)  # [T, K]
            # Sibling layers reading the same x (q/k/v, gate/up) share one cast of it.
            x_fp8, x_scale, xt_fp8, xt_scale = cast_input_layouts(
                x, x_hp, pow2, recipe.fprop_fp8, colwise, backend)
        if recipe.fprop_fp8:
            # Bias is added in FP32 before the single rounding to out_dtype.
            y_dtype = gemm_out_dtype(out_dtype) if bias is None else torch.float32
            if _plain_weight(weight) and not keeps_w_t(recipe, need_dx):
                # The default recipe: W_q is made and used inside one op.
                w_t_fp8 = w_t_scale = None
                y = ops.fprop_cast_weight(x_fp8, x_scale, weight, pow2, y_dtype, backend)
            else:
                w_fp8, w_scale, w_t_fp8, w_t_scale = forward_weight_casts(weight, recipe, need_dx)
                y = ops.gemm_nt(x_fp8, x_scale, w_fp8, w_scale, y_dtype, backend)
            if bias is not None:
                y = y + bias.float()
            y = y.to(out_dtype)
        else:
            w_t_fp8, w_t_scale = forward_weight_casts(weight, recipe, need_dx)[2:]
            y = torch.nn.functional.linear(
                x_hp.to(out_dtype), weight.to(out_dtype),
                None if bias is None else bias.to(out_dtype))

        saved = saved_for_backward(x_hp, xt_fp8, xt_scale, weight, w_t_fp8, w_t_scale, recipe,
                                   need_dx, need_dw)
    # y is this call's own [T, N] tensor: give it the input's leading shape without making
    # it a view (as aten's matmul does), so FSDP2's hooks on the layer's output survive an
    # in-place op downstream (FSDP2 warns about view outputs for that reason).
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], n)), saved


class FP8LinearFunction(torch.autograd.Function):
    """Autograd of ``y = x @ weight.T + bias`` on FP8 GEMMs.

    ``apply(x, weight, bias, recipe, out_dtype)``: x ``[..., K]``, weight ``[N, K]`` with N
    and K multiples of 128, bias ``[N]`` or None, ``out_dtype`` the result's dtype (see
    ``compute_dtype``). Prefer ``fp8_linear``, which checks its arguments.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: FP8Recipe, out_dtype: torch.dtype):
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (recipe.accumulate_into_main_grad
                                              and weight.requires_grad)
        y, saved = _forward(x, weight, bias, recipe, out_dtype, need_dx, need_dw)
        ctx.save_for_backward(*saved)
        _save_context(ctx, x, weight, bias, recipe, need_dw)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw, db = _backward(ctx, grad_out, ctx.saved_tensors, ctx.needs_input_grad[0],
                               ctx.has_bias and ctx.needs_input_grad[2])
        return dx, dw, db, None, None


class FP8SwiGLULinearFunction(torch.autograd.Function):
    """Autograd of ``y = (silu(gate) * up) @ weight.T + bias`` on FP8 GEMMs, SwiGLU made
    inside the input casts (``quant.swiglu_cast``) where fprop and wgrad are FP8.

    ``apply(gate, up, weight, bias, recipe, out_dtype)``: gate and up ``[..., K]`` of one
    shape and dtype; see ``FP8LinearFunction``. Prefer ``fp8_swiglu_linear``.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, recipe: FP8Recipe, out_dtype: torch.dtype):
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_dw = ctx.needs_input_grad[2] or (recipe.accumulate_into_main_grad
                                              and weight.requires_grad)
        y, saved = _forward(gate, weight, bias, recipe, out_dtype, need_dx, need_dw, up=up)
        # SwiGLU's backward reads gate and up (the layer keeps no high-precision product).
        ctx.save_for_backward(*saved, *((gate, up) if need_dx else (None, None)))
        _save_context(ctx, gate, weight, bias, recipe, need_dw)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        *saved, gate, up = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dx, dw, db = _backward(ctx, grad_out, tuple(saved), need_dx,
                               ctx.has_bias and ctx.needs_input_grad[3])
        dgate = dup = None
        if dx is not None:  # autograd's own ops for F.silu(gate) * up: the same bits
            dgate, dup = swiglu_backward_ref(dx, gate, up)
        return dgate, dup, dw, db, None, None


def _save_context(ctx, x, weight, bias, recipe: FP8Recipe, need_dw: bool) -> None:
    """What backward reads besides the saved tensors (x: the layer's input, or the gate)."""
    ctx.recipe = recipe
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.w_dtype, ctx.has_bias = weight.dtype, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.num_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ctx.need_dw = need_dw


def _backward(ctx, grad_out, saved: tuple, need_dx: bool, need_db: bool):
    """(dx, dw, db) of the linear layer, None where not needed."""
    xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight = saved
    recipe: FP8Recipe = ctx.recipe
    backend = recipe.backend_arg
    # Autograd may hand an expanded (stride-0) gradient; the GEMMs need K-major rows.
    grad_out_hp = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # [T, N]
    need_dw = ctx.need_dw
    db = None
    with autocast_off(grad_out.device.type):
        dgrad_q = need_dx and recipe.dgrad_fp8
        wgrad_q = need_dw and recipe.wgrad_fp8 and ctx.num_tokens > 0
        if (dgrad_q and wgrad_q and w_t_fp8 is None and _plain_weight(weight)
                and not recipe.accumulate_into_main_grad):
            # The default recipe: the whole backward in one op.
            dx, dw = ops.linear_grads(grad_out_hp, weight, xt_fp8, xt_scale, recipe.pow2_scale,
                                      gemm_out_dtype(ctx.x_dtype), backend)
            dx, dw = dx.to(ctx.x_dtype).reshape(ctx.x_shape), dw.to(ctx.w_dtype)
        else:
            dx, dw = _grads_op_by_op(ctx, grad_out_hp, xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale,
                                     weight, need_dx, dgrad_q, wgrad_q)
        if need_db:
            db = grad_out_hp.float().sum(0).to(ctx.bias_dtype)
    return dx, dw, db


def _grads_op_by_op(ctx, grad_out_hp, xt_fp8, xt_scale, x_hp, w_t_fp8, w_t_scale, weight,
                    need_dx: bool, dgrad_q: bool, wgrad_q: bool):
    """(dx, dw) for every recipe, one cast or GEMM op at a time; None where not needed
    (dw also with ``accumulate_into_main_grad``, which adds into ``weight.main_grad``)."""
    recipe: FP8Recipe = ctx.recipe
    backend = recipe.backend_arg
    dx = dw = None
    dy_fp8, dy_scale, dyt_fp8, dyt_scale, w_t_fp8, w_t_scale = backward_operands(
        grad_out_hp, weight, w_t_fp8, w_t_scale, recipe, dgrad_q, wgrad_q)
    if need_dx:
        if recipe.dgrad_fp8:
            dx = ops.gemm_nt(dy_fp8, dy_scale, w_t_fp8, w_t_scale, gemm_out_dtype(ctx.x_dtype), backend)
        else:
            dx = grad_out_hp @ weight.to(grad_out_hp.dtype)
        dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
    if ctx.need_dw:
        if recipe.accumulate_into_main_grad:
            if wgrad_q:
                ops.gemm_nt_accumulate_(dyt_fp8, dyt_scale, xt_fp8, xt_scale, weight.main_grad, backend)
        elif not recipe.wgrad_fp8:
            dw = (grad_out_hp.float().t() @ x_hp.float()).to(ctx.w_dtype)
        elif wgrad_q:
            dw = ops.gemm_nt(dyt_fp8, dyt_scale, xt_fp8, xt_scale, torch.float32, backend).to(ctx.w_dtype)
        else:  # no tokens: an empty contraction
            dw = grad_out_hp.new_zeros(grad_out_hp.shape[1], ctx.x_shape[-1], dtype=ctx.w_dtype)
    return dx, dw


def check_main_grad(weight: torch.Tensor) -> None:
    """``accumulate_into_main_grad`` needs ``weight.main_grad``: float32, weight's shape."""
    if not weight.requires_grad:
        return
    main_grad = getattr(weight, "main_grad", None)
    if not isinstance(main_grad, torch.Tensor) or main_grad.dtype != torch.float32 \
            or main_grad.shape != weight.shape or main_grad.device != weight.device:
        raise ValueError("weight.main_grad: accumulate_into_main_grad needs a float32 tensor "
                         f"of shape {tuple(weight.shape)} on {weight.device}, got "
                         f"{getattr(main_grad, 'dtype', main_grad)!r}")


def _check_linear_args(x, weight, bias, recipe: FP8Recipe, x_name: str) -> None:
    """The checks fp8_linear and fp8_swiglu_linear share (x: the input, or the gate)."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{x_name}: expected shape [..., {k}] to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    if recipe.any_fp8 and (n % GROUP or k % GROUP or n == 0 or k == 0):
        raise ValueError(f"weight: FP8 GEMMs need out_features and in_features to be positive "
                         f"multiples of {GROUP}, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndims=(1,))
        if bias.shape[0] != n:
            raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    if recipe.accumulate_into_main_grad:
        check_main_grad(weight)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               recipe: Optional[FP8Recipe] = None) -> torch.Tensor:
    """``F.linear`` on FP8 GEMMs: x ``[..., K]`` (any float dtype, any leading shape),
    weight ``[N, K]`` (N, K multiples of 128), bias ``[N]`` or None.

    The result has x's dtype, or autocast's dtype inside ``torch.autocast``.
    """
    recipe = FP8Recipe() if recipe is None else recipe
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    _check_linear_args(x, weight, bias, recipe, "x")
    out_dtype = compute_dtype(x)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)):
        # Inference: no column-wise copies, nothing saved (needs_input_grad would still
        # say True under no_grad).
        return _forward(x, weight, bias, recipe, out_dtype, False, False)[0]
    return FP8LinearFunction.apply(x, weight, bias, recipe, out_dtype)


def fp8_swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None,
                      recipe: Optional[FP8Recipe] = None) -> torch.Tensor:
    """``F.linear(F.silu(gate) * up, weight, bias)`` on FP8 GEMMs, the SwiGLU product cast
    to FP8 as it is made (never written in high precision where fprop and wgrad are FP8):
    the down projection of a SwiGLU MLP. gate and up ``[..., K]`` of one shape, dtype and
    device; weight ``[N, K]``; the same bits, output and gradients, as ``fp8_linear`` on
    ``F.silu(gate) * up``.
    """
    recipe = FP8Recipe() if recipe is None else recipe
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=(gate.dtype,))
    if up.shape != gate.shape or up.device != gate.device:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)} on {gate.device}, got "
                         f"{tuple(up.shape)} on {up.device}")
    _check_linear_args(gate, weight, bias, recipe, "gate")
    out_dtype = compute_dtype(gate)
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return _forward(gate, weight, bias, recipe, out_dtype, False, False, up=up)[0]
    return FP8SwiGLULinearFunction.apply(gate, up, weight, bias, recipe, out_dtype)
