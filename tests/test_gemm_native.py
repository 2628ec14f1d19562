"""Native sm_90a GEMMs against the reference emulation (GPU tests; skipped without one)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.ops.native.gemm_config import GemmConfig
from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native
from fp8train.quant import per_block_cast, per_token_cast
from numerics import rel_err_of_output as rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("native_backend")]


def run_case(m, n, k, kind, accumulate=False, seed=0, scale=1.0, out_dtype=None, config=None):
    """The GEMM against the reference, every element written: through the public op, or with
    ``config`` the native kernel of that forced config."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen) * scale
    w = torch.randn(n, k, device="cuda", generator=gen)
    a = per_token_cast(x)
    b = per_block_cast(w) if kind == "1d2d" else per_token_cast(w)
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    out_dtype = out_dtype or (torch.bfloat16 if kind == "1d2d" else torch.float32)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    if accumulate:
        out = torch.randn(m, n, device="cuda", generator=gen)
        expect = out + expect
    if config is None:
        ops.fp8_gemm_nt(a, b, out, accumulate=accumulate)
    else:
        fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, kind, accumulate, config)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten or NaN output elements"
    limit = 4e-3 if out_dtype == torch.bfloat16 else 1e-3
    assert rel_err(out, expect) < limit


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (4000, 2112, 7168), (128, 4096, 512),
                                   (1, 8, 128), (300, 136, 256), (4096, 7168, 2048)])
def test_1d2d_fixed_shapes(m, n, k):
    run_case(m, n, k, "1d2d")


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (2100, 768, 1024), (300, 136, 256)])
def test_1d2d_float32_output(m, n, k):
    """FP32 models without autocast: the 1D2D kernel stores FP32 from registers."""
    run_case(m, n, k, "1d2d", out_dtype=torch.float32)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,n,k", [(7168, 2048, 1024), (200, 264, 384), (64, 128, 128)])
def test_1d1d_fixed_shapes(m, n, k, accumulate):
    run_case(m, n, k, "1d1d", accumulate)


@pytest.mark.parametrize("kind", ["1d2d", "1d1d"])
@pytest.mark.parametrize("cluster,shares", [(1, "a"), (2, "a"), (2, "b")])
def test_forced_configs_with_odd_blocks(kind, cluster, shares):
    """A cluster of two on an odd number of column blocks (sharing A) or row blocks (sharing
    B): the last CTA computes on zero-filled operands and stores nothing; a partial last row
    block."""
    # 7 row blocks (last partial) x 9 column blocks of 128
    run_case(800, 1152, 1024, kind, seed=cluster,
             config=GemmConfig(128, 128, 4, 18, 8, kind, cluster, shares=shares))


@pytest.mark.parametrize("m,n,k,block_n,cluster,shares,out_dtype", [
    (1000, 1152, 1024, 128, 1, "a", torch.bfloat16),  # partial last row block, both waves
    (1000, 1152, 1024, 128, 2, "a", torch.bfloat16),  # A multicast in halves of 256 rows, odd column blocks
    (700, 1152, 1024, 128, 2, "b", torch.bfloat16),   # B multicast, odd row blocks
    (4096, 2112, 7168, 112, 1, "a", torch.bfloat16),  # tiles straddling 128x128 scale blocks
    (300, 136, 256, 96, 1, "a", torch.bfloat16),      # the second wave entirely past M
    (200, 520, 384, 120, 1, "a", torch.bfloat16),     # the second wave partly past M, unswizzled tile
    (1000, 1152, 1024, 128, 1, "a", torch.float32),   # FP32 stored from registers
])
def test_256_row_tiles(m, n, k, block_n, cluster, shares, out_dtype):
    # Four CTAs (two clusters): each walks several tiles, so the stage ring and its phase
    # carry from tile to tile.
    run_case(m, n, k, "1d2d", out_dtype=out_dtype,
             config=GemmConfig(256, block_n, 3, 4, 8, "1d2d", cluster, shares=shares))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 1100), st.integers(1, 80).map(lambda v: 8 * v), st.integers(1, 6),
       st.sampled_from([64, 96, 112, 128]), st.integers(0, 2**31))
def test_256_row_tiles_random_shapes(m, n, kb, block_n, seed):
    run_case(m, n, 128 * kb, "1d2d", seed=seed, config=GemmConfig(256, block_n, 3, 132, 8, "1d2d"))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,n,k,block_n", [
    (1000, 1152, 1024, 128),  # partial last row block, both waves; each CTA walks several tiles
    (300, 136, 640, 96),      # the second wave entirely past M; K of 5 blocks (a partial scale box)
    (200, 520, 384, 120),     # the second wave partly past M
])
def test_1d1d_256_row_tiles(m, n, k, block_n, accumulate):
    """wgrad tiles of 256 rows: B's 1x128 scales read from the stage by each wave as it
    promotes, the stage released after the second wave."""
    run_case(m, n, k, "1d1d", accumulate, config=GemmConfig(256, block_n, 4, 4, 8, "1d1d"))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 1100), st.integers(1, 80).map(lambda v: 8 * v), st.integers(1, 9),
       st.sampled_from([64, 96, 128]), st.booleans(), st.integers(0, 2**31))
def test_1d1d_256_row_tiles_random_shapes(m, n, kb, block_n, accumulate, seed):
    run_case(m, n, 128 * kb, "1d1d", accumulate, seed=seed, config=GemmConfig(256, block_n, 4, 132, 8, "1d1d"))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 700), st.integers(1, 64).map(lambda v: 8 * v), st.integers(1, 6),
       st.sampled_from(["1d2d", "1d1d"]), st.booleans(), st.integers(0, 2**31),
       st.sampled_from([1e-20, 1.0, 1e4]))
def test_random_shapes(m, n, kb, kind, accumulate, seed, scale):
    run_case(m, n, 128 * kb, kind, accumulate and kind == "1d1d", seed, scale)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 17, 64, 100, 128]), st.integers(1, 40).map(lambda v: 8 * v),
       st.integers(2, 24), st.integers(2, 8), st.sampled_from([64, 128, 136]), st.integers(0, 2**31))
def test_split_k_matches_reference_and_is_deterministic(m, n, kb, split_k, block_n, seed):
    """Forced split-K configs, K blocks not dividing evenly among the slices, partial tiles;
    three launches give the same bits (the counters reset, slices add in a fixed order)."""
    split_k = min(split_k, kb)
    block_m = 64 if m <= 64 else 128
    cfg = GemmConfig(block_m, block_n, 4, 132, 1, "1d2d", 1, split_k)
    k = 128 * kb
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = per_token_cast(torch.randn(m, k, device="cuda", generator=gen))
    b = per_block_cast(torch.randn(n, k, device="cuda", generator=gen))
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    outs = []
    for _ in range(3):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False, cfg)
        outs.append(out)
    torch.cuda.synchronize()
    assert not torch.isnan(outs[0]).any(), "unwritten or NaN output elements"
    assert rel_err(outs[0], expect) < 4e-3
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "split-K results differ between launches"


def test_split_k_heuristic_shapes():
    """The configs the heuristic picks (split-K), on the bench's small-M shapes."""
    from fp8train.ops.native import gemm_config

    for m, n, k in [(64, 2112, 7168), (128, 2112, 7168), (64, 4096, 7168), (32, 1024, 7168)]:
        assert gemm_config.choose_config(m, n, k, 132).split_k > 1
        run_case(m, n, k, "1d2d")


def test_zero_rows_launch_nothing():
    a = per_token_cast(torch.randn(0, 256, device="cuda"))
    b = per_block_cast(torch.randn(64, 256, device="cuda"))
    assert ops.fp8_gemm_nt(a, b).shape == (0, 64)


def test_split_k_in_a_cuda_graph_then_eager():
    """Split-K captured in a graph (its counters are the graph's own) replays correctly,
    and eager calls on the same stream afterwards still start from zeroed counters."""
    from fp8train.ops.native import gemm_config

    m, n, k = 64, 2112, 7168
    assert gemm_config.choose_config(m, n, k, 132).split_k > 1
    gen = torch.Generator(device="cuda").manual_seed(3)
    a = per_token_cast(torch.randn(m, k, device="cuda", generator=gen))
    b = per_block_cast(torch.randn(n, k, device="cuda", generator=gen))
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        ops.fp8_gemm_nt(a, b, out)  # warm-up outside the capture: compile, module load
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            ops.fp8_gemm_nt(a, b, out)
        for _ in range(2):
            out.fill_(float("nan"))
            graph.replay()
            stream.synchronize()
            assert rel_err(out, expect) < 4e-3
        eager = ops.fp8_gemm_nt(a, b)
        stream.synchronize()
    assert torch.equal(eager, out)
