"""Public FP8 casts: checks, then the implementation: the native kernels (quant/native.py)
on a Hopper GPU, else the plain-torch reference; both give the same bytes and scales (the
GPU tests check it). Every cast takes ``backend`` (None: the process-wide choice,
``set_backend``): ``reference`` runs the plain-torch casts, ``native`` insists on the kernels.

NaN and Inf are never clamped: a NaN or Inf anywhere in a group makes that group's scale
NaN or Inf, so the dequantized group (and any GEMM that reads it) is non-finite too. That
is deliberate: a diverging run must show up as non-finite loss, not as quietly saturated
448s.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import FLOAT_DTYPES, check_bool, check_same_device, check_shape, check_tensor, ceil_div
from ..ops import backend as _backend
from ..ops import native as _ops_native
from ..ops.scale_layout import as_kblock_major
from .formats import FP8_DTYPE, GROUP
from . import native as _native
from .reference import (
    dequantize_ref,
    dual_cast_ref,
    per_block_cast_dual_ref,
    per_block_cast_ref,
    per_token_cast_ref,
    per_token_cast_transposed_ref,
    swiglu_backward_ref,
    swiglu_ref,
)

FP8Pair = Tuple[torch.Tensor, torch.Tensor]


def per_token_cast(x: torch.Tensor, *, pow2_scale: bool = False, backend=None) -> FP8Pair:
    """1x128 cast along the last dim.

    x: ``[..., K]`` float tensor (fp32, bf16, fp16 or fp64), K >= 1.
    Returns ``x_fp8`` e4m3 ``[..., K]`` (contiguous) and ``scale`` float32
    ``[..., ceil(K/128)]`` with ``x ~= x_fp8.float() * scale`` per group (stored
    K-block-major underneath for 2-D and up: ``ops.scale_layout``).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_bool("pow2_scale", pow2_scale)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape [..., K] with K >= 1, got {tuple(x.shape)}")
    if _use_native(x, backend):
        return _native.per_token_cast(x, pow2_scale)
    x_fp8, scale = per_token_cast_ref(x, pow2_scale)
    return x_fp8, as_kblock_major(scale)


def per_block_cast(w: torch.Tensor, *, pow2_scale: bool = False, backend=None) -> FP8Pair:
    """128x128 block cast of a weight ``[N, K]`` or a stack of expert weights ``[G, N, K]``.

    Returns ``w_fp8`` e4m3 of w's shape and ``scale`` float32 ``[ceil(N/128), ceil(K/128)]``
    (``[G, ...]`` for 3-D input).
    """
    _check_weight(w, pow2_scale)
    if _use_native(w, backend):
        return _native.block_cast(w, pow2_scale, plain=True, transposed=False)[:2]
    return per_block_cast_ref(w, pow2_scale)


def per_block_cast_dual(w: torch.Tensor, *, pow2_scale: bool = False, backend=None):
    """The 128x128 casts of a weight and of its transpose from one read of w (fprop wants
    ``W_q``, dgrad ``(W^T)_q``): w ``[N, K]`` or ``[G, N, K]`` ->
    (``w_fp8`` ``[..., N, K]``, ``scale`` ``[..., ceil(N/128), ceil(K/128)]``,
    ``wt_fp8`` ``[..., K, N]``, ``wt_scale`` ``[..., ceil(K/128), ceil(N/128)]``).
    The transposed pair is exactly ``per_block_cast(w.mT)``.
    """
    _check_weight(w, pow2_scale)
    if _use_native(w, backend):
        return _native.block_cast(w, pow2_scale, plain=True, transposed=True)
    return per_block_cast_dual_ref(w, pow2_scale)


def per_block_cast_transposed(w: torch.Tensor, *, pow2_scale: bool = False, backend=None) -> FP8Pair:
    """The 128x128 cast of ``w.mT`` (dgrad's ``(W^T)_q``) read from w ``[N, K]`` or
    ``[G, N, K]``: (``wt_fp8`` ``[..., K, N]``, ``wt_scale`` ``[..., ceil(K/128),
    ceil(N/128)]``), the transposed pair of ``per_block_cast_dual`` without the plain one."""
    _check_weight(w, pow2_scale)
    if _use_native(w, backend):
        return _native.block_cast(w, pow2_scale, plain=False, transposed=True)[2:]
    return per_block_cast_dual_ref(w, pow2_scale)[2:]


def _check_weight(w: torch.Tensor, pow2_scale) -> None:
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_bool("pow2_scale", pow2_scale)
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"w: expected N >= 1 and K >= 1, got shape {tuple(w.shape)}")


def per_token_cast_transposed(x: torch.Tensor, *, pow2_scale: bool = False, backend=None) -> FP8Pair:
    """Column-wise (wgrad) cast: x ``[T, K]`` -> the 1x128 cast of ``x.T`` along T.

    Returns ``xt_fp8`` e4m3 ``[K, T]`` contiguous and ``scale`` float32 ``[K, ceil(T/128)]``,
    stored K-block-major like every 1x128 scale (these are the row-wise scales of xt_fp8).
    Cast from the high-precision x, never from a row-wise FP8 copy (that would round twice).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_bool("pow2_scale", pow2_scale)
    if x.shape[0] == 0:
        raise ValueError(f"x: expected T >= 1 rows, got shape {tuple(x.shape)}")
    if x.shape[1] > 0 and _use_native(x, backend):
        _, _, xt_fp8, xt_scale = _native.dual_cast(x, pow2_scale, rowwise=False, pad_columnwise=False)
        return xt_fp8, xt_scale
    xt_fp8, xt_scale = per_token_cast_transposed_ref(x, pow2_scale)
    return xt_fp8, as_kblock_major(xt_scale)


def _use_native(x: torch.Tensor, backend, supported: Optional[bool] = None) -> bool:
    """The native casts run on what they take (an sm_90 GPU with the toolchain;
    bf16/fp16/fp32, contiguous) unless ``backend`` (None: the process-wide choice) is
    ``reference``; anything else, fp64 included, goes to the reference, which gives the
    same bytes. The ``native`` backend on a GPU the kernels cannot serve raises, as the
    GEMMs' does. ``cublas`` is about GEMMs: its casts run as under ``auto``. ``supported``
    replaces the kernels' own test of x (``native.supports``) for casts with other inputs."""
    chosen = _backend.chosen(backend)
    if chosen == "reference" or not (_native.supports(x) if supported is None else supported):
        return False
    path = _backend.resolve("FP8 quantization (casts)", x.device, native_ok=_ops_native.toolchain_status,
                            cublas_ok=False, backend="auto" if chosen == "cublas" else chosen)
    return path == "native"


def per_token_cast_dual(x: torch.Tensor, *, pow2_scale: bool = False, backend=None):
    """Both casts an activation or output gradient needs, from one read of x ``[T, K]``:
    the row-wise 1x128 cast (``[T, K]``, ``[T, ceil(K/128)]``) and the column-wise cast of
    ``x.T`` along T (``[K, Tp]``, ``[K, Tp/128]``, T zero-padded to Tp, a multiple of 128);
    both scales stored K-block-major.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_bool("pow2_scale", pow2_scale)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x: expected T >= 1 and K >= 1, got shape {tuple(x.shape)}")
    if _use_native(x, backend):
        return _native.dual_cast(x, pow2_scale)
    x_fp8, scale, xt_fp8, xt_scale = dual_cast_ref(x, pow2_scale)
    return x_fp8, as_kblock_major(scale), xt_fp8, as_kblock_major(xt_scale)


def swiglu_cast(gate: torch.Tensor, up: torch.Tensor, *, rowwise: bool = True, colwise: bool = True,
                pow2_scale: bool = False, backend=None):
    """The 1x128 casts of a SwiGLU output without writing it: a = silu(gate) * up (computed in
    the inputs' dtype, as a model computes it), cast as ``per_token_cast_dual(a)`` casts it.

    gate, up: ``[T, I]`` float tensors of one dtype and device (separate tensors, or the two
    halves of one ``[T, 2I]``, ``h.chunk(2, -1)``).
    Returns (a_fp8 ``[T, I]``, scale ``[T, ceil(I/128)]``, at_fp8 ``[I, Tp]``, at_scale
    ``[I, Tp/128]``), Tp = T zero-padded to a multiple of 128, scales K-block-major; the
    layouts not asked for are None. On the GPU one kernel reads gate and up once, where
    I % 16 == 0 and their rows are 16-byte aligned; otherwise a is made and cast.
    """
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("up", up, dtypes=(gate.dtype,), ndims=(2,))
    check_same_device(gate=gate, up=up)
    for name, value in (("rowwise", rowwise), ("colwise", colwise), ("pow2_scale", pow2_scale)):
        check_bool(name, value)
    if up.shape != gate.shape or gate.shape[0] == 0 or gate.shape[1] == 0:
        raise ValueError(f"up: expected gate's shape [T, I] with T, I >= 1, got gate "
                         f"{tuple(gate.shape)} and up {tuple(up.shape)}")
    if _use_native(gate, backend, supported=_native.swiglu_supports(gate, up)):
        return _native.swiglu_dual_cast(gate, up, pow2_scale, rowwise, colwise)
    a_fp8, scale, at_fp8, at_scale = per_token_cast_dual(swiglu_ref(gate, up), pow2_scale=pow2_scale,
                                                         backend=backend)
    return (a_fp8 if rowwise else None, scale if rowwise else None,
            at_fp8 if colwise else None, at_scale if colwise else None)


def swiglu_backward_cast(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *,
                         pow2_scale: bool = False, backend=None):
    """SwiGLU's backward and the casts of its two gradients without writing them: for
    a = silu(gate) * up and its gradient ``grad``, d(gate) and d(up) (computed in the inputs'
    dtype, as autograd computes them), each cast as ``per_token_cast_dual`` casts it.

    grad, gate, up: ``[T, I]`` float tensors of one dtype and device (gate and up may be the
    two halves of one ``[T, 2I]``).
    Returns ((dgate_fp8, scale, dgate_t_fp8, scale_t), (dup_fp8, scale, dup_t_fp8, scale_t)),
    each as ``per_token_cast_dual`` returns it (T zero-padded to a multiple of 128 in the
    column-wise copies). On the GPU one kernel reads grad, gate and up once, where I % 16 == 0
    and their rows are 16-byte aligned; otherwise the gradients are made and cast.
    """
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("gate", gate, dtypes=(grad.dtype,), ndims=(2,))
    check_tensor("up", up, dtypes=(grad.dtype,), ndims=(2,))
    check_same_device(grad=grad, gate=gate, up=up)
    check_bool("pow2_scale", pow2_scale)
    if not (grad.shape == gate.shape == up.shape) or grad.shape[0] == 0 or grad.shape[1] == 0:
        raise ValueError(f"grad, gate, up: expected one shape [T, I] with T, I >= 1, got grad "
                         f"{tuple(grad.shape)}, gate {tuple(gate.shape)} and up {tuple(up.shape)}")
    if _use_native(gate, backend, supported=_native.swiglu_supports(gate, up)
                   and _native.swiglu_supports(grad, grad)):
        return _native.swiglu_backward_dual_cast(grad, gate, up, pow2_scale)
    dgate, dup = swiglu_backward_ref(grad, gate, up)
    return (per_token_cast_dual(dgate, pow2_scale=pow2_scale, backend=backend),
            per_token_cast_dual(dup, pow2_scale=pow2_scale, backend=backend))


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block=(1, GROUP)) -> torch.Tensor:
    """float32 ``x_fp8 * scale``, each scale spread over its block.

    block ``(1, 128)``: x_fp8 ``[..., K]``, scale ``[..., ceil(K/128)]``.
    block ``(128, 128)``: x_fp8 ``[..., N, K]``, scale ``[..., ceil(N/128), ceil(K/128)]``.
    """
    check_tensor("x_fp8", x_fp8, dtypes=(FP8_DTYPE,))
    check_tensor("scale", scale, dtypes=(torch.float32,))
    check_same_device(x_fp8=x_fp8, scale=scale)
    if not isinstance(block, (tuple, list)):
        raise TypeError(f"block: expected (1, 128) or (128, 128), got {type(block).__name__} {block!r}")
    block = tuple(block)
    if block == (1, GROUP):
        if x_fp8.dim() < 1:
            raise ValueError("x_fp8: expected shape [..., K], got a 0-D tensor")
        expected = (*x_fp8.shape[:-1], ceil_div(x_fp8.shape[-1], GROUP))
    elif block == (GROUP, GROUP):
        if x_fp8.dim() < 2:
            raise ValueError(f"x_fp8: expected shape [..., N, K], got {tuple(x_fp8.shape)}")
        n, k = x_fp8.shape[-2:]
        expected = (*x_fp8.shape[:-2], ceil_div(n, GROUP), ceil_div(k, GROUP))
    else:
        raise ValueError(f"block: expected (1, 128) or (128, 128), got {block}")
    check_shape("scale", scale, expected)
    return dequantize_ref(x_fp8, scale, block)
