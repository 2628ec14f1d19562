"""fp8train: DeepSeek-V3-style fine-grained FP8 training for PyTorch on Hopper GPUs."""
from . import nn, ops, quant
from .nn import (
    FP8GroupedLinear,
    FP8Linear,
    FP8MoE,
    FP8Recipe,
    MoE,
    convert_to_fp8,
    export_fp8_safetensors,
    load_fp8_safetensors,
    save_pretrained_fp8,
)
from .ops import *  # noqa: F403 (the GEMM operators and the backend choice: ops.__all__)
from .quant import dequantize, per_block_cast, per_token_cast, per_token_cast_transposed

__version__ = "0.1.0"

__all__ = [
    "nn",
    "ops",
    "quant",
    "per_token_cast",
    "per_block_cast",
    "per_token_cast_transposed",
    "dequantize",
    *ops.__all__,
    "convert_to_fp8",
    "export_fp8_safetensors",
    "load_fp8_safetensors",
    "save_pretrained_fp8",
    "FP8Linear",
    "FP8Recipe",
    "FP8MoE",
    "MoE",
    "FP8GroupedLinear",
]
