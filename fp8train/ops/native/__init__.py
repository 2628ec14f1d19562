"""Native sm_90a kernels: what they support, and whether this process can build them."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def toolchain_status() -> tuple[bool, str]:
    """(available, reason): nvcc found and NVIDIA's driver bindings importable."""
    try:
        from ..jit.toolkit import nvcc_path

        nvcc_path()
    except (ImportError, RuntimeError) as exc:
        return False, f"no CUDA compiler ({exc})"
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as exc:
        return False, f"cuda-bindings not importable ({exc})"
    return True, "ok"


def _contiguous_3d(name: str, t: torch.Tensor) -> tuple[bool, str]:
    if not t.is_contiguous():
        return False, f"{name} is not contiguous"
    return True, "ok"


def m_grouped_support(m: int, n: int, b: torch.Tensor) -> tuple[bool, str]:
    """Whether the native m-grouped contiguous GEMM serves this call."""
    if n % 8:
        return False, f"N = {n} is not a multiple of 8"
    if m % 128:
        return False, f"M = {m} is not a multiple of 128 (segments are padded to 128 rows)"
    if b.stride(-1) != 1 or b.stride(-2) != b.shape[-1] or b.stride(0) != b.shape[-1] * b.shape[-2]:
        return False, "b[0] is not contiguous [G, N, K]"
    return toolchain_status()


def m_grouped_masked_support(n: int, a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Whether the native m-grouped masked GEMM serves this call."""
    if n % 8:
        return False, f"N = {n} is not a multiple of 8"
    for name, t in (("a[0]", a), ("b[0]", b)):
        ok, why = _contiguous_3d(name, t)
        if not ok:
            return ok, why
    return toolchain_status()


def k_grouped_support(m: int, n: int, a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Whether the native k-grouped (MoE wgrad) GEMM serves this call: a [M, T], b [N, T]."""
    if n % 8:
        return False, f"N = {n} (rows of b) is not a multiple of 8"
    for name, t in (("a[0]", a), ("b[0]", b)):
        if t.numel() and (t.stride(-1) != 1 or t.stride(0) % 16):  # no tokens: nothing is read
            return False, f"{name} rows are not 16-byte aligned and unit-stride"
    return toolchain_status()


def dense_support(n: int, kind: str, out_dtype: torch.dtype, accumulate: bool) -> tuple[bool, str]:
    """Whether the native dense GEMM serves this call (shape/dtype side; the device was
    checked by the caller)."""
    if n % 8:
        return False, f"N = {n} is not a multiple of 8"
    if kind == "1d1d" and out_dtype != torch.float32:
        return False, "the 1D1D (wgrad) kernel writes float32 only"
    if accumulate and out_dtype != torch.float32:
        return False, "accumulation is into float32 only"
    return toolchain_status()
