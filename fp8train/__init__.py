"""fp8train: DeepSeek-V3-style fine-grained FP8 training for PyTorch on Hopper GPUs."""
from . import ops, quant
from .ops import (
    fp8_gemm_nt,
    get_backend,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    set_backend,
)
from .quant import dequantize, per_block_cast, per_token_cast, per_token_cast_transposed

__version__ = "0.1.0"

__all__ = [
    "ops",
    "quant",
    "per_token_cast",
    "per_block_cast",
    "per_token_cast_transposed",
    "dequantize",
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous",
    "set_backend",
    "get_backend",
]
