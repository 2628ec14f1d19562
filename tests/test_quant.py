"""Properties of the reference FP8 casts (CPU)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fp8train.quant import (
    E4M3_MAX,
    MIN_SCALE,
    dequantize,
    per_block_cast,
    per_token_cast,
    per_token_cast_dual,
    per_token_cast_transposed,
    swiglu_backward_cast,
    swiglu_cast,
)
from strategies import tensors

dims = st.integers(1, 300)


def assert_within_e4m3_bound(x: torch.Tensor, dq: torch.Tensor, scale_full: torch.Tensor):
    """Every element: |x - dq| <= max(|x| 2^-4, 2^-10 scale) (E4M3's half ulp in its normal
    and subnormal range) and <= amax/28 of its group, up to float32 rounding."""
    x = x.double()
    err = (x - dq.double()).abs()
    # float32 rounding of x / scale and of q * scale: a few ulps of |x|.
    slack = x.abs() * 2.0**-21 + 1e-45
    bound = torch.maximum(x.abs() * 2.0**-4, scale_full.double() * 2.0**-10)
    assert torch.all(err <= bound + slack), f"max excess {(err - bound - slack).max().item()}"
    # Relative to the group's amax: half the top binade's step is 16 * scale = amax / 28.
    assert torch.all(err <= scale_full.double() * 16 + slack)


def group_amax(x: torch.Tensor, block) -> torch.Tensor:
    """Each group's amax of x, computed here from the input (zero-padded partial groups;
    NaN propagates): ``[..., ceil(K/128)]`` for (1, 128), ``[..., ceil(N/128), ceil(K/128)]``
    for (128, 128)."""
    x = x.double().abs()
    k = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, -k % 128))
    if block == (1, 128):
        return x.unflatten(-1, (-1, 128)).amax(-1)
    n = x.shape[-2]
    x = torch.nn.functional.pad(x, (0, 0, 0, -n % 128))
    return x.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).amax((-3, -1))


def expected_scale(x: torch.Tensor, block, pow2: bool = False) -> torch.Tensor:
    """The DeepSeek-V3 scale rule from each group's amax, computed independently of the
    library: amax / 448 correctly rounded to float32 (a float64 quotient rounded once is the
    IEEE float32 quotient), at least 2^-126, with ``pow2`` the next power of two up."""
    scale = (group_amax(x, block) / E4M3_MAX).float().clamp_min(MIN_SCALE).double()
    if pow2:  # NaN and Inf stay as they are
        mantissa, exponent = torch.frexp(scale)
        up = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
        scale = torch.where(torch.isfinite(scale), up, scale)
    return scale.float()


def spread_token_scale(scale, k):
    return scale.repeat_interleave(128, dim=-1)[..., :k]


def spread_block_scale(scale, n, k):
    return scale.repeat_interleave(128, dim=-1)[..., :k].repeat_interleave(128, dim=-2)[..., :n, :]


@given(st.data(), st.lists(st.integers(1, 5), max_size=2), dims)
def test_per_token_cast_error_bound(data, lead, k):
    x = data.draw(tensors((*lead, k)))
    x_fp8, scale = per_token_cast(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape and x_fp8.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*lead, -(-k // 128))
    assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
    assert torch.equal(scale, expected_scale(x, (1, 128)))
    full = spread_token_scale(scale, k)
    assert_within_e4m3_bound(x.float(), dequantize(x_fp8, scale), full)
    # The largest element of each group lands on (or within rounding of) 448.
    assert torch.all(x_fp8.float().abs() <= E4M3_MAX)


@given(st.data(), st.sampled_from([2, 3]), dims, dims)
def test_per_block_cast_error_bound(data, ndim, n, k):
    shape = (n, k) if ndim == 2 else (2, n, k)
    w = data.draw(tensors(shape))
    w_fp8, scale = per_block_cast(w)
    assert w_fp8.shape == w.shape and w_fp8.dtype == torch.float8_e4m3fn
    assert scale.shape == (*shape[:-2], -(-n // 128), -(-k // 128))
    assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
    assert torch.equal(scale, expected_scale(w, (128, 128)))
    full = spread_block_scale(scale, n, k)
    assert_within_e4m3_bound(w.float(), dequantize(w_fp8, scale, (128, 128)), full)


@given(st.data(), dims, dims)
def test_transposed_cast_is_cast_of_transpose(data, t, k):
    x = data.draw(tensors((t, k)))
    xt_fp8, scale = per_token_cast_transposed(x)
    assert xt_fp8.shape == (k, t) and xt_fp8.is_contiguous()
    assert scale.shape == (k, -(-t // 128))
    ref_fp8, ref_scale = per_token_cast(x.t().contiguous())
    assert torch.equal(xt_fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(scale, expected_scale(x.t(), (1, 128)))
    assert_within_e4m3_bound(x.float().t(), dequantize(xt_fp8, scale), spread_token_scale(scale, t))


@given(st.data(), dims, dims, st.integers(-20, 20), st.booleans())
def test_power_of_two_rescaling_is_exact(data, m, k, shift, pow2):
    """x * 2^s quantizes to the same bytes with scales times 2^s (no rounding anywhere)."""
    x = data.draw(tensors((m, k), dtypes=(torch.float32, torch.bfloat16)))
    x = x.float().clamp(-1e3, 1e3)
    x = torch.where(x.abs() < 1e-20, torch.zeros_like(x), x)  # keep clear of denormals
    x_fp8, scale = per_token_cast(x, pow2_scale=pow2)
    y_fp8, y_scale = per_token_cast(x * 2.0**shift, pow2_scale=pow2)
    assert torch.equal(x_fp8.view(torch.uint8), y_fp8.view(torch.uint8))
    nonzero = scale > MIN_SCALE * 2.0**25  # clamped (all-zero) groups keep the floor scale
    assert torch.equal(y_scale[nonzero], scale[nonzero] * 2.0**shift)
    w_fp8, w_scale = per_block_cast(x, pow2_scale=pow2)
    v_fp8, v_scale = per_block_cast(x * 2.0**shift, pow2_scale=pow2)
    assert torch.equal(w_fp8.view(torch.uint8), v_fp8.view(torch.uint8))
    nonzero = w_scale > MIN_SCALE * 2.0**25
    assert torch.equal(v_scale[nonzero], w_scale[nonzero] * 2.0**shift)


@given(st.data(), dims, dims)
def test_pow2_scales_are_powers_of_two(data, m, k):
    x = data.draw(tensors((m, k)))
    for x_fp8, scale, block in (
        (*per_token_cast(x, pow2_scale=True), (1, 128)),
        (*per_block_cast(x, pow2_scale=True), (128, 128)),
    ):
        mantissa, _ = torch.frexp(scale)
        assert torch.all(mantissa == 0.5), "a pow2 scale has a non-zero mantissa"
        assert torch.equal(scale, expected_scale(x, block, pow2=True))
        full = (spread_token_scale(scale, k) if block == (1, 128)
                else spread_block_scale(scale, m, k))
        assert torch.all(x_fp8.float().abs() <= E4M3_MAX)
        assert_within_e4m3_bound(x.float(), dequantize(x_fp8, scale, block), full)


def test_pow2_scale_rounds_up_to_next_power():
    x = torch.zeros(1, 128)
    x[0, 0] = 448 * 3.0  # amax / 448 = 3 -> 4
    _, scale = per_token_cast(x, pow2_scale=True)
    assert scale.item() == 4.0
    x[0, 0] = 448 * 2.0  # exactly a power of two stays
    _, scale = per_token_cast(x, pow2_scale=True)
    assert scale.item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_groups_give_finite_scale_and_zero_data(dtype):
    x = torch.zeros(3, 300, dtype=dtype)
    x[1, 200] = 5.0  # one group non-zero
    for pow2 in (False, True):
        for x_fp8, scale in (per_token_cast(x, pow2_scale=pow2), per_block_cast(x, pow2_scale=pow2),
                             per_token_cast_transposed(x, pow2_scale=pow2)):
            assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
            # Zero groups are exact zeros (and the one non-zero element stays non-zero).
            assert torch.count_nonzero(x_fp8.view(torch.uint8)) == 1
            assert scale.min().item() == MIN_SCALE
    x_fp8, scale = per_token_cast(x)
    assert scale[0, 0].item() == MIN_SCALE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_poisons_only_its_group(bad):
    x = torch.randn(4, 384)
    x[2, 130] = bad
    x_fp8, scale = per_token_cast(x)
    dq = dequantize(x_fp8, scale)
    assert torch.all(~torch.isfinite(dq[2, 128:256])), "the group with a non-finite was clamped"
    finite = torch.ones_like(dq, dtype=torch.bool)
    finite[2, 128:256] = False
    assert torch.all(torch.isfinite(dq[finite]))
    w_fp8, w_scale = per_block_cast(x)
    dqw = dequantize(w_fp8, w_scale, (128, 128))
    assert torch.all(~torch.isfinite(dqw[:, 128:256]))
    assert torch.all(torch.isfinite(dqw[:, :128])) and torch.all(torch.isfinite(dqw[:, 256:]))
    xt_fp8, xt_scale = per_token_cast_transposed(x)
    dqt = dequantize(xt_fp8, xt_scale)                      # [384, 4]: x.T, one group per row
    assert torch.all(~torch.isfinite(dqt[130])), "the transposed cast clamped a non-finite"
    assert torch.all(torch.isfinite(dqt[:130])) and torch.all(torch.isfinite(dqt[131:]))
    # In the FP8 data itself the non-finite element is the NaN byte (E4M3 has no Inf), not
    # a clamped +-448 or a zero; the scale of its group is non-finite too.
    for data, at, scale in ((x_fp8, (2, 130), scale[2, 1]), (w_fp8, (2, 130), w_scale[0, 1]),
                            (xt_fp8, (130, 2), xt_scale[130, 0])):
        assert data.view(torch.uint8)[at].item() == 0x7F
        assert not torch.isfinite(scale)


def test_outlier_only_coarsens_its_own_group():
    x = torch.randn(2, 256) * 1e-3
    x[0, 5] = 1e4
    x_fp8, scale = per_token_cast(x)
    assert scale[0, 0] > 1e4 / 448 * 0.99
    assert torch.allclose(scale[0, 1], x[0, 128:].abs().max() / 448)


@pytest.mark.parametrize("call", [per_token_cast, per_block_cast, per_token_cast_transposed])
def test_bad_arguments_raise(call):
    with pytest.raises(TypeError, match="x|w"):
        call([[1.0, 2.0]])
    with pytest.raises(TypeError, match="dtype"):
        call(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        call(torch.ones(4, 4).to(torch.float8_e4m3fn))
    if call is not per_token_cast:
        with pytest.raises(ValueError, match="shape"):
            call(torch.ones(2, 2, 2, 2))


def test_dequantize_checks_arguments():
    x_fp8, scale = per_token_cast(torch.randn(4, 256))
    with pytest.raises(ValueError, match="block"):
        dequantize(x_fp8, scale, (2, 64))
    with pytest.raises(ValueError, match="scale"):
        dequantize(x_fp8, scale[:, :1])
    with pytest.raises(TypeError, match="x_fp8"):
        dequantize(x_fp8.float(), scale)
    with pytest.raises(ValueError, match="device"):
        dequantize(x_fp8, scale.to("meta"))
    with pytest.raises(TypeError, match="block"):
        dequantize(x_fp8, scale, 128)


@given(st.data(), dims, dims, st.booleans())
def test_dual_cast_is_rowwise_plus_padded_columnwise(data, t, k, pow2):
    x = data.draw(tensors((t, k)))
    x_fp8, x_scale, xt_fp8, xt_scale = per_token_cast_dual(x, pow2_scale=pow2)
    ref_fp8, ref_scale = per_token_cast(x, pow2_scale=pow2)
    assert torch.equal(x_fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    assert torch.equal(x_scale, ref_scale)
    tp = -(-t // 128) * 128
    assert xt_fp8.shape == (k, tp) and xt_scale.shape == (k, tp // 128)
    padded = torch.cat([x, x.new_zeros(tp - t, k)])
    col_fp8, col_scale = per_token_cast_transposed(padded, pow2_scale=pow2)
    assert torch.equal(xt_fp8.view(torch.uint8), col_fp8.view(torch.uint8))
    assert torch.equal(xt_scale, col_scale)


@given(st.data(), dims, st.integers(1, 200), st.booleans(), st.booleans())
def test_swiglu_cast_is_the_dual_cast_of_silu_gate_times_up(data, t, i, pow2, halves):
    """swiglu_cast(gate, up) casts what a model computes, F.silu(gate) * up in their dtype,
    as per_token_cast_dual casts it, for two tensors or the halves of one; the layouts not
    asked for come back as None."""
    h = data.draw(tensors((t, 2 * i)))
    gate, up = h.chunk(2, dim=-1) if halves else (h[:, :i].contiguous(), h[:, i:].contiguous())
    want = per_token_cast_dual(torch.nn.functional.silu(gate) * up, pow2_scale=pow2)
    got = swiglu_cast(gate, up, pow2_scale=pow2)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) if g.dtype != torch.float32 else \
            torch.equal(g.nan_to_num(-1.0), w.nan_to_num(-1.0))
    assert swiglu_cast(gate, up, colwise=False, pow2_scale=pow2)[2:] == (None, None)
    assert swiglu_cast(gate, up, rowwise=False, pow2_scale=pow2)[:2] == (None, None)


@given(st.data(), dims, st.integers(1, 200), st.booleans(), st.booleans())
def test_swiglu_backward_cast_casts_autograds_gradients(data, t, i, pow2, halves):
    """swiglu_backward_cast(grad, gate, up) casts what autograd computes for F.silu(gate) * up
    in their dtype, d(gate) and d(up), as per_token_cast_dual casts them. Autograd runs on
    the same layout (the halves of one tensor, or two): on the CPU, torch's vectorized and
    strided loops may round float32 silu differently."""
    h = data.draw(tensors((t, 2 * i)))
    grad = data.draw(tensors((t, i))).to(h.dtype)
    if halves:
        leaf = h.clone().requires_grad_()
        g, u = leaf.chunk(2, dim=-1)
    else:
        g, u = h[:, :i].contiguous().requires_grad_(), h[:, i:].contiguous().requires_grad_()
    (torch.nn.functional.silu(g) * u).backward(grad)
    dgate, dup = leaf.grad.chunk(2, dim=-1) if halves else (g.grad, u.grad)
    gate, up = g.detach(), u.detach()
    for got, want in zip(swiglu_backward_cast(grad, gate, up, pow2_scale=pow2),
                         (per_token_cast_dual(dgate.contiguous(), pow2_scale=pow2),
                          per_token_cast_dual(dup.contiguous(), pow2_scale=pow2))):
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype != torch.float32 else \
                torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


def test_swiglu_backward_cast_checks_its_arguments():
    with pytest.raises(ValueError, match=r"grad, gate, up: expected one shape \[T, I\].*grad \(4, 3\)"):
        swiglu_backward_cast(torch.ones(4, 3), torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(TypeError, match="up"):
        swiglu_backward_cast(torch.ones(4, 4), torch.ones(4, 4), torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="pow2_scale"):
        swiglu_backward_cast(torch.ones(4, 4), torch.ones(4, 4), torch.ones(4, 4), pow2_scale=1)


def test_swiglu_cast_checks_its_arguments():
    with pytest.raises(ValueError, match=r"up: expected gate's shape \[T, I\].*got gate \(4, 3\) and up \(4, 2\)"):
        swiglu_cast(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(TypeError, match="colwise"):
        swiglu_cast(torch.ones(4, 4), torch.ones(4, 4), colwise="no")
    with pytest.raises(TypeError, match="up"):
        swiglu_cast(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.bfloat16))


def test_native_casts_only_on_an_sm90_gpu(monkeypatch):
    """Native casts under `auto` fall back to the reference on a GPU they cannot serve (not
    sm_90); the `native` backend there raises instead of failing in the driver; an explicit
    backend argument wins over the process-wide one without changing it."""
    from fp8train import ops
    from fp8train.ops import backend
    from fp8train.quant import casts, native

    x = torch.randn(4, 128)
    monkeypatch.setattr(native, "supports", lambda t: True)
    monkeypatch.setattr(backend, "is_hopper", lambda index: False)
    try:
        ops.set_backend("auto")
        assert casts._use_native(x, None) is False
        with pytest.raises(RuntimeError, match="not an sm_90 GPU"):
            casts._use_native(x, "native")
        assert ops.get_backend() == "auto"
        ops.set_backend("native")
        with pytest.raises(RuntimeError, match="not an sm_90 GPU"):
            casts._use_native(x, None)
        assert casts._use_native(x, "reference") is False
    finally:
        ops.set_backend("auto")


def test_flags_must_be_bools():
    """pow2_scale="yes" or accumulate="no" would otherwise read as True: refused, named."""
    from fp8train import ops
    from fp8train.quant import (per_block_cast_dual, per_block_cast_transposed, per_token_cast_dual,
                                per_token_cast_transposed)

    x = torch.randn(128, 128)
    for cast in (per_token_cast, per_block_cast, per_block_cast_dual, per_block_cast_transposed,
                 per_token_cast_dual, per_token_cast_transposed):
        with pytest.raises(TypeError, match="pow2_scale: expected a bool, got str 'yes'"):
            cast(x, pow2_scale="yes")
    a, b = per_token_cast(x), per_token_cast(x)
    with pytest.raises(TypeError, match="accumulate: expected a bool"):
        ops.fp8_gemm_nt(a, b, torch.zeros(128, 128), accumulate="no")
