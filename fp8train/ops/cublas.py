"""cuBLAS blockwise FP8 GEMMs through ``torch._scaled_mm`` (the anchor we measure against).

cuBLAS wants A's 1x128 scales outer-dim-major (``[M, Kb]`` with stride ``(1, M)``), B's
128x128 scales as ``[Kb, Nb]`` and B's 1x128 scales as a contiguous ``[Kb, N]``; the
copies made here are the price of that layout.
"""
from __future__ import annotations

import torch

from .scale_layout import is_kblock_major


def supports(a: torch.Tensor, b_rows: int, out_dtype: torch.dtype, accumulate: bool) -> bool:
    """cuBLAS blockwise scaling: sm_90 only, no in-place accumulation, and only where its
    results were right on the H100 (torch 2.11, cu130; tests/test_gemm_cublas.py): K/128
    and M multiples of 4, the leading dimensions of the scale views passed below. Wrong
    there: K/128 = 2, 3 and 6 (256x256x256, 256x384x384, 256x272x384, 256x3584x768, the
    last the FP8 `small` recipe's K = 768, which diverged on this path) and M = 250
    (250x2112x1024; 256x2112x1024 right); a square 4x4 scale matrix (256x512x512) is right
    (H100)."""
    m, kb = a.shape[0], a.shape[-1] // 128
    return (
        a.is_cuda
        and kb % 4 == 0
        and m % 4 == 0
        and m > 0  # torch rejects an empty A's scales
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(a.device) == (9, 0)
        and out_dtype in (torch.bfloat16, torch.float32)
        and not accumulate
        and b_rows % 16 == 0
    )


def fp8_gemm_nt_cublas(a, sa, b, sb, out_dtype: torch.dtype, out=None) -> torch.Tensor:
    """``(a * sa) @ (b * sb).T`` into a new tensor, or written by cuBLAS into ``out``.
    Scales already in cuBLAS's layout (the casts write A's and B's 1x128 scales so) are
    passed as they are; others are copied into it."""
    m, n = a.shape[0], b.shape[0]
    # cuBLAS reads K-block-major scales whose block stride is the row count itself: what the
    # casts write when the rows are a multiple of 4 (``supports`` asks that of M and N).
    scale_a = sa if is_kblock_major(sa, ld=m) else sa.t().contiguous().t()
    if sb.shape[0] == n and n > 1:  # B's 1x128 scales: a contiguous [Kb, N]
        scale_b = sb.t() if is_kblock_major(sb, ld=n) else sb.t().contiguous()
    else:  # B's 128x128 scales [Nb, Kb] read as [Kb, Nb]
        scale_b = sb.t()
    if out is None:
        return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=out_dtype)
    return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=out.dtype, out=out)

