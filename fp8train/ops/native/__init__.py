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


def dense_support(n: int, kind: str, out_dtype: torch.dtype, accumulate: bool) -> tuple[bool, str]:
    """Whether the native dense GEMM serves this call (shape/dtype side; the device was
    checked by the caller)."""
    if n % 8:
        return False, f"N = {n} is not a multiple of 8"
    if kind == "1d1d" and out_dtype != torch.float32:
        return False, "the 1D1D (wgrad) kernel writes float32 only"
    if kind == "1d2d" and out_dtype != torch.bfloat16:
        return False, "the 1D2D kernel writes bfloat16 only"
    if accumulate and out_dtype != torch.float32:
        return False, "accumulation is into float32 only"
    return toolchain_status()
