"""DeepGEMM beside our kernels, when ``deep_gemm`` is importable: a measuring stick like cuBLAS,
never a dependency. The benches hand it the same FP8 operands and scales as ours.

The version measured is DeepGEMM 2025-07 (commit 03d0be3, the last one whose JIT is pure
Python): bring its tree with the CUTLASS headers it names into an ignored folder, carry it,
and put it on PYTHONPATH (docs/kernels.md says how). Its JIT compiles each shape on first
use (a few seconds of nvcc), inside the warm-up of the timing.
"""
from __future__ import annotations

import functools
import os
import shutil

import torch


@functools.lru_cache(maxsize=1)
def load():
    """The ``deep_gemm`` module, or None (the reason printed once)."""
    if not os.environ.get("CUDA_HOME") and shutil.which("nvcc"):
        # Its JIT finds nvcc and cuobjdump under CUDA_HOME, read at import.
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    try:
        import deep_gemm
    except ImportError as exc:
        print(f"DeepGEMM: not measured ({exc})", flush=True)
        return None
    return deep_gemm


def _lhs_scales(dg, scale: torch.Tensor) -> torch.Tensor:
    # Our 2-D 1x128 scales are stored K-block-major with 16-byte aligned rows, the layout it
    # reads: this returns them as they are. 3-D (masked) ones lie [K/128, G*M_max] where it
    # wants [G, K/128, M_max]: it copies them, here, outside the timing.
    return dg.get_col_major_tma_aligned_tensor(scale)


def dense_1d2d(a, b, out: torch.Tensor):
    """A call computing out = A B^T with DeepGEMM (1x128 A scales, 128x128 B scales, BF16 out),
    or None without DeepGEMM."""
    dg = load()
    if dg is None:
        return None
    lhs = (a[0], _lhs_scales(dg, a[1]))
    return lambda: dg.gemm_fp8_fp8_bf16_nt(lhs, b, out)


def m_grouped_contiguous(a, b, offsets: torch.Tensor, out: torch.Tensor):
    """A call of DeepGEMM's m-grouped contiguous GEMM on our operands (experts' row segments
    given by ``offsets`` [G+1], multiples of 128), or None without DeepGEMM."""
    dg = load()
    if dg is None:
        return None
    rows = offsets.diff()
    m_indices = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device, dtype=torch.int32), rows)
    lhs = (a[0], _lhs_scales(dg, a[1]))
    return lambda: dg.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, b, out, m_indices)


def m_grouped_masked(a, b, masked_m: torch.Tensor, expected_m: int, out: torch.Tensor):
    """A call of DeepGEMM's m-grouped masked GEMM (a [G, M_max, K]), or None without DeepGEMM."""
    dg = load()
    if dg is None:
        return None
    lhs = (a[0], _lhs_scales(dg, a[1]))
    return lambda: dg.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, b, out, masked_m, expected_m)
