"""Reference GEMMs in plain torch that emulate the native kernels' numerics.

Each 128-wide K block's partial product is computed in FP32 (exact for E4M3 products),
scaled by ``scale_a * scale_b`` and added into an FP32 accumulator ("promotion"), as the
kernels do on CUDA cores. No argument checks here (see ``gemm``).
"""
from __future__ import annotations

import torch

from .._autocast import autocast_off

GROUP = 128


def _expand_b_scale(sb: torch.Tensor, n: int) -> torch.Tensor:
    """B's scales as one row per output column: 128x128 ``[ceil(N/128), Kb]`` or 1x128
    ``[N, Kb]`` -> ``[N, Kb]``."""
    if sb.shape[0] == n:
        return sb
    return sb.repeat_interleave(GROUP, dim=0)[:n]


def fp8_gemm_nt_ref(a, sa, b, sb) -> torch.Tensor:
    """float32 [M, N] = sum over K blocks of (a_kb @ b_kb.T) * sa * sb."""
    m, k = a.shape
    n = b.shape[0]
    sb_rows = _expand_b_scale(sb, n)
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    with autocast_off(a.device.type):  # autocast would make the FP32 block products BF16
        for kb in range(k // GROUP):
            cols = slice(kb * GROUP, (kb + 1) * GROUP)
            partial = a[:, cols].float() @ b[:, cols].float().t()
            acc += partial * (sa[:, kb, None] * sb_rows[None, :, kb])
    return acc


def m_grouped_contiguous_ref(a, sa, b, sb, offsets: list[int], out: torch.Tensor) -> None:
    for g in range(b.shape[0]):
        rows = slice(offsets[g], offsets[g + 1])
        if offsets[g + 1] > offsets[g]:
            out[rows] = fp8_gemm_nt_ref(a[rows], sa[rows], b[g], sb[g]).to(out.dtype)
    out[offsets[-1]:] = 0  # rows of no expert


def m_grouped_masked_ref(a, sa, b, sb, masked_m: list[int], out: torch.Tensor) -> None:
    for g, rows in enumerate(masked_m):
        if rows > 0:
            out[g, :rows] = fp8_gemm_nt_ref(a[g, :rows], sa[g, :rows], b[g], sb[g]).to(out.dtype)


def k_grouped_contiguous_ref(a, sa, b, sb, offsets: list[int], out: torch.Tensor,
                             accumulate: bool) -> None:
    for g in range(out.shape[0]):
        t0, t1 = offsets[g], offsets[g + 1]
        if t1 > t0:
            part = fp8_gemm_nt_ref(a[:, t0:t1], sa[:, t0 // GROUP:t1 // GROUP],
                                   b[:, t0:t1], sb[:, t0 // GROUP:t1 // GROUP])
            out[g] = out[g] + part if accumulate else part
        elif not accumulate:
            out[g].zero_()
