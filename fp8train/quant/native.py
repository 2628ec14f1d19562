"""Host side of the native FP8 casts (csrc/fp8train/sm90_fp8_cast.cuh), through the JIT.

Not yet run on a GPU: `casts` uses them only with the `native` backend (VERIFIED is False
until tests/test_cast_native.py passes on the device).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .formats import FP8_DTYPE, GROUP

VERIFIED = False
KERNEL_NAME = "fp8train_dual_cast"
_C_TYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}
_SHARED_BYTES = 128 * 129 * 4  # the float tile with one float of padding per row


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _C_TYPES and x.dim() == 2 and x.is_contiguous() and x.numel() > 0


def render_source(dtype: torch.dtype, pow2_scale: bool) -> str:
    c_type = _C_TYPES[dtype]
    return f"""// Rendered by fp8train.quant.native: {dtype}, pow2_scale={pow2_scale}
#include "fp8train/sm90_fp8_cast.cuh"

extern "C" __global__ void __launch_bounds__(256)
{KERNEL_NAME}(const {c_type}* x, uint32_t rows, uint32_t cols, uint32_t padded_rows,
              uint8_t* q, float* scale, uint8_t* qt, float* scale_t, uint32_t rowwise,
              uint32_t colwise) {{
    fp8train::dual_cast_tile<{c_type}, {str(pow2_scale).lower()}>(
        x, rows, cols, padded_rows, q, scale, qt, scale_t, rowwise != 0, colwise != 0);
}}
"""


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, pow2_scale: bool, device: int):
    from ..ops.jit.compiler import compile_cubin
    from ..ops.jit.runtime import load_kernel

    name = f"sm90_fp8_dual_cast_{str(dtype).split('.')[-1]}{'_pow2' if pow2_scale else ''}"
    return load_kernel(compile_cubin(name, render_source(dtype, pow2_scale)), KERNEL_NAME, device)


def dual_cast(x: torch.Tensor, pow2_scale: bool, rowwise: bool = True, colwise: bool = True):
    """x [T, K] -> (q [T, K], scale [T, ceil(K/128)], qt [K, Tp], scale_t [K, Tp/128]) with
    Tp = T rounded up to 128; the layouts not asked for come back as None."""
    rows, cols = x.shape
    padded = -(-rows // GROUP) * GROUP
    col_blocks = -(-cols // GROUP)
    dev = x.device
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=dev) if rowwise else None
    s = torch.empty(rows, col_blocks, dtype=torch.float32, device=dev) if rowwise else None
    qt = torch.empty(cols, padded, dtype=FP8_DTYPE, device=dev) if colwise else None
    st = torch.empty(cols, padded // GROUP, dtype=torch.float32, device=dev) if colwise else None
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    u32, vp = ctypes.c_uint32, ctypes.c_void_p
    _kernel(x.dtype, bool(pow2_scale), dev.index).launch(
        (col_blocks, padded // GROUP), 256, _SHARED_BYTES,
        (x.data_ptr(), rows, cols, padded, ptr(q), ptr(s), ptr(qt), ptr(st), int(rowwise), int(colwise)),
        (vp, u32, u32, u32, vp, vp, vp, vp, u32, u32),
        torch.cuda.current_stream(dev).cuda_stream)
    return q, s, qt, st
