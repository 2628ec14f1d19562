"""cuBLAS blockwise FP8 GEMMs through ``torch._scaled_mm`` (the anchor we measure against).

cuBLAS wants A's 1x128 scales outer-dim-major (``[M, Kb]`` with stride ``(1, M)``), B's
128x128 scales as ``[Kb, Nb]`` and B's 1x128 scales as a contiguous ``[Kb, N]``; the
copies made here are the price of that layout.
"""
from __future__ import annotations

import torch


def supports(a: torch.Tensor, b_rows: int, out_dtype: torch.dtype, accumulate: bool,
             kind: str = "1d1d") -> bool:
    """cuBLAS blockwise scaling: sm_90 only, no in-place accumulation. With 128x128 B scales
    ("1d2d"), a square scale matrix (ceil(N/128) == K/128) is refused: on the H100 (torch
    2.11, cu130) 256x272x384 (3x3 scale blocks) came out wrong while 64x2112x7168 (N not a
    multiple of 128 either) was right; tests/test_gemm_cublas.py pins the rule down."""
    return (
        a.is_cuda
        and (kind != "1d2d" or -(-b_rows // 128) != a.shape[-1] // 128)
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
