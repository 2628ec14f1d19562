"""Autograd functions and drop-in modules (FP8Linear, grouped experts, MoE), model
conversion and FP8 checkpoint export."""
from . import _custom_ops  # noqa: F401  (registers the fp8train:: torch.library ops)
from .checkpoint import export_fp8_safetensors, load_fp8_safetensors, quantization_config
from .convert import ConversionReport, convert_to_fp8
from .fp8_weight import FP8BlockWeight
from .fsdp import FP8AllGatherWeight, enable_fp8_all_gather
from .hf_checkpoint import save_pretrained_fp8
from .grouped_linear import FP8GroupedLinear, FP8GroupedLinearFunction, GroupedLinear
from .linear import FP8Linear, swiglu_linear
from .linear_function import FP8LinearFunction, FP8SwiGLULinearFunction, fp8_linear, fp8_swiglu_linear
from .moe import FP8MoE, MoE, Router, SwiGLUMLP
from .moe_layout import MoELayout, build_moe_layout, permute, segment_rows_for, unpermute
from .recipe import RECIPES, FP8Recipe
from .swiglu_mlp import FP8SwiGLUMLPFunction, fp8_swiglu_mlp, swiglu_mlp

__all__ = [
    "FP8Linear",
    "FP8LinearFunction",
    "fp8_linear",
    "FP8SwiGLULinearFunction",
    "fp8_swiglu_linear",
    "swiglu_linear",
    "FP8SwiGLUMLPFunction",
    "fp8_swiglu_mlp",
    "swiglu_mlp",
    "FP8Recipe",
    "RECIPES",
    "GroupedLinear",
    "FP8GroupedLinear",
    "FP8GroupedLinearFunction",
    "MoE",
    "FP8MoE",
    "Router",
    "SwiGLUMLP",
    "MoELayout",
    "build_moe_layout",
    "segment_rows_for",
    "permute",
    "unpermute",
    "convert_to_fp8",
    "ConversionReport",
    "export_fp8_safetensors",
    "load_fp8_safetensors",
    "quantization_config",
    "enable_fp8_all_gather",
    "FP8AllGatherWeight",
    "FP8BlockWeight",
    "save_pretrained_fp8",
]
