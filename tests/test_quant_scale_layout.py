"""Every 1x128 scale is stored K-block-major (row-wise casts' and column-wise casts', whose
rows are x.T's): the values of the plain row-major tensor, the layout the GEMMs and cuBLAS
read, and the GEMMs giving the same bits for the K-block-major scales as for a row-major
copy of them; Inductor traces the custom ops' packed form."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import ops
from fp8train.nn import FP8Linear
from fp8train.quant import (per_block_cast, per_token_cast, per_token_cast_dual,
                            per_token_cast_permuted, per_token_cast_transposed)
from fp8train.quant.reference import dual_cast_ref, per_token_cast_ref


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(1, 600))
def test_values_equal_and_layout_is_k_block_major(lead, k):
    torch.manual_seed(0)
    x = torch.randn(*lead, k)
    want_q, want_scale = per_token_cast_ref(x, False)  # row-major, contiguous
    q, scale = per_token_cast(x)
    dual = per_token_cast_dual(x.reshape(-1, k))
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    rows, kb = x.numel() // k, scale.shape[-1]
    flat = scale.reshape(rows, kb) if rows > 1 else scale.view(rows, kb)
    if rows > 1:
        assert flat.stride(0) == 1, flat.stride()
    if kb > 1:
        assert scale.stride(-1) == max(4, -(-rows // 4) * 4), scale.stride()
    assert torch.equal(dual[1], want_scale.reshape(rows, kb))


def _assert_k_block_major(scale: torch.Tensor) -> None:
    rows, blocks = scale.shape
    if rows > 1:
        assert scale.stride(0) == 1, scale.stride()
    if blocks > 1:
        assert scale.stride(1) == max(4, -(-rows // 4) * 4), scale.stride()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_column_wise_scales_are_k_block_major(t, k):
    torch.manual_seed(0)
    x = torch.randn(t, k)
    _, _, want_qt, want_scale_t = dual_cast_ref(x, False)  # row-major, contiguous
    _, _, qt, scale_t = per_token_cast_dual(x)
    assert torch.equal(qt, want_qt) and torch.equal(scale_t, want_scale_t)
    _assert_k_block_major(scale_t)
    qt, scale_t = per_token_cast_transposed(x)
    assert torch.equal(scale_t, want_scale_t[:, :scale_t.shape[1]])
    _assert_k_block_major(scale_t)
    src = torch.arange(t).flip(0)
    _, _, _, scale_p = per_token_cast_permuted(x, src, colwise=True)
    _, _, _, want_p = dual_cast_ref(x[src], False)
    assert torch.equal(scale_p, want_p)
    _assert_k_block_major(scale_p)


def test_gemms_read_k_block_major_and_row_major_scales_alike():
    torch.manual_seed(0)
    a = per_token_cast(torch.randn(200, 384))
    b = per_block_cast(torch.randn(256, 384))
    row_major = (a[0], a[1].contiguous())
    assert a[1].stride() != row_major[1].stride()
    assert torch.equal(ops.fp8_gemm_nt(a, b), ops.fp8_gemm_nt(row_major, b))
    wgrad_b = per_token_cast(torch.randn(256, 384))
    assert torch.equal(ops.fp8_gemm_nt(a, wgrad_b, out_dtype=torch.float32),
                       ops.fp8_gemm_nt(row_major, (wgrad_b[0], wgrad_b[1].contiguous()),
                                       out_dtype=torch.float32))


def _linear_step(module, x, compiled=False):
    def step(inp):
        return module(inp).float().square().sum()

    fn = torch.compile(step, fullgraph=True, backend="inductor") if compiled else step
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad, module.weight.grad.clone()


def test_inductor_fullgraph_with_k_block_major_scales():
    """The casts' custom ops hand Inductor contiguous storage (a K-block-major scale view as
    an op output failed Inductor's stride assertion); the module's view of it is traced."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = FP8Linear(128, 256)
    x = torch.randn(3, 50, 128)
    eager = _linear_step(module, x)
    compiled = _linear_step(module, x, compiled=True)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cublas_reads_the_casts_scales_in_place(monkeypatch):
    """cuBLAS wants A's scales outer-dim-major and B's 1x128 scales as a contiguous
    [K/128, N]: the K-block-major scales the casts write, passed without a copy (fprop,
    dgrad and wgrad operands alike)."""
    from fp8train.ops import cublas

    seen = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype=None, out=None):
        seen.append((scale_a.data_ptr(), scale_b.data_ptr()))
        return torch.empty(a.shape[0], b.shape[1], dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    torch.manual_seed(0)
    x, dy, w = torch.randn(256, 512), torch.randn(256, 384), torch.randn(384, 512)
    xq, xs, xtq, xts = per_token_cast_dual(x)
    dyq, dys, dytq, dyts = per_token_cast_dual(dy)
    wq, ws = per_block_cast(w)
    cublas.fp8_gemm_nt_cublas(xq, xs, wq, ws, torch.bfloat16)  # fprop: A 1x128, B 128x128
    cublas.fp8_gemm_nt_cublas(dytq, dyts, xtq, xts, torch.float32)  # wgrad: both 1x128 along T
    assert seen == [(xs.data_ptr(), ws.data_ptr()), (dyts.data_ptr(), xts.data_ptr())]


def test_cublas_copies_scales_whose_block_stride_is_not_the_row_count(monkeypatch):
    """With rows not a multiple of 4 the casts' block stride is rounded up; cuBLAS reads a
    stride of exactly the row count, so the wrapper hands it a copy in that layout."""
    from fp8train.ops import cublas

    seen = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype=None, out=None):
        seen.append(scale_a.stride())
        return torch.empty(a.shape[0], b.shape[1], dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    a = per_token_cast(torch.randn(250, 512))
    assert a[1].stride() == (1, 252)
    wq, ws = per_block_cast(torch.randn(256, 512))
    cublas.fp8_gemm_nt_cublas(a[0], a[1], wq, ws, torch.bfloat16)
    assert seen == [(1, 250)]
