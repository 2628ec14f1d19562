"""Reference quantizers in plain torch: the definition the native kernels must match bit
for bit. No argument checks here (see ``casts``); inputs are any float tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import FP8_DTYPE, GROUP, cast_to_fp8, scale_from_amax


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def per_token_cast_ref(x: torch.Tensor, pow2_scale: bool = False):
    """x [..., K] -> (e4m3 [..., K], float32 scale [..., ceil(K/128)])."""
    k = x.shape[-1]
    xp = _pad_last(x.float(), GROUP)
    groups = xp.unflatten(-1, (-1, GROUP))                      # [..., Kb, 128]
    scale = scale_from_amax(groups.abs().amax(dim=-1), pow2_scale)  # [..., Kb]
    x_fp8 = cast_to_fp8(groups, scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return x_fp8.contiguous(), scale


def per_block_cast_ref(w: torch.Tensor, pow2_scale: bool = False):
    """w [..., N, K] -> (e4m3 [..., N, K], float32 scale [..., ceil(N/128), ceil(K/128)])."""
    n, k = w.shape[-2:]
    wp = _pad_last(w.float(), GROUP)
    wp = _pad_last(wp.transpose(-1, -2), GROUP).transpose(-1, -2)
    blocks = wp.unflatten(-1, (-1, GROUP)).unflatten(-3, (-1, GROUP))  # [..., Nb, 128, Kb, 128]
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2_scale)  # [..., Nb, Kb]
    w_fp8 = cast_to_fp8(blocks, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    return w_fp8[..., :n, :k].contiguous(), scale


def per_token_cast_transposed_ref(x: torch.Tensor, pow2_scale: bool = False):
    """x [T, K] -> quantization of x.T along T: (e4m3 [K, T], float32 [K, ceil(T/128)])."""
    return per_token_cast_ref(x.t(), pow2_scale)


def dequantize_ref(x_fp8: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """Inverse of the casts above: float32 ``x_fp8 * scale`` with each scale spread over
    its block (``(1, 128)`` or ``(128, 128)``)."""
    rows, cols = block
    n, k = x_fp8.shape[-2:] if rows > 1 else (None, x_fp8.shape[-1])
    s = scale.repeat_interleave(cols, dim=-1)[..., :k]
    if rows > 1:
        s = s.repeat_interleave(rows, dim=-2)[..., :n, :]
    return x_fp8.float() * s


def dual_cast_ref(x: torch.Tensor, pow2_scale: bool = False):
    """x [T, K] -> the row-wise cast and the column-wise cast of x.T with T zero-padded to a
    multiple of 128 (zero rows change no amax; they make T a legal wgrad contraction)."""
    pad = -x.shape[0] % GROUP
    xt_fp8, xt_scale = per_token_cast_ref((F.pad(x, (0, 0, 0, pad)) if pad else x).t(), pow2_scale)
    return (*per_token_cast_ref(x, pow2_scale), xt_fp8, xt_scale)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up`` in the inputs' dtype, as a model computes it (each op
    rounds to the dtype)."""
    return F.silu(gate) * up


def swiglu_backward_ref(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d(gate), d(up)) of ``swiglu_ref(gate, up)`` for the gradient ``grad``, as autograd
    computes them in the inputs' dtype: ``silu_backward(grad * up, gate)`` and
    ``grad * silu(gate)``, each op rounding to the dtype."""
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def swiglu_cast_ref(gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool = False):
    """The dual cast (``dual_cast_ref``) of ``swiglu_ref(gate, up)``: what the fused kernel
    writes."""
    return dual_cast_ref(swiglu_ref(gate, up), pow2_scale)


def swiglu_backward_cast_ref(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                             pow2_scale: bool = False):
    """The dual casts (``dual_cast_ref``) of ``swiglu_backward_ref(grad, gate, up)``: what the
    fused backward kernel writes, d(gate)'s four outputs then d(up)'s."""
    dgate, dup = swiglu_backward_ref(grad, gate, up)
    return (*dual_cast_ref(dgate, pow2_scale), *dual_cast_ref(dup, pow2_scale))


def per_block_cast_dual_ref(w: torch.Tensor, pow2_scale: bool = False):
    """w [..., N, K] -> the 128x128 cast of w and of its transpose (dgrad's ``W^T``):
    (w_fp8 [..., N, K], scale [..., Nb, Kb], wt_fp8 [..., K, N], wt_scale [..., Kb, Nb]).
    A block's scale covers the same elements after transposing, so the transposed pair is
    the first pair transposed, byte for byte (tests check it equals casting ``w.mT``)."""
    w_fp8, scale = per_block_cast_ref(w, pow2_scale)
    return w_fp8, scale, w_fp8.transpose(-1, -2).contiguous(), scale.transpose(-1, -2).contiguous()


def per_token_cast_transposed_grouped_ref(x: torch.Tensor, group_offsets: torch.Tensor,
                                          pow2_scale: bool = False):
    """Column-wise cast over the contiguous expert layout: x [M, K] sorted by expert, expert
    g owning rows ``[offsets[g], offsets[g+1])`` (multiples of 128), each segment cast on
    its own (1x128 along T, never crossing a segment) -> ([K, M], [K, M/128]). Because the
    segments start on multiples of 128 this equals the plain column-wise cast of x."""
    bounds = [int(b) for b in group_offsets.tolist()]
    parts = [per_token_cast_ref(x[s:e].t(), pow2_scale) for s, e in zip(bounds, bounds[1:]) if e > s]
    if not parts:
        return (x.new_empty(x.shape[1], 0, dtype=FP8_DTYPE),
                x.new_empty(x.shape[1], 0, dtype=torch.float32))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def permute_cast_ref(x: torch.Tensor, src_tokens: torch.Tensor, pow2_scale: bool = False,
                     colwise: bool = False):
    """The MoE permutation into the padded layout followed by the 1x128 cast(s): row r of
    the result is x[src_tokens[r]], or zeros where src_tokens[r] >= T (padding rows).
    Returns the row-wise pair, plus with ``colwise`` the column-wise pair of the permuted
    rows (T padded to a multiple of 128, as ``dual_cast_ref``)."""
    x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
    rows = x_ext[src_tokens.long().clamp(max=x.shape[0])]
    return dual_cast_ref(rows, pow2_scale) if colwise else per_token_cast_ref(rows, pow2_scale)
