"""cuBLAS blockwise FP8 GEMMs through ``torch._scaled_mm`` (the anchor we measure against).

cuBLAS wants A's 1x128 scales outer-dim-major (``[M, Kb]`` with stride ``(1, M)``), B's
128x128 scales as ``[Kb, Nb]`` and B's 1x128 scales as a contiguous ``[Kb, N]``; the
copies made here are the price of that layout.
"""
from __future__ import annotations

import torch


def supports(a: torch.Tensor, b_rows: int, out_dtype: torch.dtype, accumulate: bool,
             kind: str = "1d1d") -> bool:
    """cuBLAS blockwise scaling: sm_90 only, no in-place accumulation, and only where its
    results were right on the H100 (torch 2.11, cu130; tests/test_gemm_cublas.py). Wrong
    there: 128x128 B scales of 2x2 and 3x3 blocks (256x256x256, 256x384x384, 256x272x384),
    whatever N % 128. Every case seen right had K/128 and M multiples of 4, the leading
    dimensions of the scale views passed below; the FP8 `small` recipe (K = 768: K/128 = 6)
    diverged on this path. Until a device run separates the two explanations both are
    refused: square 128x128 scale matrices, and K/128 or M not a multiple of 4."""
    m, kb = a.shape[0], a.shape[-1] // 128
    return (
        a.is_cuda
        and kb % 4 == 0
        and m % 4 == 0
        and (kind != "1d2d" or -(-b_rows // 128) != kb)
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(a.device) == (9, 0)
        and out_dtype in (torch.bfloat16, torch.float32)
        and not accumulate
        and b_rows % 16 == 0
    )


def fp8_gemm_nt_cublas(a, sa, b, sb, out_dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    scale_a = sa.t().contiguous().t()
    scale_b = sb.t().contiguous() if sb.shape[0] == n and n > 1 else sb.t()
    return torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=out_dtype)
