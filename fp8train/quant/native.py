"""Host side of the native FP8 casts (csrc/fp8train/sm90_fp8_cast*.cuh), through the JIT.

    dual_cast        x [T, K] -> row-wise and/or column-wise (transposed) 1x128 copies;
                     with ``src_rows`` the MoE permutation is fused in (gather rows)
    swiglu_dual_cast gate, up [T, I] -> the same two casts of silu(gate) * up (SwiGLU fused
                     in; its result never written)
    swiglu_backward_dual_cast  da, gate, up [T, I] -> the two casts of d(gate) and of d(up)
                     (SwiGLU's backward fused in; the gradients never written)
    per_token_cast   x [R, K] -> row-wise 1x128 copy (optionally gathered)
    block_cast       w [G?, N, K] -> 128x128 copy and optionally the transposed copy

Bit-exact against the reference on the H100 (tests/test_cast_native.py), so every backend
but `reference` runs them on sm_90 GPUs. No argument checks here beyond what keeps a launch
in bounds; the public functions in `casts`/`moe_casts` check their inputs.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional

import torch

from ..ops.jit.runtime import raw_stream as _raw_stream
from ..ops.scale_layout import empty_scales
from .formats import FP8_DTYPE, GROUP

_C_TYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_THREADS = 256
_SWIGLU_BACKWARD_THREADS = 512
_TILE_SMEM = GROUP * GROUP * 4  # the swizzled float tile of the weight cast's transpose
_U32_MAX = 2**32 - 1
_GRID_YZ = 65535  # the most blocks along grid y and z (T/128 tiles, experts)
_u32, _vp = ctypes.c_uint32, ctypes.c_void_p

# The dual casts' outputs: the kernel parameters, and as their device functions take them
# (DualCastOut); a kernel writing two dual casts takes two prefixed sets.
_DUAL_OUT_FIELDS = (("uint8_t*", "q"), ("float*", "scale"), ("uint32_t", "scale_ld"), ("uint8_t*", "qt"),
                    ("uint32_t", "qt_cols"), ("float*", "scale_t"), ("uint32_t", "scale_t_ld"),
                    ("uint32_t", "rowwise"), ("uint32_t", "colwise"))


_DUAL_OUT_TYPES = (_vp, _vp, _u32, _vp, _u32, _vp, _u32, _u32, _u32)  # ctypes of the fields, in order


def _dual_out_params(prefix: str = "") -> str:
    return ", ".join(f"{ctype} {prefix}{name}" for ctype, name in _DUAL_OUT_FIELDS)


def _dual_out(prefix: str = "") -> str:
    fields = [f"{prefix}{name}" + (" != 0" if name in ("rowwise", "colwise") else "")
              for _, name in _DUAL_OUT_FIELDS]
    return "{{" + ", ".join(fields) + "}}"


# kernel kind -> (header, C parameter list, device function call)
_KINDS = {
    "dual_async": ("sm90_fp8_cast_dual_async.cuh",
                   "const {T}* x, const int64_t* src_rows, uint32_t src_count, uint32_t rows, "
                   "uint32_t cols, uint32_t vec_in, " + _dual_out_params(),
                   "fp8train::dual_cast_tile_async<{T}, {POW2}>(x, src_rows, src_count, rows, "
                   "cols, vec_in != 0, " + _dual_out() + ");"),
    "swiglu_dual": ("sm90_fp8_cast_swiglu.cuh",
                    "const {T}* gate, const {T}* up, uint64_t ld, uint32_t rows, uint32_t cols, "
                    + _dual_out_params(),
                    "fp8train::swiglu_dual_cast_tile<{T}, {POW2}>(gate, up, ld, rows, cols, " + _dual_out() + ");"),
    "swiglu_backward_dual": (
        "sm90_fp8_cast_swiglu_backward.cuh",
        "const {T}* gate, const {T}* up, uint64_t ld, const {T}* grad, uint64_t grad_ld, uint32_t rows, "
        "uint32_t cols, " + _dual_out_params("g_") + ", " + _dual_out_params("u_"),
        "fp8train::swiglu_backward_dual_cast_tile<{T}, {POW2}, {THREADS}>(gate, up, ld, grad, grad_ld, rows, cols, "
        + _dual_out("g_") + ", " + _dual_out("u_") + ");"),
    "per_token": ("sm90_fp8_cast_per_token.cuh",
                  "const {T}* x, const int64_t* src_rows, uint32_t src_count, uint32_t rows, "
                  "uint32_t cols, uint32_t vec_in, uint8_t* q, float* scale, uint32_t scale_ld",
                  "fp8train::per_token_cast_chunk<{T}, {POW2}>(x, src_rows, src_count, rows, "
                  "cols, vec_in != 0, q, scale, scale_ld);"),
    "block": ("sm90_fp8_cast_block.cuh",
              "const {T}* w, uint32_t n_rows, uint32_t cols, uint32_t vec_in, uint8_t* wq, "
              "float* scale, uint8_t* wtq, float* scale_t",
              "fp8train::block_cast_tile<{T}, {POW2}>(w, n_rows, cols, vec_in != 0, wq, scale, "
              "wtq, scale_t);"),
}
KINDS = tuple(_KINDS)
# Blocks per SM each kernel is compiled for. The dual cast keeps a tile in the input's dtype:
# 6 blocks of 32 KB for 2-byte types (40 registers, no spills), 3 of 64 KB for fp32 (a
# variant holding the tile in registers ran at 75-78% of a copy's bandwidth against 80-84%,
# H100; it was removed). The weight cast keeps a whole tile in registers until the block's
# amax is known: at 80 registers it spills, so it runs 2 blocks per SM (weights are a small
# share of the bytes cast).
_MIN_BLOCKS = {"per_token": 1, "block": 2}


def _threads(kind: str) -> int:
    """Threads per block. SwiGLU's backward is bound by instruction issue and latency, and its
    three staged tiles leave room for only two blocks per SM: blocks of 512 threads (32 warps
    an SM) ran it at 88-93% of a copy where 256 threads ran 23-36% (H100, docs/quant.md)."""
    return _SWIGLU_BACKWARD_THREADS if kind == "swiglu_backward_dual" else _THREADS


def _min_blocks(kind: str, dtype: torch.dtype) -> int:
    if kind == "dual_async":
        return 3 if dtype == torch.float32 else 6
    if kind == "swiglu_dual":  # two staged tiles (gate's and up's) per block
        return 1 if dtype == torch.float32 else 3
    if kind == "swiglu_backward_dual":  # three staged tiles (gate's, up's and da's) per block
        return 1 if dtype == torch.float32 else 2
    return _MIN_BLOCKS[kind]


def kernel_name(kind: str) -> str:
    return f"fp8train_{kind}_cast"


def supports(x: torch.Tensor) -> bool:
    """A CUDA tensor the kernels take: bf16/fp16/fp32, contiguous, non-empty, with every
    index in 32 bits and every grid within the launch limits (else the reference runs)."""
    return (x.is_cuda and x.dtype in _C_TYPES and x.numel() > 0 and x.is_contiguous()
            and _shape_fits(x.shape))


@functools.lru_cache(maxsize=1024)
def _shape_fits(shape: torch.Size) -> bool:
    """The size limits of ``supports``, per shape (the same few shapes repeat every step)."""
    cols = shape[-1]
    rows = math.prod(shape) // cols
    n = shape[-2] if len(shape) >= 2 else 1
    experts = rows // n  # grid z of the block cast ([G, N, K])
    return (max(shape) <= _U32_MAX and chunks_fit(rows, cols)
            and -(-n // GROUP) <= _GRID_YZ and experts <= _GRID_YZ)


def chunks_fit(rows: int, cols: int) -> bool:
    """The per-token kernel numbers its 16-element chunks (rows x 8 per 128-group) in 32 bits."""
    return rows * -(-cols // GROUP) * (GROUP // 16) < 2**31


def render_source(kind: str, dtype: torch.dtype, pow2_scale: bool) -> str:
    header, params, call = _KINDS[kind]
    threads = _threads(kind)
    fill = {"T": _C_TYPES[dtype], "POW2": str(bool(pow2_scale)).lower(), "THREADS": threads}
    return f"""// Rendered by fp8train.quant.native: {kind} cast, {dtype}, pow2_scale={pow2_scale}
#include "fp8train/{header}"

extern "C" __global__ void __launch_bounds__({threads}, {_min_blocks(kind, dtype)})
{kernel_name(kind)}({params.format(**fill)}) {{
    {call.format(**fill)}
}}
"""


def compiled_name(kind: str, dtype: torch.dtype, pow2_scale: bool) -> str:
    return f"sm90_fp8_{kind}_cast_{str(dtype).split('.')[-1]}{'_pow2' if pow2_scale else ''}"


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, dtype: torch.dtype, pow2_scale: bool, device: int):
    from ..ops.jit.compiler import compile_cubin
    from ..ops.jit.runtime import load_kernel

    compiled = compile_cubin(compiled_name(kind, dtype, pow2_scale), render_source(kind, dtype, pow2_scale))
    return load_kernel(compiled, kernel_name(kind), device)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _vec_in(x: torch.Tensor) -> int:
    """16-byte loads need every row's 16-element chunks aligned: K % 16 and the base."""
    return int(x.shape[-1] % 16 == 0 and x.data_ptr() % 16 == 0)


def _dual_outputs(rows: int, cols: int, qt_cols: int, dev: torch.device, rowwise: bool = True,
                  colwise: bool = True):
    """Empty (q [R, K], scale, qt [K, qt_cols], scale_t) of a dual cast, both scales
    K-block-major (x.T's scales are the row-wise scales of qt's rows, as cuBLAS reads them),
    None where not asked for; and the kernel arguments (DualCastOut's fields) that point at
    them."""
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=dev) if rowwise else None
    s = empty_scales((rows,), -(-cols // GROUP), dev) if rowwise else None
    qt = torch.empty(cols, qt_cols, dtype=FP8_DTYPE, device=dev) if colwise else None
    st = empty_scales((cols,), -(-qt_cols // GROUP), dev) if colwise else None
    args = (_ptr(q), _ptr(s), s.stride(-1) if rowwise else 0, _ptr(qt), qt_cols, _ptr(st),
            st.stride(-1) if colwise else 0, int(rowwise), int(colwise))
    return (q, s, qt, st), args


def dual_cast(x: torch.Tensor, pow2_scale: bool, rowwise: bool = True, colwise: bool = True,
              *, pad_columnwise: bool = True, src_rows: Optional[torch.Tensor] = None,
              num_rows: Optional[int] = None):
    """x [T, K] -> (q [R, K], scale [R, ceil(K/128)], qt [K, Rt], scale_t [K, ceil(Rt/128)]),
    both scales K-block-major (``ops.scale_layout``);
    R = T, or ``num_rows`` rows gathered through ``src_rows`` (int64 [R], values >= T are
    zero rows); Rt = R rounded up to 128 with ``pad_columnwise`` (zero rows), else R. The
    layouts not asked for come back as None."""
    src_count, cols = x.shape
    rows = src_count if src_rows is None else int(num_rows)
    qt_cols = -(-rows // GROUP) * GROUP if pad_columnwise else rows
    dev = x.device
    out, out_args = _dual_outputs(rows, cols, qt_cols, dev, rowwise, colwise)
    if rows == 0 or not (rowwise or colwise):
        return out
    # The staged tile (in the input's dtype) serves the row pass too: always there.
    _kernel("dual_async", x.dtype, bool(pow2_scale), dev.index).launch(
        (-(-cols // GROUP), -(-rows // GROUP)), _THREADS, GROUP * GROUP * x.dtype.itemsize,
        (x.data_ptr(), _ptr(src_rows), src_count, rows, cols, _vec_in(x), *out_args),
        (_vp, _vp, _u32, _u32, _u32, _u32) + _DUAL_OUT_TYPES, _raw_stream(dev.index))
    return out


def swiglu_supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """gate and up [T, I] the fused SwiGLU cast takes: CUDA bf16/fp16/fp32 of one dtype and
    device, unit column stride and one row stride, I % 16 == 0, every row 16-byte aligned,
    T/128 blocks within grid y."""
    if not (gate.is_cuda and gate.dtype in _C_TYPES and gate.dtype == up.dtype and gate.device == up.device
            and gate.dim() == 2 and gate.shape == up.shape and gate.numel() > 0):
        return False
    rows, cols = gate.shape
    ld = gate.stride(0)
    return (gate.stride(1) == 1 and up.stride(1) == 1 and up.stride(0) == ld and cols % 16 == 0
            and (ld * gate.element_size()) % 16 == 0 and gate.data_ptr() % 16 == 0
            and up.data_ptr() % 16 == 0 and max(rows, cols, ld) <= _U32_MAX
            and -(-rows // GROUP) <= _GRID_YZ)


def swiglu_dual_cast(gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool, rowwise: bool = True,
                     colwise: bool = True):
    """gate, up [T, I] -> the casts of a = silu(gate) * up that ``dual_cast(a)`` gives:
    (q [T, I], scale, qt [I, Tp], scale_t), Tp = T rounded up to 128; layouts not asked for
    are None. The caller checked ``swiglu_supports(gate, up)``."""
    rows, cols = gate.shape
    dev = gate.device
    out, out_args = _dual_outputs(rows, cols, -(-rows // GROUP) * GROUP, dev, rowwise, colwise)
    if not (rowwise or colwise):
        return out
    _kernel("swiglu_dual", gate.dtype, bool(pow2_scale), dev.index).launch(
        (-(-cols // GROUP), -(-rows // GROUP)), _THREADS, 2 * GROUP * GROUP * gate.element_size(),
        (gate.data_ptr(), up.data_ptr(), gate.stride(0), rows, cols, *out_args),
        (_vp, _vp, ctypes.c_uint64, _u32, _u32) + _DUAL_OUT_TYPES, _raw_stream(dev.index))
    return out


def swiglu_backward_dual_cast(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool):
    """da, gate, up [T, I] -> the dual casts of d(gate) and of d(up) for a = silu(gate) * up,
    as ``dual_cast`` casts autograd's gradients: ((q, scale, qt, scale_t) of d(gate), the same
    of d(up)). The caller checked ``swiglu_supports(gate, up)`` and ``swiglu_supports(grad, grad)``."""
    rows, cols = gate.shape
    dev = gate.device
    qt_cols = -(-rows // GROUP) * GROUP
    dgate, dgate_args = _dual_outputs(rows, cols, qt_cols, dev)
    dup, dup_args = _dual_outputs(rows, cols, qt_cols, dev)
    kind = "swiglu_backward_dual"
    _kernel(kind, gate.dtype, bool(pow2_scale), dev.index).launch(
        (-(-cols // GROUP), -(-rows // GROUP)), _threads(kind), 3 * GROUP * GROUP * gate.element_size(),
        (gate.data_ptr(), up.data_ptr(), gate.stride(0), grad.data_ptr(), grad.stride(0), rows, cols,
         *dgate_args, *dup_args),
        (_vp, _vp, ctypes.c_uint64, _vp, ctypes.c_uint64, _u32, _u32) + _DUAL_OUT_TYPES * 2,
        _raw_stream(dev.index))
    return dgate, dup


def per_token_cast(x: torch.Tensor, pow2_scale: bool, *, src_rows: Optional[torch.Tensor] = None,
                   num_rows: Optional[int] = None):
    """x [..., K] -> (q [..., K], scale [..., ceil(K/128)]); with ``src_rows`` x is [T, K]
    and the result has ``num_rows`` gathered rows (values >= T are zero rows)."""
    cols = x.shape[-1]
    src_count = x.numel() // cols
    rows = src_count if src_rows is None else int(num_rows)
    lead = x.shape[:-1] if src_rows is None else (rows,)
    col_blocks = -(-cols // GROUP)
    dev = x.device
    q = torch.empty(*lead, cols, dtype=FP8_DTYPE, device=dev)
    s = empty_scales(tuple(lead), col_blocks, dev)
    chunks = rows * col_blocks * (GROUP // 16)
    if chunks == 0:
        return q, s
    _kernel("per_token", x.dtype, bool(pow2_scale), dev.index).launch(
        -(-chunks // _THREADS), _THREADS, 0,
        (x.data_ptr(), _ptr(src_rows), src_count, rows, cols, _vec_in(x), q.data_ptr(), s.data_ptr(),
         s.stride(-1)),
        (_vp, _vp, _u32, _u32, _u32, _u32, _vp, _vp, _u32), _raw_stream(dev.index))
    return q, s


def block_cast(w: torch.Tensor, pow2_scale: bool, *, plain: bool = True, transposed: bool = True):
    """w [..., N, K] (2-D or 3-D) -> (w_q [..., N, K], scale [..., ceil(N/128), ceil(K/128)],
    wt_q [..., K, N], scale_t [..., ceil(K/128), ceil(N/128)]); the plain pair is None
    unless ``plain``, the transposed one None unless ``transposed``."""
    n, k = w.shape[-2:]
    lead = w.shape[:-2]
    experts = w.numel() // (n * k)
    nb, kb = -(-n // GROUP), -(-k // GROUP)
    dev = w.device
    wq = torch.empty(w.shape, dtype=FP8_DTYPE, device=dev) if plain else None
    s = torch.empty(*lead, nb, kb, dtype=torch.float32, device=dev) if plain else None
    wtq = torch.empty(*lead, k, n, dtype=FP8_DTYPE, device=dev) if transposed else None
    st = torch.empty(*lead, kb, nb, dtype=torch.float32, device=dev) if transposed else None
    _kernel("block", w.dtype, bool(pow2_scale), dev.index).launch(
        (kb, nb, experts), _THREADS, _TILE_SMEM if transposed else 0,
        (w.data_ptr(), n, k, _vec_in(w), _ptr(wq), _ptr(s), _ptr(wtq), _ptr(st)),
        (_vp, _u32, _u32, _u32, _vp, _vp, _vp, _vp), _raw_stream(dev.index))
    return wq, s, wtq, st
