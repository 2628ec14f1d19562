"""The FP8 format and how a group's scale is chosen (DeepSeek-V3 recipe).

Scales are float32 *dequantization* multipliers: ``x ~= fp8.float() * scale``.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
GROUP = 128  # elements per scale along the contraction dim (1x128 and 128x128 blocks)

# 1x128 scales are stored K-block-major (fp8train/ops/scale_layout.py).

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
