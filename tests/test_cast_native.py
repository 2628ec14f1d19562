"""Native FP8 casts are bit-identical to the reference: same e4m3 bytes, same float32 scales
(NaN where the reference has NaN). GPU tests; skipped without a Hopper GPU.

Shapes include partial tiles and row lengths that are not multiples of 16 (the element-wise
fallback of the 16-byte loads/stores); magnitudes 1e-30..1e4, zero rows, outliers (see
strategies.tensors), NaN/Inf; bf16, fp16 and fp32; both scale rules.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import ops
from fp8train.nn.moe_layout import build_moe_layout
from fp8train.quant import native
from fp8train.quant.reference import (
    dual_cast_ref,
    per_block_cast_dual_ref,
    per_token_cast_ref,
    per_token_cast_transposed_ref,
    permute_cast_ref,
    swiglu_backward_cast_ref,
    swiglu_cast_ref,
)
from strategies import tensors

pytestmark = pytest.mark.gpu


# Row lengths: multiples of 16 (vector path) and not (element-wise tail), partial 128-tiles.
LENGTHS = st.one_of(st.integers(1, 40).map(lambda v: 16 * v), st.integers(1, 700))


def assert_same(got, want):
    """Bit-identical outputs: e4m3 by bytes, scales by value with NaN where NaN."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"output {i}: expected None"
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if g.dtype == torch.float8_e4m3fn:
            diff = (g.view(torch.uint8) != w.view(torch.uint8)).nonzero()
            assert diff.numel() == 0, f"output {i}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}"
        else:
            nan = w.isnan()
            assert torch.equal(g.isnan(), nan), f"output {i}: NaN positions differ"
            assert torch.equal(g[~nan], w[~nan]), f"output {i}: scales differ"


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x whose base is not 16-byte aligned (scalar loads)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:]
    return flat.view(x.shape).copy_(x)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 600), LENGTHS, st.booleans(), st.booleans())
def test_dual_cast_bit_exact(data, t, k, pow2, misaligned):
    x = data.draw(tensors((t, k))).cuda()
    if misaligned:
        x = _misaligned(x)
    assert_same(native.dual_cast(x, pow2), dual_cast_ref(x, pow2))


@settings(max_examples=30, deadline=None)
@given(st.data(), st.integers(1, 400), LENGTHS, st.booleans())
def test_dual_cast_one_layout_and_unpadded_transpose(data, t, k, pow2):
    x = data.draw(tensors((t, k))).cuda()
    q, s, _, _ = dual_cast_ref(x, pow2)
    assert_same(native.dual_cast(x, pow2, colwise=False), (q, s, None, None))
    _, _, qt, st_ = native.dual_cast(x, pow2, rowwise=False, pad_columnwise=False)
    assert_same((qt, st_), per_token_cast_transposed_ref(x, pow2))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 600), st.integers(1, 24).map(lambda v: 16 * v), st.booleans(),
       st.sampled_from([(True, True), (True, False), (False, True)]), st.booleans())
def test_swiglu_cast_bit_exact(data, t, i, pow2, layouts, halves):
    """The fused SwiGLU kernel against torch's F.silu(gate) * up on the same GPU, then the
    reference dual cast: the same bytes and scales, for every magnitude, on two tensors and
    on the halves of one (rows 2I apart)."""
    rowwise, colwise = layouts
    h = data.draw(tensors((t, 2 * i))).cuda()
    gate, up = h.chunk(2, dim=-1) if halves else (h[:, :i].contiguous(), h[:, i:].contiguous())
    want = swiglu_cast_ref(gate, up, pow2)
    want = (*(want[:2] if rowwise else (None, None)), *(want[2:] if colwise else (None, None)))
    assert native.swiglu_supports(gate, up)
    assert_same(native.swiglu_dual_cast(gate, up, pow2, rowwise, colwise), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_cast_extreme_gates_match_torch(dtype):
    """Gates where silu's exp overflows, underflows or meets NaN/Inf: torch's values."""
    gates = torch.tensor([-1e4, -100.0, -88.8, -20.0, -0.0, 0.0, 1e-30, 20.0, 100.0, 1e4,
                          float("inf"), float("-inf"), float("nan")])
    gate, up = torch.ones(128, 128, dtype=dtype), torch.ones(128, 128, dtype=dtype)
    gate[: gates.numel(), 0] = gates.to(dtype)
    up[1, 0] = -3.0
    gate, up = gate.cuda(), up.cuda()
    assert_same(native.swiglu_dual_cast(gate, up, False), swiglu_cast_ref(gate, up, False))


def _flat(pairs):
    return tuple(t for pair in pairs for t in pair)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 600), st.integers(1, 24).map(lambda v: 16 * v), st.booleans(), st.booleans())
def test_swiglu_backward_cast_bit_exact(data, t, i, pow2, halves):
    """The fused SwiGLU-backward kernel against autograd's gradients of F.silu(gate) * up,
    torch's CUDA ops on the same GPU, then the reference dual casts: the same bytes and
    scales for d(gate) and d(up), for every magnitude, on two tensors and on halves of one."""
    h = data.draw(tensors((t, 2 * i))).cuda()
    grad = data.draw(tensors((t, i))).cuda().to(h.dtype)
    gate, up = h.chunk(2, dim=-1) if halves else (h[:, :i].contiguous(), h[:, i:].contiguous())
    assert native.swiglu_supports(gate, up) and native.swiglu_supports(grad, grad)
    assert_same(_flat(native.swiglu_backward_dual_cast(grad, gate, up, pow2)),
                swiglu_backward_cast_ref(grad, gate, up, pow2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_backward_cast_extreme_gates_match_torch(dtype):
    """Gates where silu's exp overflows, underflows or meets NaN/Inf, and gradients of every
    sign: autograd's values, cast."""
    gates = torch.tensor([-1e4, -100.0, -88.8, -20.0, -0.0, 0.0, 1e-30, 20.0, 100.0, 1e4,
                          float("inf"), float("-inf"), float("nan")])
    gate, up = torch.ones(128, 128, dtype=dtype), torch.ones(128, 128, dtype=dtype)
    grad = torch.full((128, 128), -0.5, dtype=dtype)
    gate[: gates.numel(), 0] = gates.to(dtype)
    up[1, 0], grad[2, 0] = -3.0, 7.0
    gate, up, grad = gate.cuda(), up.cuda(), grad.cuda()
    assert_same(_flat(native.swiglu_backward_dual_cast(grad, gate, up, False)),
                swiglu_backward_cast_ref(grad, gate, up, False))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.tuples(st.integers(1, 300)) | st.tuples(st.integers(1, 40), st.integers(1, 6))
       | st.tuples(st.integers(1, 8), st.integers(1, 6), st.integers(1, 6)), LENGTHS, st.booleans())
def test_per_token_cast_bit_exact(data, lead, k, pow2):
    x = data.draw(tensors((*lead, k))).cuda()
    assert_same(native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2))


@settings(max_examples=50, deadline=None)
@given(st.data(), st.integers(0, 3), st.integers(1, 400), LENGTHS, st.booleans(),
       st.sampled_from([(True, True), (True, False), (False, True)]))
def test_block_cast_bit_exact(data, experts, n, k, pow2, pairs):
    plain, transposed = pairs
    shape = (n, k) if experts == 0 else (experts, n, k)
    w = data.draw(tensors(shape)).cuda()
    want = per_block_cast_dual_ref(w, pow2)
    want = (*(want[:2] if plain else (None, None)), *(want[2:] if transposed else (None, None)))
    assert_same(native.block_cast(w, pow2, plain=plain, transposed=transposed), want)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 300), LENGTHS, st.integers(1, 8), st.integers(1, 3),
       st.booleans(), st.booleans())
def test_permuted_cast_bit_exact(data, tokens, k, experts, top_k, pow2, colwise):
    x = data.draw(tensors((tokens, k))).cuda()
    seed = data.draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(seed))
    layout = build_moe_layout(ids.cuda(), experts)
    src = layout.src_tokens
    if colwise:
        got = native.dual_cast(x, pow2, src_rows=src, num_rows=src.shape[0])
    else:
        got = native.per_token_cast(x, pow2, src_rows=src, num_rows=src.shape[0])
    assert_same(got, permute_cast_ref(x, src, pow2, colwise))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_match_reference(dtype, bad):
    x = torch.randn(256, 384, device="cuda").to(dtype)
    x[3, 200] = bad
    x[130, 5] = bad
    for pow2 in (False, True):
        assert_same(native.dual_cast(x, pow2), dual_cast_ref(x, pow2))
        assert_same(native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2))
        assert_same(native.block_cast(x, pow2), per_block_cast_dual_ref(x, pow2))


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-40, 448.0, 1e30, 3e-20, 4e-16, 5e20])
def test_magnitude_edges_match_reference(value):
    """All-zero (and -0) groups, subnormal fp32 inputs, and scales on both sides of the fast
    division's range (2^-60..2^60, cast_common.cuh): the scale clamp, the pow2 bump and the
    division fallback on their edges. One constant row per tile keeps amax exactly `value`."""
    x = (torch.rand(130, 272, device="cuda") * 2 - 1) * value
    x[0] = value
    for pow2 in (False, True):
        assert_same(native.dual_cast(x, pow2), dual_cast_ref(x, pow2))
        assert_same(native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2))
        assert_same(native.block_cast(x, pow2), per_block_cast_dual_ref(x, pow2))


def test_native_backend_routes_the_public_casts():
    from fp8train import quant

    x = torch.randn(200, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 384, 256, device="cuda", dtype=torch.bfloat16)
    layout = build_moe_layout(torch.randint(0, 4, (200, 2), device="cuda"), 4)
    ops.set_backend("native")
    try:
        got = {
            "dual": quant.per_token_cast_dual(x),
            "rowwise": quant.per_token_cast(x),
            "transposed": quant.per_token_cast_transposed(x),
            "block": quant.per_block_cast(w),
            "block_dual": quant.per_block_cast_dual(w),
            "block_transposed": quant.per_block_cast_transposed(w),
            "permuted": quant.per_token_cast_permuted(x, layout.src_tokens, colwise=True),
        }
    finally:
        ops.set_backend("auto")
    assert_same(got["dual"], dual_cast_ref(x))
    assert_same(got["rowwise"], per_token_cast_ref(x))
    assert_same(got["transposed"], per_token_cast_transposed_ref(x))
    assert_same(got["block"], per_block_cast_dual_ref(w)[:2])
    assert_same(got["block_dual"], per_block_cast_dual_ref(w))
    assert_same(got["block_transposed"], per_block_cast_dual_ref(w)[2:])
    assert_same(got["permuted"], permute_cast_ref(x, layout.src_tokens, colwise=True))


def test_reference_scales_are_device_independent():
    """The GPU reference and the CPU reference agree (formats divides by a device tensor, an
    IEEE division on both), so bit-exact against one is bit-exact against both."""
    x = torch.randn(512, 1024) * 37.0
    for pow2 in (False, True):
        assert_same(dual_cast_ref(x.cuda(), pow2), [t.cuda() for t in dual_cast_ref(x, pow2)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unaligned_bases_for_per_token_and_weight_casts(dtype):
    """The per-token and 128x128 weight casts on inputs whose base is not 16-byte aligned
    (their element-wise fallbacks), next to the dual cast's hypothesis case."""
    x = _misaligned(torch.randn(300, 520, device="cuda", dtype=dtype))
    for pow2 in (False, True):
        assert_same(native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2))
        assert_same(native.block_cast(x, pow2), per_block_cast_dual_ref(x, pow2))


def test_subnormal_quotients_keep_their_sign():
    """A group whose amax is huge next to a tiny negative element: the quotient is subnormal
    in float32 and must round to the same (negative zero) byte as the reference."""
    x = torch.randn(130, 272, device="cuda")
    x[0, 0], x[0, 1], x[5, 3] = 1e30, -1e-40, -1e-38
    x[9, 0], x[9, 1] = -3e25, 2e-41
    for pow2 in (False, True):
        assert_same(native.dual_cast(x, pow2), dual_cast_ref(x, pow2))
        assert_same(native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2))
        assert_same(native.block_cast(x, pow2), per_block_cast_dual_ref(x, pow2))


def test_offsets_past_two_to_the_31_bytes():
    """An fp32 input of 2.15e9 bytes: byte offsets past 2^31 in every kernel's indexing."""
    x = torch.randn(65600, 8208, device="cuda")
    assert_same(native.per_token_cast(x, False), per_token_cast_ref(x, False))
    assert_same(native.dual_cast(x, False), dual_cast_ref(x, False))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 600), LENGTHS, st.booleans(), st.sampled_from(["per_token", "dual", "permuted"]))
def test_k_block_major_row_scales(data, t, k, pow2, kind):
    """The kernels write the row-wise scales K-block-major: same bits as the reference, in
    the layout the GEMMs read."""
    x = data.draw(tensors((t, k))).cuda()
    if kind == "per_token":
        got, want = native.per_token_cast(x, pow2), per_token_cast_ref(x, pow2)
    elif kind == "dual":
        got, want = native.dual_cast(x, pow2), dual_cast_ref(x, pow2)
    else:
        src = torch.randint(0, t + 1, (t + 37,), device="cuda")
        got = native.dual_cast(x, pow2, src_rows=src, num_rows=src.shape[0])
        want = permute_cast_ref(x, src, pow2, colwise=True)
    assert_same(got, want)
    scale = got[1]
    rows, kb = scale.shape
    if rows > 1:
        assert scale.stride(0) == 1, scale.stride()
    if kb > 1:
        assert scale.stride(1) == max(4, -(-rows // 4) * 4), scale.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_more_tiles_than_resident_blocks(dtype):
    """Several waves of blocks, a partial last row of tiles, a K that is not a multiple of
    128, and a gathered layout with zero rows, in 2-byte types (the hypothesis shapes are a
    few tiles)."""
    x = torch.randn(9000, 4000, device="cuda").to(dtype)
    x[17, :5] = 3e4
    for pow2 in (False, True):
        assert_same(native.dual_cast(x, pow2), dual_cast_ref(x, pow2))
    src = torch.randint(0, 9100, (12345,), device="cuda")
    got = native.dual_cast(x, False, src_rows=src, num_rows=src.shape[0])
    assert_same(got, permute_cast_ref(x, src, False, colwise=True))
