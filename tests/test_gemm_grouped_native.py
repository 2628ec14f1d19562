"""Native grouped (MoE) GEMMs against the reference emulation (GPU tests; skipped without
one): m-grouped contiguous and masked (fprop/dgrad), k-grouped contiguous (wgrad). Every
case also checks what must stay untouched, and that no call syncs with the host."""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.ops.native.gemm_config import GemmConfig
from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native, k_grouped_native, m_grouped_masked_native
from fp8train.quant import per_block_cast, per_token_cast
from numerics import rel_err_of_output as rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("native_backend")]




@contextlib.contextmanager
def no_host_sync():
    """Raise if anything inside syncs the device with the host (e.g. reads offsets)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def offsets_of(blocks, block_rows=128):
    return torch.tensor([0] + torch.tensor(blocks).mul(block_rows).cumsum(0).tolist(), dtype=torch.int32,
                        device="cuda")


def check_contiguous(blocks, block_rows, n, kb, spare, seed, run):
    """Experts of `blocks[g]` x `block_rows` rows (at least one row somewhere) and `spare`
    128-row blocks past the last expert (zeros out); `run(a, b, offsets, out)` against the
    reference, without a host sync."""
    if sum(blocks) == 0:
        blocks[0] = 1
    g, k = len(blocks), 128 * kb
    offsets = offsets_of(blocks, block_rows)
    m = int(offsets[-1]) + 128 * spare
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = per_token_cast(torch.randn(m, k, device="cuda", generator=gen))
    b = per_block_cast(torch.randn(g, n, k, device="cuda", generator=gen))
    expect = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ref.m_grouped_contiguous_ref(a[0], a[1], b[0], b[1], offsets.tolist(), expect)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    with no_host_sync():
        run(a, b, offsets, out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten or NaN output elements"
    assert rel_err(out, expect) < 4e-3


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=8), st.integers(1, 48).map(lambda v: 8 * v),
       st.integers(1, 4), st.integers(0, 2), st.integers(0, 2**31))
def test_m_grouped_contiguous_matches_reference(blocks, n, kb, spare, seed):
    """Experts with 0..4 row blocks of 128 (empty experts included), and 0..2 spare row
    blocks past the last expert."""
    check_contiguous(blocks, 128, n, kb, spare, seed,
                     lambda a, b, offsets, out: ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, out))


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=6), st.integers(1, 48).map(lambda v: 8 * v),
       st.integers(1, 4), st.integers(0, 2), st.booleans(), st.integers(0, 2**31))
def test_m_grouped_contiguous_256_row_segments(blocks, n, kb, spare, forced, seed):
    """Segments of 0..3 x 256 rows with segment_rows=256: through the public op (the
    heuristic may take 256-row tiles) or a forced 256x128 config; spare rows past the last
    expert are a multiple of 128 only."""
    def run(a, b, offsets, out):
        if forced:
            fp8_gemm_nt_native(a[0], a[1], b[0], b[1].contiguous(), out, "1d2d", False,
                               GemmConfig(256, 128, 3, 132, 8, "1d2d"), group_offsets=offsets, segment_rows=256)
        else:
            ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, out, segment_rows=256)

    check_contiguous(blocks, 256, n, kb, spare, seed, run)


def masked_case(g, m_max, n, k, counts, seed, expected_m=None, config=None):
    """Through the public op, or with ``config`` the native kernel of that forced config."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = per_token_cast(torch.randn(g, m_max, k, device="cuda", generator=gen))
    b = per_block_cast(torch.randn(g, n, k, device="cuda", generator=gen))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    expect = torch.full((g, m_max, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    ref.m_grouped_masked_ref(a[0], a[1], b[0], b[1], counts, expect)
    out = torch.full((g, m_max, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    with no_host_sync():
        if config is None:
            ops.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, out, expected_m=expected_m)
        else:
            m_grouped_masked_native(a[0], a[1], b[0], b[1], masked_m, out, expected_m or m_max, config)
    torch.cuda.synchronize()
    return a, b, masked_m, out, expect


def check_masked(out, expect, counts):
    for gi, rows in enumerate(counts):
        assert out[gi, rows:].isnan().all(), f"expert {gi}: rows past masked_m = {rows} were written"
        if rows:
            assert not out[gi, :rows].isnan().any(), f"expert {gi}: unwritten rows"
            assert rel_err(out[gi, :rows], expect[gi, :rows]) < 4e-3


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.integers(1, 40).map(lambda v: 8 * v),
       st.integers(1, 4), st.data(), st.sampled_from([None, 32, 64, 128, 256]), st.integers(0, 2**31))
def test_m_grouped_masked_matches_reference(g, m_max, n, kb, data, expected_m, seed):
    """Any valid counts (0 and M_max included), M_max not a multiple of the tile, every hint."""
    counts = data.draw(st.lists(st.integers(0, m_max), min_size=g, max_size=g))
    _, _, _, out, expect = masked_case(g, m_max, n, 128 * kb, counts, seed, expected_m)
    check_masked(out, expect, counts)


@pytest.mark.parametrize("m_max", [128, 129, 130, 131, 257])
def test_m_grouped_masked_reads_k_block_major_scales_at_any_m_max(m_max):
    """Experts' scales start 16-byte aligned: in place where M_max is a multiple of 4, from a
    padded copy otherwise; partial last tiles and empty experts included."""
    counts = [m_max, 0, m_max - 1, 1]
    _, _, _, out, expect = masked_case(4, m_max, 264, 512, counts, seed=m_max, expected_m=128)
    check_masked(out, expect, counts)


@pytest.mark.parametrize("m_max,counts", [(512, [512, 0, 300, 256, 1]), (300, [300, 257, 255, 0, 44])])
def test_m_grouped_masked_256_row_tiles(m_max, counts):
    """256-row tiles: full tiles by TMA store, an expert's partial last tile (one wave or
    both) from registers; a tile that reads into the next expert's rows stores none of them."""
    cfg = GemmConfig(256, 128, 3, 132, 8, "1d2d")
    _, _, _, out, expect = masked_case(len(counts), m_max, 520, 640, counts, seed=m_max, config=cfg)
    check_masked(out, expect, counts)


def test_m_grouped_masked_replays_in_a_cuda_graph_with_new_counts():
    """Counts live on the device: a captured call serves whatever counts the replay finds."""
    g, m_max, n, k = 4, 256, 512, 512
    a, b, masked_m, out, _ = masked_case(g, m_max, n, k, [256, 0, 17, 130], seed=1, expected_m=128)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, out, expected_m=128)  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            ops.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, out, expected_m=128)
    for counts in ([0, 256, 200, 1], [64, 64, 64, 64]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = torch.full_like(out, float("nan"))
        ref.m_grouped_masked_ref(a[0], a[1], b[0], b[1], counts, expect)
        check_masked(out, expect, counts)


def k_grouped_case(blocks, m, n, accumulate, seed, spare=0, config=None):
    offsets = offsets_of(blocks)
    t = int(offsets[-1]) + 128 * spare  # spare tokens past the last expert are left out
    g = len(blocks)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = per_token_cast(torch.randn(m, t, device="cuda", generator=gen))
    b = per_token_cast(torch.randn(n, t, device="cuda", generator=gen))
    out = (torch.randn(g, m, n, device="cuda", generator=gen) if accumulate
           else torch.full((g, m, n), float("nan"), device="cuda"))
    expect = out.clone()
    ref.k_grouped_contiguous_ref(a[0], a[1], b[0], b[1], offsets.tolist(), expect, accumulate)
    with no_host_sync():
        if config is None:
            ops.k_grouped_fp8_gemm_nt_contiguous(a, b, offsets, out, accumulate=accumulate)
        else:
            k_grouped_native(a[0], a[1], b[0], b[1], offsets, out, accumulate, config)
    torch.cuda.synchronize()
    return out, expect


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(1, 300),
       st.integers(1, 40).map(lambda v: 8 * v), st.booleans(), st.integers(0, 1), st.integers(0, 2**31))
def test_k_grouped_matches_reference(blocks, m, n, accumulate, spare, seed):
    """Experts with 0..3 token blocks: an empty one is zeros, or left exactly alone when
    accumulating."""
    if sum(blocks) == 0:
        blocks[0] = 1
    out, expect = k_grouped_case(blocks, m, n, accumulate, seed, spare)
    assert not out.isnan().any(), "unwritten or NaN output elements"
    for gi, nb in enumerate(blocks):
        if nb == 0:
            assert torch.equal(out[gi], expect[gi]), f"empty expert {gi} was not zeros / left alone"
        else:
            assert rel_err(out[gi], expect[gi]) < 1e-3


@pytest.mark.parametrize("accumulate", [False, True])
def test_k_grouped_256_row_tiles(accumulate):
    """wgrad tiles of 256 rows over each expert's tokens; an empty expert and a partial last
    row block (the second wave partly past M)."""
    blocks = [2, 0, 3, 1]
    out, expect = k_grouped_case(blocks, 700, 264, accumulate, seed=3,
                                 config=GemmConfig(256, 128, 4, 132, 8, "1d1d"))
    for gi, nb in enumerate(blocks):
        if nb == 0:
            assert torch.equal(out[gi], expect[gi]), f"empty expert {gi} was not zeros / left alone"
        else:
            assert rel_err(out[gi], expect[gi]) < 1e-3


@pytest.mark.parametrize("g,tokens,m,n", [(8, 1024, 4096, 7168), (4, 2048, 7168, 2048)])
def test_k_grouped_issue_shapes(g, tokens, m, n):
    out, expect = k_grouped_case([tokens // 128] * g, m, n, False, 0)
    assert rel_err(out, expect) < 1e-3


def test_empty_problems_launch_nothing():
    """No tokens at all: outputs are empty, zeros (wgrad) or left alone (accumulating)."""
    k = 256
    a = per_token_cast(torch.randn(0, k, device="cuda"))
    b = per_block_cast(torch.randn(3, 64, k, device="cuda"))
    offsets = torch.zeros(4, dtype=torch.int32, device="cuda")
    assert ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets).shape == (0, 64)
    masked = per_token_cast(torch.randn(3, 0, k, device="cuda"))
    assert ops.m_grouped_fp8_gemm_nt_masked(masked, b, torch.zeros(3, dtype=torch.int32, device="cuda")).shape == \
        (3, 0, 64)
    no_tokens = [(torch.empty(rows, 0, device="cuda", dtype=torch.float8_e4m3fn),
                  torch.empty(rows, 0, device="cuda")) for rows in (64, 128)]
    dy, x = no_tokens
    out = torch.full((3, 64, 128), float("nan"), device="cuda")
    assert torch.equal(ops.k_grouped_fp8_gemm_nt_contiguous(dy, x, offsets, out), torch.zeros_like(out))
    kept = torch.ones(3, 64, 128, device="cuda")
    ops.k_grouped_fp8_gemm_nt_contiguous(dy, x, offsets, kept, accumulate=True)
    assert torch.equal(kept, torch.ones_like(kept))
