"""Every ``fp8train::`` custom op against torch's own checks (``torch.library.opcheck``): its
fake implementation (the shapes, dtypes and strides torch.compile plans with) against the
real op, AOT dispatch with dynamic shapes, and, for ops without FP8 inputs, its schema (what
it mutates; the check compares inputs with arithmetic torch's CPU build lacks for e4m3).
CPU, reference path: the fake implementations are the same for every backend."""
import warnings

import pytest
import torch

import fp8train.nn._custom_ops  # noqa: F401 (registers the ops)
from fp8train.nn.moe_layout import build_moe_layout
from fp8train.quant import per_block_cast, per_token_cast_dual

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")

CHECKS = ("test_faketensor", "test_aot_dispatch_dynamic")


def _cases() -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 256, generator=gen).to(torch.bfloat16)        # [T, K]
    up = torch.randn(200, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(384, 256, generator=gen).to(torch.bfloat16)        # [N, K]
    dy = torch.randn(200, 384, generator=gen).to(torch.bfloat16)       # [T, N]
    x_fp8, x_scale, xt_fp8, xt_scale = per_token_cast_dual(x)
    dyt_fp8, dyt_scale = per_token_cast_dual(dy)[2:]
    w_fp8, w_scale = per_block_cast(w)
    experts = per_block_cast(torch.randn(3, 384, 256, generator=gen).to(torch.bfloat16))
    layout = build_moe_layout(torch.randint(0, 3, (100, 2), generator=gen), 3)
    rows = per_token_cast_dual(torch.randn(layout.num_rows, 256, generator=gen).to(torch.bfloat16))
    rows_dy = per_token_cast_dual(torch.randn(layout.num_rows, 384, generator=gen).to(torch.bfloat16))
    offsets = layout.group_offsets
    return {
        "cast_1x128": (x, False, ""),
        "cast_1x128_colwise": (x, True, ""),
        "cast_1x128_both": (x, False, ""),
        "cast_swiglu": (x, up, False, ""),
        "cast_swiglu_both": (x, up, True, ""),
        "cast_swiglu_grad_both": (torch.cat([x, up], 1), dy[:, :256], False, ""),
        "cast_128x128": (w, False, ""),
        "cast_128x128_dual": (w, True, ""),
        "cast_128x128_transposed": (w, False, ""),
        "cast_1x128_permuted": (x[:100], layout.src_tokens, False, ""),
        "cast_1x128_permuted_both": (x[:100], layout.src_tokens, False, ""),
        "gemm_nt": (x_fp8, x_scale, w_fp8, w_scale, torch.bfloat16, ""),
        "gemm_nt_accumulate_": (dyt_fp8, dyt_scale, xt_fp8, xt_scale, torch.zeros(384, 256), ""),
        "grouped_gemm_nt_contiguous": (*rows[:2], *experts, offsets, False, 128, ""),
        "k_grouped_gemm_nt_accumulate_": (*rows_dy[2:], *rows[2:], offsets, torch.zeros(3, 384, 256), ""),
        "fprop_cast_weight": (x_fp8, x_scale, w, False, torch.bfloat16, ""),
        "linear_grads": (dy, w, xt_fp8, xt_scale, False, torch.bfloat16, ""),
        # A SwiGLU MLP's gate and up projections: w [384, 256] as both, the gradient [T, 384].
        "swiglu_input_grads": (dy, dy * 0.5, dy * 2, w, w * 0.5, xt_fp8, xt_scale, False, torch.bfloat16, ""),
    }


def test_every_op_has_a_case():
    registered = {name for name in dir(torch.ops.fp8train) if not name.startswith("_")
                  and isinstance(getattr(torch.ops.fp8train, name), torch._ops.OpOverloadPacket)}
    assert registered == set(_cases())


@pytest.mark.parametrize("name", sorted(_cases()))
def test_op_passes_opcheck(name):
    op = getattr(torch.ops.fp8train, name).default
    args = _cases()[name]
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    results = torch.library.opcheck(op, args, test_utils=CHECKS + (() if fp8_inputs else ("test_schema",)))
    assert set(results.values()) == {"SUCCESS"}, results
