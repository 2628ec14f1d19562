"""``FP8Recipe``: how an FP8 layer runs (scale format, which GEMMs use FP8, backend).

A frozen dataclass validated at construction, plus named presets
(``FP8Recipe.from_name("deepseek_v3")``), in the manner of torchao's Float8LinearConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .. import _env


@dataclass(frozen=True)
class FP8Recipe:
    """Options of an FP8 layer; every field has a safe default (the DeepSeek-V3 recipe)."""

    # Round every scale up to a power of two (the UE8M0 / communication format). Costs up
    # to one bit of precision; makes dequantize-then-requantize exact.
    pow2_scale: bool = False
    # Forward GEMM y = x W^T in FP8 (x 1x128, W 128x128); False: high precision.
    fprop_fp8: bool = True
    # Input-gradient GEMM dx = dy W in FP8 (dy 1x128 along N, W^T 128x128).
    dgrad_fp8: bool = True
    # Weight-gradient GEMM dW = dy^T x in FP8 (both 1x128 along tokens), FP32 output.
    wgrad_fp8: bool = True
    # GEMM implementation for this layer: None keeps the process-wide choice
    # (``fp8train.set_backend`` / FP8TRAIN_BACKEND), else auto|native|cublas|reference.
    backend: Optional[str] = None
    # Save W^T in FP8 for dgrad (1 byte/element kept alive until backward) instead of
    # re-casting the master weight in backward (no extra memory, one more cast of W).
    save_fp8_weight: bool = False
    # Megatron convention: add the FP32 weight gradient into ``weight.main_grad`` (which
    # must exist, float32, weight's shape) and leave ``weight.grad`` None.
    accumulate_into_main_grad: bool = False

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "backend":
                if value is not None and (not isinstance(value, str)
                                          or value not in _env.BACKENDS):
                    raise ValueError(f"backend: expected None or one of {_env.BACKENDS}, "
                                     f"got {value!r}")
            elif not isinstance(value, bool):
                raise TypeError(f"{f.name}: expected a bool, got {type(value).__name__}")
        if self.accumulate_into_main_grad and not self.wgrad_fp8:
            # The high-precision wgrad could accumulate too, but the point of main_grad
            # fusion is the FP32 GEMM epilogue; refuse the combination rather than half-do it.
            raise ValueError("accumulate_into_main_grad: needs wgrad_fp8=True")

    @property
    def any_fp8(self) -> bool:
        return self.fprop_fp8 or self.dgrad_fp8 or self.wgrad_fp8

    @property
    def backend_arg(self) -> str:
        """The backend as the custom ops take it ("" = process-wide)."""
        return self.backend or ""

    @classmethod
    def from_name(cls, name: str, **overrides) -> "FP8Recipe":
        """A named preset (see ``RECIPES``), optionally with fields overridden."""
        if not isinstance(name, str) or name not in RECIPES:
            raise ValueError(f"name: expected one of {sorted(RECIPES)}, got {name!r}")
        return cls(**{**RECIPES[name], **overrides})


# Named presets: field values passed to FP8Recipe.
RECIPES = {
    # All three GEMMs in FP8 with float32 scales (DeepSeek-V3 training).
    "deepseek_v3": {},
    # Same, power-of-two scales (UE8M0, as DeepSeek's later checkpoints and DeepGEMM's
    # sm100 path use).
    "deepseek_v3_pow2": {"pow2_scale": True},
    # FP8 forward and dgrad, BF16/FP32 wgrad: the conservative choice when weight
    # gradients of a layer turn out too noisy.
    "wgrad_hp": {"wgrad_fp8": False},
    # Only the forward GEMM in FP8 (quantization-aware fine-tuning of an FP8 checkpoint).
    "fprop_only": {"dgrad_fp8": False, "wgrad_fp8": False},
}
