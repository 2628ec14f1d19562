"""The FP8 format and how a group's scale is chosen (DeepSeek-V3 recipe).

Scales are float32 *dequantization* multipliers: ``x ~= fp8.float() * scale``.
"""
from __future__ import annotations

import struct

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
GROUP = 128  # elements per scale along the contraction dim (1x128 and 128x128 blocks)

# The smallest normal float32. A group whose amax/448 falls below it (all-zero groups
# included) gets this scale: finite, never zero, so dividing by it never makes NaN.
# Magnitudes down to ~5e-36 keep the full E4M3 relative precision.
MIN_SCALE = 2.0 ** -126

# 1/448 rounded to float32 (bits 0x3B124925). Scales are amax * INV_E4M3_MAX, not amax / 448:
# torch divides a CUDA tensor by a Python scalar as a * (1/b) but a CPU tensor with a true
# division, so "amax / 448" has different bits on each device (about half the groups). One
# float32 multiply by this constant is the same on CPU, CUDA, under torch.compile and in the
# native kernels (csrc/fp8train/cast_common.cuh), so the reference is device-independent.
INV_E4M3_MAX = struct.unpack("f", struct.pack("f", 1.0 / E4M3_MAX))[0]


def scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """float32 amax of each group -> float32 dequantization scale of each group.

    ``scale = max(amax * float32(1/448), 2^-126)``; with ``pow2_scale`` it is rounded up to the next
    power of two (exactly, on the float's bits), so that x / scale still fits in E4M3.
    NaN and Inf amax pass through (``max`` propagates NaN), poisoning the group on purpose.
    Native kernels compute the same float32 operations in the same order, so their scales
    are bit-identical.
    """
    scale = torch.clamp_min(amax * INV_E4M3_MAX, MIN_SCALE)
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
    """x * (1 / scale), rounded to nearest-even E4M3 (|x / scale| <= 448 * (1 + 2^-22)).

    A multiply by the correctly rounded float32 reciprocal, not a division: a kernel then
    spends one instruction per element instead of the ~10 of an IEEE division (which kept the
    native casts instruction-bound, below memory speed). Identical to the division for
    power-of-two scales; otherwise at most one float32 ulp away before the 3-bit E4M3
    rounding. ``1 / scale`` and the multiply are exact IEEE operations on CPU and CUDA alike.

    Every NaN becomes the positive NaN byte 0x7F: torch keeps a NaN's sign bit, and x86
    makes inf * 0 or inf / inf a negative NaN where CUDA makes it positive; the hardware
    conversion the native kernels use writes 0x7F for every NaN, so one rule holds on every
    device.
    """
    q = x_f32 * torch.reciprocal(scale)
    return q.masked_fill(q.isnan(), float("nan")).to(FP8_DTYPE)
