"""A torchao-style FP8 linear for ``bench linear`` to stand next to: one dynamic scale per
tensor (x, W and dy each cast to e4m3 by their amax), the three GEMMs on
``torch._scaled_mm`` (fast accumulation in the forward, as torchao's default recipe), and
the whole step compiled so the casts fuse. DESIGN.md measured torchao's own tensorwise
recipe at 1.51x / 1.38x / 1.44x BF16 on the bench shapes; torchao is not on the device, so
the bench times this stand-in (and torchao itself where it is installed).
"""
from __future__ import annotations

import torch
import torch.nn as nn

E4M3_MAX = 448.0


def _cast(t: torch.Tensor):
    """(e4m3 tensor, float32 dequantization scale) with one scale for the whole tensor."""
    scale = t.abs().amax().float().clamp_min(1e-12) / E4M3_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, as `_scaled_mm` wants its second operand."""
    return t.t().contiguous().t()


class _TensorwiseFP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xq, sx = _cast(x)
        wq, sw = _cast(weight)
        ctx.save_for_backward(xq, sx, wq, sw)
        return torch._scaled_mm(xq, wq.t(), sx, sw, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        gq, sg = _cast(grad)
        dx = torch._scaled_mm(gq, _col_major(wq), sg, sw, out_dtype=grad.dtype)
        dw = torch._scaled_mm(gq.t().contiguous(), _col_major(xq), sg, sx, out_dtype=grad.dtype)
        return dx, dw


class TensorwiseFP8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward and both backward GEMMs run tensorwise FP8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _TensorwiseFP8Matmul.apply(x.reshape(-1, shape[-1]), self.weight)
        return y.reshape(*shape[:-1], self.out_features)


def tensorwise_twin(linear: nn.Linear) -> nn.Module:
    """A compiled TensorwiseFP8Linear sharing `linear`'s weight values (its own copy)."""
    twin = TensorwiseFP8Linear(linear.in_features, linear.out_features, bias=False,
                               device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(linear.weight)
    return torch.compile(twin)


def torchao_twin(linear: nn.Linear):
    """torchao's tensorwise Float8Linear of a copy of `linear`, compiled; None without torchao."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        return None
    import copy

    holder = nn.Sequential(copy.deepcopy(linear))
    convert_to_float8_training(holder)
    return torch.compile(holder)
