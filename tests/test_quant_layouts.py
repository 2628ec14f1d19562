"""The casts that produce GEMM operand layouts in one pass (CPU: reference and public API):
the weight cast with its transpose, and the MoE casts over the padded contiguous layout."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fp8train.nn.moe_layout import build_moe_layout, permute
from fp8train.quant import (
    per_block_cast,
    per_block_cast_dual,
    per_block_cast_transposed,
    per_token_cast,
    per_token_cast_dual,
    per_token_cast_permuted,
    per_token_cast_transposed,
    per_token_cast_transposed_grouped,
)
from fp8train.quant.formats import MIN_SCALE, scale_from_amax
from fp8train.quant.reference import per_token_cast_transposed_grouped_ref
from strategies import tensors

dims = st.integers(1, 300)


def same(a, b):
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def test_scale_is_a_true_division_by_448():
    """formats divides by a device tensor: the IEEE division on every device (a Python
    divisor would make CUDA multiply by a rounded 1/448 instead)."""
    amax = torch.rand(100_000) * 1e3
    want = torch.from_numpy(amax.numpy() / np.float32(448))
    assert torch.equal(scale_from_amax(amax, False), torch.clamp_min(want, MIN_SCALE))


@given(st.data(), st.integers(0, 3), dims, dims, st.booleans())
def test_block_cast_dual_is_cast_of_w_and_of_its_transpose(data, experts, n, k, pow2):
    w = data.draw(tensors((n, k) if experts == 0 else (experts, n, k)))
    w_fp8, w_scale, wt_fp8, wt_scale = per_block_cast_dual(w, pow2_scale=pow2)
    ref_fp8, ref_scale = per_block_cast(w, pow2_scale=pow2)
    t_fp8, t_scale = per_block_cast(w.transpose(-1, -2).contiguous(), pow2_scale=pow2)
    assert same(w_fp8, ref_fp8) and same(w_scale, ref_scale)
    assert same(wt_fp8, t_fp8) and same(wt_scale, t_scale)
    assert wt_fp8.shape == (*w.shape[:-2], k, n)
    only_t_fp8, only_t_scale = per_block_cast_transposed(w, pow2_scale=pow2)
    assert same(only_t_fp8, t_fp8) and same(only_t_scale, t_scale)


def _offsets(counts):
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + 128 * c)
    return torch.tensor(bounds, dtype=torch.int32)


@given(st.data(), st.lists(st.integers(0, 3), min_size=1, max_size=5), st.integers(1, 200),
       st.booleans())
def test_grouped_columnwise_cast_equals_plain_columnwise_cast(data, blocks, k, pow2):
    """Segments on multiples of 128 never split a 1x128 group along T, so casting each
    expert's segment on its own is the plain column-wise cast."""
    offsets = _offsets(blocks)
    x = data.draw(tensors((int(offsets[-1]), k)))
    want = per_token_cast_transposed(x, pow2_scale=pow2) if x.shape[0] else None
    ref = per_token_cast_transposed_grouped_ref(x, offsets, pow2)
    got = per_token_cast_transposed_grouped(x, offsets, pow2_scale=pow2)
    assert got[0].shape == (k, x.shape[0]) and ref[0].shape == got[0].shape
    if want is not None:
        assert same(ref[0], want[0]) and same(ref[1], want[1])
        assert same(got[0], want[0]) and same(got[1], want[1])


@given(st.data(), st.integers(1, 200), st.integers(1, 300), st.integers(1, 6), st.integers(1, 3),
       st.booleans())
def test_permuted_cast_equals_permute_then_cast(data, tokens, k, experts, top_k, pow2):
    x = data.draw(tensors((tokens, k)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(seed))
    layout = build_moe_layout(ids, experts)
    rows = permute(x, layout)
    q, s = per_token_cast_permuted(x, layout.src_tokens, pow2_scale=pow2)
    want_q, want_s = per_token_cast(rows, pow2_scale=pow2)
    assert same(q, want_q) and same(s, want_s)
    got = per_token_cast_permuted(x, layout.src_tokens, pow2_scale=pow2, colwise=True)
    for g, w in zip(got, per_token_cast_dual(rows, pow2_scale=pow2)):
        assert same(g, w)


def test_new_casts_check_their_arguments():
    x = torch.randn(256, 64)
    src = torch.arange(256)
    with pytest.raises(TypeError, match="w: expected dtype"):
        per_block_cast_dual(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="w: expected a 2 or 3-D"):
        per_block_cast_dual(torch.ones(4))
    with pytest.raises(TypeError, match="src_tokens: expected dtype torch.int64"):
        per_token_cast_permuted(x, src.int())
    with pytest.raises(ValueError, match="src_tokens: expected a 1-D"):
        per_token_cast_permuted(x, src[None])
    with pytest.raises(TypeError, match="colwise: expected a bool"):
        per_token_cast_permuted(x, src, colwise=1)
    with pytest.raises(ValueError, match="device"):
        per_token_cast_permuted(x, src.to("meta"))
    with pytest.raises(TypeError, match="group_offsets: expected dtype torch.int32"):
        per_token_cast_transposed_grouped(x, torch.tensor([0, 256]))
    with pytest.raises(ValueError, match="x: expected a multiple of 128 rows"):
        per_token_cast_transposed_grouped(x[:200], _offsets([1]))
    with pytest.raises(ValueError, match="group_offsets: expected non-decreasing multiples"):
        per_token_cast_transposed_grouped(x, torch.tensor([0, 100, 256], dtype=torch.int32))
    with pytest.raises(ValueError, match="group_offsets: expected non-decreasing multiples"):
        per_token_cast_transposed_grouped(x, _offsets([x.shape[0] // 128 + 1]))  # past the rows
    per_token_cast_transposed_grouped(x, _offsets([1]))  # rows past the last offset: spare
