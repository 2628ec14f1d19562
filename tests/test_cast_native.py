"""Native FP8 casts are bit-identical to the reference (GPU tests; skipped without one)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import ops
from fp8train.quant import native
from fp8train.quant.reference import dual_cast_ref
from strategies import tensors

pytestmark = pytest.mark.gpu


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 600), st.integers(1, 80).map(lambda v: 8 * v), st.booleans())
def test_dual_cast_bit_exact(data, t, k, pow2):
    x = data.draw(tensors((t, k))).cuda()
    got = native.dual_cast(x, pow2)
    want = dual_cast_ref(x, pow2)
    for g, w in zip(got, want):
        if g.dtype == torch.float8_e4m3fn:
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))
        else:
            assert torch.equal(g, w) or (torch.isnan(g) == torch.isnan(w)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dual_cast_non_finite_matches_reference(bad):
    x = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    x[3, 200] = bad
    for g, w in zip(native.dual_cast(x, False), dual_cast_ref(x, False)):
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g.isnan(),
                           w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w.isnan())


def test_native_backend_routes_the_public_dual_cast():
    from fp8train.quant import per_token_cast_dual

    x = torch.randn(200, 256, device="cuda")
    ops.set_backend("native")
    try:
        got = per_token_cast_dual(x)
    finally:
        ops.set_backend("auto")
    for g, w in zip(got, dual_cast_ref(x)):
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w)
