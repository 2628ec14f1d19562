"""FP8 formats and quantization (1x128 per-token, 128x128 per-block, column-wise)."""
from .casts import (
    dequantize,
    per_block_cast,
    per_block_cast_dual,
    per_block_cast_transposed,
    per_token_cast,
    per_token_cast_dual,
    per_token_cast_transposed,
    swiglu_backward_cast,
    swiglu_cast,
)
from .moe_casts import per_token_cast_permuted, per_token_cast_transposed_grouped
from .formats import E4M3_MAX, FP8_DTYPE, GROUP, MIN_SCALE

__all__ = [
    "per_token_cast",
    "per_block_cast",
    "per_block_cast_dual",
    "per_block_cast_transposed",
    "per_token_cast_permuted",
    "per_token_cast_transposed_grouped",
    "per_token_cast_transposed",
    "per_token_cast_dual",
    "swiglu_cast",
    "swiglu_backward_cast",
    "dequantize",
    "E4M3_MAX",
    "FP8_DTYPE",
    "GROUP",
    "MIN_SCALE",
]
