"""The reference GEMMs: exact against float64 math on the dequantized operands, close to
the unquantized product, and the grouped variants equal to loops of the dense one."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fp8train.ops import (
    fp8_gemm_nt,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from fp8train.quant import dequantize, per_block_cast, per_token_cast
from numerics import rand, rel_err

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


@given(st.integers(1, 200), st.integers(1, 300), st.integers(1, 5), st.integers(0, 2**31),
       st.sampled_from(["128x128", "1x128"]), st.integers(-20, 4))
def test_fp8_gemm_nt_matches_float64_of_dequantized(m, n, kb, seed, b_block, exp):
    k = 128 * kb
    x, w = rand(m, k, seed=seed, scale=10.0**exp), rand(n, k, seed=seed + 1)
    a = per_token_cast(x)
    b = per_block_cast(w) if b_block == "128x128" else per_token_cast(w)
    block = (128, 128) if b_block == "128x128" else (1, 128)
    da, db = dequantize(*a).double(), dequantize(*b, block).double()
    ref = da @ db.t()
    out = fp8_gemm_nt(a, b, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # FP32 accumulation: each element within (k + a few roundings) float32 ulps of the sum of
    # its terms' magnitudes (one element can cancel, so a relative bound alone is unsound:
    # m = n = 1 gave 1.13e-6); in aggregate, well inside 1e-6.
    slack = (da.abs() @ db.abs().t()) * (2 * (k + 4) * 2.0**-24)
    assert torch.all((out.double() - ref).abs() <= slack + 1e-300)
    if m * n >= 64:
        assert rel_err(out, ref) < 1e-6
    # Against the unquantized product, per element: each operand element is within 2^-4
    # of itself (E4M3 half ulp), so |y - xw| <= (|x| @ |w|.T) (2 * 2^-4 + 2^-8), plus the
    # bf16 rounding of the output.
    y, exact = fp8_gemm_nt(a, b).double(), x.double() @ w.double().t()
    bound = (x.double().abs() @ w.double().abs().t()) * (2 * 2.0**-4 + 2.0**-8)
    assert torch.all((y - exact).abs() <= bound + exact.abs() * 2.0**-8 + 1e-300)
    if m * n >= 256:  # in aggregate, about 2.5% on Gaussian data
        assert rel_err(y, exact) < 0.06
        # The same against the plain BF16 matmul of the unquantized inputs (the baseline
        # users compare with): BF16's own ~0.3% adds little to FP8's error.
        assert rel_err(y, (x.bfloat16() @ w.bfloat16().t()).double()) < 0.06


def test_fp8_gemm_nt_bf16_output_and_out_argument():
    x, w = rand(64, 256, seed=1), rand(192, 256, seed=2)
    a, b = per_token_cast(x), per_block_cast(w)
    y = fp8_gemm_nt(a, b)
    assert y.dtype == torch.bfloat16
    out = torch.full((64, 192), float("nan"), dtype=torch.bfloat16)
    assert fp8_gemm_nt(a, b, out) is out
    assert torch.equal(out, y)


def test_fp8_gemm_nt_ignores_autocast():
    """Autocast must not turn the emulation's FP32 block products into BF16 ones, and the
    caller's autocast state is back as it was afterwards."""
    a, b = per_token_cast(rand(64, 512, seed=6)), per_block_cast(rand(128, 512, seed=7))
    plain = fp8_gemm_nt(a, b, out_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fp8_gemm_nt(a, b, out_dtype=torch.float32)
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(inside, plain)


def test_fp8_gemm_nt_accumulate_adds_in_float32():
    x, g = rand(256, 384, seed=3), rand(128, 384, seed=4)
    a, b = per_token_cast(x), per_token_cast(g)
    fresh = fp8_gemm_nt(a, b, out_dtype=torch.float32)
    base = rand(256, 128, seed=5)
    out = base.clone()
    fp8_gemm_nt(a, b, out, accumulate=True)
    assert torch.equal(out, base + fresh)


def test_fp8_gemm_nt_rejects_bad_arguments():
    a, b = per_token_cast(rand(8, 256, seed=0)), per_block_cast(rand(16, 256, seed=1))
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm_nt(per_token_cast(rand(8, 100, seed=0)), per_block_cast(rand(16, 100, seed=1)))
    with pytest.raises(ValueError, match=r"a\[1\]"):
        fp8_gemm_nt((a[0], a[1][:, :1]), b)
    with pytest.raises(ValueError, match=r"b\[1\]"):
        fp8_gemm_nt(a, (b[0], torch.ones(3, 2)))
    with pytest.raises(TypeError, match=r"a\[0\]"):
        fp8_gemm_nt((rand(8, 256, seed=0), a[1]), b)
    with pytest.raises(TypeError, match="pair"):
        fp8_gemm_nt(a[0], b)
    with pytest.raises(ValueError, match="accumulate"):
        fp8_gemm_nt(a, b, accumulate=True)
    with pytest.raises(TypeError, match="float32"):
        fp8_gemm_nt(a, b, torch.zeros(8, 16, dtype=torch.bfloat16), accumulate=True)
    with pytest.raises(ValueError, match="out"):
        fp8_gemm_nt(a, b, torch.zeros(8, 17))
    with pytest.raises(ValueError, match="K-major"):
        t = torch.zeros(256, 8).to(torch.float8_e4m3fn).t()
        fp8_gemm_nt((t, a[1]), b)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm_nt(a, b, out_dtype=torch.float16)


@st.composite
def group_sizes(draw, max_groups=6, max_blocks=3):
    """Segment lengths in multiples of 128, empty segments included."""
    g = draw(st.integers(1, max_groups))
    return [128 * draw(st.integers(0, max_blocks)) for _ in range(g)]


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)


@given(group_sizes(), st.integers(1, 260), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2**31))
def test_m_grouped_contiguous_equals_loop(sizes, n, kb, spare, seed):
    """Spare row blocks past the last expert (a static-size buffer) come out as zeros."""
    m, k, g = sum(sizes), 128 * kb, len(sizes)
    if m == 0:
        sizes[0], m = 128, 128
    m += 128 * spare
    a = per_token_cast(rand(m, k, seed=seed))
    b = per_block_cast(rand(g, n, k, seed=seed + 1))
    offsets = offsets_of(sizes)
    out = m_grouped_fp8_gemm_nt_contiguous(a, b, offsets)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    for i in range(g):
        rows = slice(offsets[i], offsets[i + 1])
        expect = fp8_gemm_nt((a[0][rows], a[1][rows]), (b[0][i], b[1][i]))
        assert torch.equal(out[rows], expect)
    assert torch.all(out[m - 128 * spare:] == 0)


def test_m_grouped_contiguous_segment_rows_are_checked():
    """256-row segments: offsets that are multiples of 256 give the same result as with
    128; offsets that are not are refused (naming group_offsets), as is any other alignment."""
    a = per_token_cast(rand(768, 256, seed=1))
    b = per_block_cast(rand(2, 136, 256, seed=2))
    offsets = offsets_of([256, 512])
    assert torch.equal(m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, segment_rows=256),
                       m_grouped_fp8_gemm_nt_contiguous(a, b, offsets))
    with pytest.raises(ValueError, match="group_offsets: expected non-decreasing multiples of 256"):
        m_grouped_fp8_gemm_nt_contiguous(a, b, offsets_of([128, 640]), segment_rows=256)
    for bad in (64, 512, 256.0, True):
        with pytest.raises(ValueError, match="segment_rows"):
            m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, segment_rows=bad)


@given(st.integers(1, 5), st.integers(1, 200), st.integers(1, 260), st.integers(1, 3),
       st.integers(0, 2**31), st.data())
def test_m_grouped_masked_equals_loop(g, m_max, n, kb, seed, data):
    k = 128 * kb
    counts = [data.draw(st.integers(0, m_max)) for _ in range(g)]
    a = per_token_cast(rand(g, m_max, k, seed=seed))
    b = per_block_cast(rand(g, n, k, seed=seed + 1))
    sentinel = torch.full((g, m_max, n), 7.0, dtype=torch.bfloat16)
    out = m_grouped_fp8_gemm_nt_masked(a, b, torch.tensor(counts, dtype=torch.int32), sentinel)
    for i, rows in enumerate(counts):
        expect = fp8_gemm_nt((a[0][i, :rows], a[1][i, :rows]), (b[0][i], b[1][i]))
        assert torch.equal(out[i, :rows], expect)
        assert torch.all(out[i, rows:] == 7.0), "rows past masked_m were written"


@given(group_sizes(), st.integers(1, 200), st.integers(1, 200), st.booleans(), st.integers(0, 2),
       st.integers(0, 2**31))
def test_k_grouped_contiguous_equals_loop(sizes, n, k, accumulate, spare, seed):
    """Spare tokens past the last expert are left out of every expert's gradient."""
    t, g = sum(sizes), len(sizes)
    if t == 0:
        sizes[-1], t = 128, 128
    t += 128 * spare
    dy, x = rand(t, n, seed=seed), rand(t, k, seed=seed + 1)
    a, b = per_token_cast(dy.t()), per_token_cast(x.t())  # [N, T] and [K, T], 1x128 along T
    offsets = offsets_of(sizes)
    base = rand(g, n, k, seed=seed + 2)
    out = base.clone() if accumulate else None
    out = k_grouped_fp8_gemm_nt_contiguous(a, b, offsets, out, accumulate=accumulate)
    assert out.shape == (g, n, k) and out.dtype == torch.float32
    for i in range(g):
        t0, t1 = offsets[i].item(), offsets[i + 1].item()
        if t1 == t0:
            expect = torch.zeros(n, k)
        else:
            cols = slice(t0 // 128, t1 // 128)
            expect = fp8_gemm_nt((a[0][:, t0:t1], a[1][:, cols]), (b[0][:, t0:t1], b[1][:, cols]),
                                 out_dtype=torch.float32)
        if accumulate:
            expect = base[i] + expect
        assert torch.equal(out[i], expect)


def test_grouped_offsets_are_checked():
    a = per_token_cast(rand(256, 128, seed=0))
    b = per_block_cast(rand(2, 128, 128, seed=1))
    for bad in ([0, 100, 256], [0, 256, 128], [0, 128, 384]):
        with pytest.raises(ValueError, match="group_offsets"):
            m_grouped_fp8_gemm_nt_contiguous(a, b, torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(TypeError, match="group_offsets"):
        m_grouped_fp8_gemm_nt_contiguous(a, b, torch.tensor([0, 128, 256]))
    with pytest.raises(ValueError, match="masked_m"):
        a3 = per_token_cast(rand(2, 64, 128, seed=0))
        m_grouped_fp8_gemm_nt_masked(a3, b, torch.tensor([65, 0], dtype=torch.int32))


def test_grouped_out_must_have_the_kernels_dtype():
    """The grouped kernels write one dtype (bf16 for the m-grouped, float32 for the
    k-grouped); an `out` of the other would be filled with reinterpreted bits."""
    a = per_token_cast(rand(256, 128, seed=0))
    b = per_block_cast(rand(2, 128, 128, seed=1))
    offsets = torch.tensor([0, 128, 256], dtype=torch.int32)
    with pytest.raises(TypeError, match="out: expected dtype torch.bfloat16"):
        m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, torch.empty(256, 128))
    a3 = per_token_cast(rand(2, 64, 128, seed=0))
    with pytest.raises(TypeError, match="out: expected dtype torch.bfloat16"):
        m_grouped_fp8_gemm_nt_masked(a3, b, torch.tensor([64, 0], dtype=torch.int32),
                                     torch.empty(2, 64, 128))
    at, bt = per_token_cast(rand(128, 256, seed=2)), per_token_cast(rand(256, 256, seed=3))
    with pytest.raises(TypeError, match="out: expected dtype torch.float32"):
        k_grouped_fp8_gemm_nt_contiguous(at, bt, offsets, torch.empty(2, 128, 256, dtype=torch.bfloat16))


def test_plan_cache_never_hides_a_bad_call():
    """A validated signature is reused; any difference in the call is checked in full."""
    a, b = per_token_cast(rand(8, 256, seed=0)), per_block_cast(rand(16, 256, seed=1))
    first = fp8_gemm_nt(a, b)
    assert torch.equal(fp8_gemm_nt(a, b), first)  # second call: the cached plan
    with pytest.raises(ValueError, match="accumulate"):
        fp8_gemm_nt(a, b, accumulate=True)
    with pytest.raises(ValueError, match=r"a\[1\]"):
        fp8_gemm_nt((a[0], a[1][:, :1].contiguous()), b)
    with pytest.raises(TypeError, match="pair"):
        fp8_gemm_nt(torch.zeros(2, 256).to(torch.float8_e4m3fn), b)
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm_nt(a, b, out_dtype=torch.float16)
