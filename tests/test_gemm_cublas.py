"""The cuBLAS blockwise path (torch._scaled_mm) against the reference (GPU tests).

Passing on the device is what lets `auto` prefer cuBLAS (ops/backend.py).
"""
import pytest
import torch

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.quant import per_block_cast, per_token_cast
from numerics import rel_err_of_output as rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cublas_backend():
    ops.set_backend("cublas")
    yield
    ops.set_backend("auto")


@pytest.mark.parametrize("kind", ["1d2d", "1d1d"])
@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (4000, 2112, 7168), (128, 4096, 512),
                                   (256, 136 * 2, 512), (7168, 2048, 1024)])
def test_cublas_matches_reference(kind, m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    a = per_token_cast(torch.randn(m, k, device="cuda", generator=gen))
    w = torch.randn(n, k, device="cuda", generator=gen)
    b = per_block_cast(w) if kind == "1d2d" else per_token_cast(w)
    out_dtype = torch.bfloat16 if kind == "1d2d" else torch.float32
    got = ops.fp8_gemm_nt(a, b, out_dtype=out_dtype)
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    assert got.dtype == out_dtype and not torch.isnan(got).any()
    assert rel_err(got, expect) < (4e-3 if kind == "1d2d" else 1e-3)


@pytest.mark.parametrize("m,n,k", [(256, 272, 384), (256, 256, 256), (256, 272, 512), (256, 384, 384),
                                   (128, 136, 256), (256, 2112, 1024),
                                   # square with K/128 % 4 == 0, K/128 = 6 (the `small` recipe), M % 4
                                   (256, 512, 512), (256, 3584, 768), (256, 768, 3584), (250, 2112, 1024)])
def test_cublas_supports_exactly_the_shapes_it_gets_right(m, n, k):
    """`supports` refuses what the cuBLAS wrapper gets wrong or cannot run, and nothing else.
    H100, torch 2.11: wrong wherever K/128 or M is not a multiple of 4 (square
    or not: 256x3584x768 wrong, 256x512x512 right); N % 16 != 0 is refused by torch."""
    from fp8train.ops import cublas

    gen = torch.Generator(device="cuda").manual_seed(k + n)
    a = per_token_cast(torch.randn(m, k, device="cuda", generator=gen))
    b = per_block_cast(torch.randn(n, k, device="cuda", generator=gen))
    try:
        got = cublas.fp8_gemm_nt_cublas(a[0], a[1], b[0], b[1], torch.bfloat16)
    except RuntimeError:  # torch's own shape rules (e.g. N % 16)
        right = False
    else:
        right = bool(rel_err(got, ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])) < 4e-3)
    assert right == cublas.supports(a[0], n, torch.bfloat16, False), \
        f"cuBLAS {'right' if right else 'wrong'} at {m}x{n}x{k}"
