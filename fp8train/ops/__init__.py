"""FP8 GEMM operators and their dispatch (native kernels, cuBLAS, reference emulation)."""
from .backend import get_backend, set_backend
from .jit.device import get_num_sms, set_num_sms
from .gemm import (
    fp8_gemm_nt,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)

__all__ = [
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous",
    "set_backend",
    "get_backend",
    "set_num_sms",
    "get_num_sms",
]
