"""The FP8 format and how a group's scale is chosen (DeepSeek-V3 recipe).

Scales are float32 *dequantization* multipliers: ``x ~= fp8.float() * scale``.
"""
from __future__ import annotations

import torch

from ..ops.scale_layout import kblock_major_ld

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
GROUP = 128  # elements per scale along the contraction dim (1x128 and 128x128 blocks)

# Row-wise 1x128 scales ([..., ceil(K/128)]) are stored K-block-major underneath
# ([ceil(K/128), rows rounded up to 4]): the layout the GEMM kernels and cuBLAS read A's scales
# in, so neither has to copy them. The logical shape and every value are those of the plain
# row-major tensor; only the strides differ (ops/scale_layout.py).

# The smallest normal float32. A group whose amax/448 falls below it (all-zero groups
# included) gets this scale: finite, never zero, so dividing by it never makes NaN.
# Magnitudes down to ~5e-36 keep the full E4M3 relative precision.
MIN_SCALE = 2.0 ** -126


def scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """float32 amax of each group -> float32 dequantization scale of each group.

    ``scale = max(amax / 448, 2^-126)``; with ``pow2_scale`` it is rounded up to the next
    power of two (exactly, on the float's bits), so that x / scale still fits in E4M3.
    NaN and Inf amax pass through (``max`` propagates NaN), poisoning the group on purpose.
    Native kernels compute the same float32 operations in the same order, so their scales
    are bit-identical.
    """
    # Divide by a tensor on amax's device, not by the Python number: torch divides a CUDA
    # tensor by a Python scalar as a * (1/b) (a different rounding in about half the groups),
    # a CPU tensor with a true division. A device tensor gets the IEEE division everywhere,
    # the one the native kernels compute.
    scale = torch.clamp_min(amax / amax.new_full((), E4M3_MAX), MIN_SCALE)
    if pow2_scale:
        bits = scale.view(torch.int32)
        mantissa = bits & 0x7FFFFF
        # A finite scale with a non-zero mantissa moves up to the next exponent; Inf/NaN
        # (exponent all ones) are left alone.
        finite = (bits & 0x7F800000) != 0x7F800000
        rounded = (bits & 0x7F800000) + ((mantissa != 0).to(torch.int32) << 23)
        scale = torch.where(finite, rounded, bits).view(torch.float32)
    return scale


def cast_to_fp8(x_f32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (an IEEE float32 division; scale is a tensor, so no reciprocal shortcut on
    CUDA), rounded to nearest-even E4M3 (|x / scale| <= 448 by construction).

    Every NaN becomes the positive NaN byte 0x7F: torch keeps a NaN's sign bit, and x86
    makes inf / inf a negative NaN where CUDA makes it positive; the hardware conversion the
    native kernels use writes 0x7F for every NaN, so one rule holds on every device.
    """
    q = x_f32 / scale
    return q.masked_fill(q.isnan(), float("nan")).to(FP8_DTYPE)


def empty_rowwise_scales(lead: tuple, col_blocks: int, device) -> torch.Tensor:
    """float32 scales of logical shape ``[*lead, col_blocks]`` for a row-wise cast, K-block-major
    underneath (2-D and up): the flattened row index contiguous, a block stride of the row
    count rounded up to 4."""
    if len(lead) == 0:
        return torch.empty(col_blocks, dtype=torch.float32, device=device)
    rows = 1
    strides = []
    for size in reversed(lead):  # the lead dims row-major over the flattened row index
        strides.append(rows)
        rows *= size
    ld = kblock_major_ld(rows)
    # One allocation viewed in place (a slice, transpose and view cost three more ops a call).
    storage = torch.empty(col_blocks * ld, dtype=torch.float32, device=device)
    return storage.as_strided((*lead, col_blocks), (*reversed(strides), ld))


def to_rowwise_layout(scale: torch.Tensor) -> torch.Tensor:
    """Row-wise scales in the layout ``empty_rowwise_scales`` gives (a copy only when it
    differs): what the reference casts return, so both implementations agree on strides."""
    if scale.dim() < 2:
        return scale
    out = empty_rowwise_scales(tuple(scale.shape[:-1]), scale.shape[-1], scale.device)
    if out.stride() == scale.stride():
        return scale
    return out.copy_(scale)
