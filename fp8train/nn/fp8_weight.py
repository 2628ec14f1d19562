"""``FP8BlockWeight``: a weight that arrives already cast to FP8 (128x128 blocks).

FSDP2's FP8 all-gather (``fsdp.py``) gathers each rank's e4m3 shard and its block scales;
the gathered result reaches ``FP8Linear`` as this tensor, so the forward GEMM uses it as
is instead of re-casting a high-precision weight. It presents itself as a tensor of the
parameter's dtype and shape (autograd checks the weight gradient against that), and any
operation other than the aliasing ones FSDP performs runs on the dequantized values, so
code that does not know about it still gets correct numbers.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from .._checks import FLOAT_DTYPES, check_tensor
from ..quant.formats import FP8_DTYPE, GROUP
from ..quant.reference import dequantize_ref

aten = torch.ops.aten

# Ops that alias the whole tensor without changing its shape: FSDP applies them to the
# gathered weight (as_strided to the original size, detach inside nn.Parameter). They keep
# the FP8 payload; anything else works on the dequantized weight.
_ALIASES = {aten.detach.default, aten.alias.default, aten.as_strided.default,
            aten.view.default, aten._unsafe_view.default}


class FP8BlockWeight(torch.Tensor):
    """A weight ``[N, K]`` held as e4m3 ``fp8_data [N, K]`` and float32 ``fp8_scale
    [N/128, K/128]`` (``w ~= fp8_data * scale`` per block), shown as dtype ``dtype``; or an
    expert stack ``[G, N, K]`` with scales ``[G, N/128, K/128]``.

    ``pow2_scale`` records whether the scales are powers of two, so a layer whose recipe
    asks for them can check it got them.
    """

    @staticmethod
    def __new__(cls, fp8_data: torch.Tensor, fp8_scale: torch.Tensor, dtype: torch.dtype,
                pow2_scale: bool = False, requires_grad: bool = False):
        check_tensor("fp8_data", fp8_data, dtypes=(FP8_DTYPE,), ndims=(2, 3))
        check_tensor("fp8_scale", fp8_scale, dtypes=(torch.float32,), ndims=(2, 3))
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        if not isinstance(pow2_scale, bool):
            raise TypeError(f"pow2_scale: expected a bool, got {type(pow2_scale).__name__}")
        n, k = fp8_data.shape[-2:]
        grid = (*fp8_data.shape[:-2], -(-n // GROUP), -(-k // GROUP))
        if tuple(fp8_scale.shape) != grid:
            raise ValueError(f"fp8_scale: expected shape {grid} for fp8_data of shape "
                             f"{tuple(fp8_data.shape)}, got {tuple(fp8_scale.shape)}")
        self = torch.Tensor._make_wrapper_subclass(
            cls, fp8_data.shape, dtype=dtype, device=fp8_data.device,
            requires_grad=requires_grad)
        self.fp8_data, self.fp8_scale, self.pow2_scale = fp8_data, fp8_scale, pow2_scale
        return self

    def dequantize(self) -> torch.Tensor:
        """The weight in its presented dtype (a new plain tensor)."""
        return dequantize_ref(self.fp8_data, self.fp8_scale, (GROUP, GROUP)).to(self.dtype)

    def __repr__(self) -> str:
        return (f"FP8BlockWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"pow2_scale={self.pow2_scale})")

    def __tensor_flatten__(self):
        return ["fp8_data", "fp8_scale"], (self.dtype, self.pow2_scale)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return FP8BlockWeight(inner["fp8_data"], inner["fp8_scale"], *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0]
        if func in _ALIASES and isinstance(src, FP8BlockWeight):
            base = torch.empty(src.shape, device="meta")
            out = func(base, *args[1:], **kwargs)
            if out.shape == base.shape and out.stride() == base.stride() \
                    and out.storage_offset() == 0:
                return FP8BlockWeight(src.fp8_data, src.fp8_scale, src.dtype, src.pow2_scale)
        unwrap = lambda t: t.dequantize() if isinstance(t, FP8BlockWeight) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
