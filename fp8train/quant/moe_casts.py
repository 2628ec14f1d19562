"""FP8 casts for MoE's padded contiguous layout (nn/moe_layout.py).

``per_token_cast_permuted`` fuses the permutation into the cast: it reads the token rows of
x through ``src_tokens`` and writes the padded row-wise operand (and optionally the
column-wise one) directly, so the permuted high-precision copy never exists.

``per_token_cast_transposed_grouped`` is the column-wise (wgrad) cast of the contiguous
layout. Its 1x128 groups along T must not cross an expert's segment; segments start on
multiples of 128, so the plain column-wise cast's groups (tokens 128i..128i+127) never do,
and the two are the same function (``per_token_cast_transposed_grouped_ref`` casts segment
by segment; tests check the equality).
"""
from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, check_bool, check_same_device, check_tensor
from .casts import _use_native, per_token_cast_transposed
from ..ops.scale_layout import as_kblock_major
from .formats import FP8_DTYPE, GROUP
from . import native as _native
from .reference import permute_cast_ref


def per_token_cast_permuted(x: torch.Tensor, src_tokens: torch.Tensor, *,
                            pow2_scale: bool = False, colwise: bool = False, backend=None):
    """Cast of ``permute(x)`` without materialising it.

    x: ``[T, K]`` float tensor (the tokens, in router order).
    src_tokens: int64 ``[M]`` (``MoELayout.src_tokens``): the token each padded row copies;
        ``T`` marks a zero (padding) row. Values must lie in ``[0, T]``.
    Returns ``q`` e4m3 ``[M, K]`` and ``scale`` float32 ``[M, ceil(K/128)]``; with
    ``colwise`` also ``qt`` ``[K, Mp]`` and ``qt_scale`` ``[K, Mp/128]`` (Mp = M rounded up
    to 128, zero rows; M already is a multiple of 128 for a MoELayout). Scales are stored
    K-block-major (``ops.scale_layout``).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("src_tokens", src_tokens, dtypes=(torch.int64,), ndims=(1,))
    check_same_device(x=x, src_tokens=src_tokens)
    check_bool("pow2_scale", pow2_scale)
    check_bool("colwise", colwise)
    if x.shape[1] == 0:
        raise ValueError(f"x: expected K >= 1 columns, got shape {tuple(x.shape)}")
    rows = src_tokens.shape[0]
    if (rows > 0 and _use_native(x, backend) and src_tokens.is_contiguous()
            and _native.chunks_fit(rows, x.shape[1]) and -(-rows // GROUP) <= 65535):
        if colwise:
            return _native.dual_cast(x, pow2_scale, src_rows=src_tokens, num_rows=rows)
        return _native.per_token_cast(x, pow2_scale, src_rows=src_tokens, num_rows=rows)
    result = permute_cast_ref(x, src_tokens, pow2_scale, colwise)
    return tuple(as_kblock_major(t) if t.dtype == torch.float32 else t for t in result)


def per_token_cast_transposed_grouped(x: torch.Tensor, group_offsets: torch.Tensor, *,
                                      pow2_scale: bool = False, backend=None):
    """Column-wise cast of the contiguous expert layout x ``[M, K]`` (1x128 along M, groups
    inside each expert's segment) -> ``[K, M]`` e4m3 and ``[K, M/128]`` float32 scales.

    group_offsets: int32 ``[G+1]`` (``MoELayout.group_offsets``), multiples of 128, last
    entry at most M (rows past it are spare). Their values are checked only for CPU tensors: reading a CUDA tensor's values
    would stall the stream on every call.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("group_offsets", group_offsets, dtypes=(torch.int32,), ndims=(1,))
    check_bool("pow2_scale", pow2_scale)
    if x.shape[0] % GROUP:
        raise ValueError(f"x: expected a multiple of {GROUP} rows (padded layout), "
                         f"got shape {tuple(x.shape)}")
    if group_offsets.shape[0] < 2:
        raise ValueError(f"group_offsets: expected [G+1] with G >= 1, got shape "
                         f"{tuple(group_offsets.shape)}")
    if not group_offsets.is_cuda:
        bounds = group_offsets.tolist()
        if (bounds[0] != 0 or bounds[-1] > x.shape[0] or any(b % GROUP for b in bounds)
                or any(b > c for b, c in zip(bounds, bounds[1:]))):
            raise ValueError(f"group_offsets: expected non-decreasing multiples of {GROUP} from 0 "
                             f"to at most {x.shape[0]}, got {bounds}")
    if x.shape[0] == 0:  # no tokens routed anywhere: empty operands of the right shapes
        return (x.new_empty(x.shape[1], 0, dtype=FP8_DTYPE),
                x.new_empty(x.shape[1], 0, dtype=torch.float32))
    return per_token_cast_transposed(x, pow2_scale=pow2_scale, backend=backend)
