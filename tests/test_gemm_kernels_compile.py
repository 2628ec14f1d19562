"""Every kernel config the heuristic picks for the benchmark shapes compiles for sm_90a,
stays on the FP8 tensor-core path (QGMMA in the SASS) and never spills to local memory.
Needs nvcc and cuobjdump/nvdisasm (the test extra installs the latter); no GPU."""
import concurrent.futures

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.kernel_list import NUM_SMS, bench_kernels
from fp8train.ops.jit.sass import check_sass
from fp8train.ops.jit.toolkit import find_cuda_tool, nvcc_path
from fp8train.ops.native.gemm_config import (SMEM_LIMIT, GemmConfig, ceil_div, choose_config, raster_group_n,
                                             shared_bytes)
from fp8train.ops.native.sm90_fp8_gemm import compile_kernel
from fp8train.quant import per_block_cast, per_token_cast



def _have(tool_lookup) -> bool:
    try:
        return bool(tool_lookup())
    except RuntimeError:
        return False


needs_toolchain = pytest.mark.skipif(
    not (_have(nvcc_path) and find_cuda_tool("cuobjdump") and find_cuda_tool("nvdisasm")),
    reason="needs nvcc, cuobjdump and nvdisasm")


def test_heuristic_choices_are_legal():
    for m in (1, 64, 65, 128, 129, 4000, 4096, 16384):
        for n in (8, 136, 2112, 4096, 7168, 32768):
            for k in (128, 512, 7168):
                for kind in ("1d2d", "1d1d"):
                    cfg = choose_config(m, n, k, NUM_SMS, kind)
                    assert shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, kind) <= SMEM_LIMIT
                    assert 1 <= cfg.num_ctas <= NUM_SMS
                    assert cfg.block_n <= max(n, 16)


def test_dense_gemms_take_256_row_tiles_where_they_fill_the_gpu():
    """Large dense 1D2D GEMMs take 256-row tiles (measured 1.06-1.25x per wave); wgrad (1D1D)
    takes 256x128, and no narrower 256-row tile, only where it needs fewer waves than the
    best 128-row tile (per wave they measured alike); small M and problems with fewer tall
    tiles than SMs keep 128 rows or fewer."""
    assert choose_config(4096, 4096, 7168, NUM_SMS).block_m == 256
    assert choose_config(16384, 7168, 2048, NUM_SMS).block_m == 256
    assert choose_config(512, 4096, 4096, NUM_SMS).block_m == 128
    assert choose_config(128, 4096, 7168, NUM_SMS).block_m <= 128
    wgrad = [choose_config(m, n, k, NUM_SMS, "1d1d") for m, n, k in
             ((4096, 4096, 32768), (2048, 2048, 8192), (7168, 2048, 16384), (4096, 14336, 16384))]
    assert [(c.block_m, c.block_n) for c in wgrad] == [(256, 128), (256, 128), (128, 152), (128, 176)]
    for m in (256, 512, 3072, 8192):
        for n in (512, 2048, 3072, 4096):
            cfg = choose_config(m, n, 4096, NUM_SMS, "1d1d")
            assert cfg.block_m == 128 or cfg.block_n == 128, cfg
    for block_n in range(8, 129, 8):
        GemmConfig(256, block_n, 3, NUM_SMS, 8, "1d2d")  # every BLOCK_N up to 128 fits
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig(256, 136, 3, NUM_SMS, 8, "1d2d")
    with pytest.raises(ValueError, match="256-row tiles"):
        GemmConfig(256, 128, 3, NUM_SMS, 8, "1d2d", split_k=2)
    GemmConfig(256, 128, 4, NUM_SMS, 8, "1d1d")  # wgrad tiles of 256 rows


def _first_wave_rows_read(m_blocks, n_blocks, block_m, block_n, num_ctas, cluster, shares, width):
    """Distinct operand rows the first wave reads under the walk of scheduler.cuh's
    Rasterizer::coords, replayed tile by tile (every CTA of a cluster)."""
    n_per_unit, m_per_unit = (cluster, 1) if shares == "a" else (1, cluster)
    n_units, m_units = ceil_div(n_blocks, n_per_unit), ceil_div(m_blocks, m_per_unit)
    rows, cols = set(), set()
    for tile in range(min(num_ctas // cluster, m_units * n_units)):
        group, in_group = divmod(tile, width * m_units)
        group_width = min(width, n_units - group * width)
        m_unit, n_unit = in_group // group_width, group * width + in_group % group_width
        for rank in range(cluster):
            m = m_unit * m_per_unit + (rank if shares == "b" else 0)
            n = n_unit * n_per_unit + (rank if shares == "a" else 0)
            if m < m_blocks and n < n_blocks:
                rows.add(m)
                cols.add(n)
    return len(rows) * block_m + len(cols) * block_n


@settings(max_examples=200, deadline=None)
@given(tile=st.sampled_from([(256, 128), (256, 88), (128, 128), (128, 176), (64, 96)]),
       m_blocks=st.integers(1, 128), n_blocks=st.integers(1, 300),
       cluster_shares=st.sampled_from([(1, "a"), (2, "a"), (2, "b")]))
def test_raster_group_reads_within_5_percent_of_the_best_width(tile, m_blocks, n_blocks, cluster_shares):
    """The closed-form width choice against the walk replayed: its first wave reads at most
    5% more operand rows than the best power-of-two group width."""
    (block_m, block_n), (cluster, shares) = tile, cluster_shares
    num_ctas = min(NUM_SMS, m_blocks * n_blocks)
    num_ctas -= num_ctas % cluster
    if num_ctas == 0:
        return
    width = raster_group_n(m_blocks, n_blocks, block_m, block_n, num_ctas, cluster, shares)
    widths = [1 << i for i in range(10) if 1 << i < 2 * n_blocks]
    assert width in widths
    best = min(_first_wave_rows_read(m_blocks, n_blocks, block_m, block_n, num_ctas, cluster, shares, w)
               for w in widths)
    chosen = _first_wave_rows_read(m_blocks, n_blocks, block_m, block_n, num_ctas, cluster, shares, width)
    assert chosen <= 1.05 * best


def test_raster_group_of_256x128_tiles_makes_a_wave_about_square_in_rows_read():
    """16 column blocks by ~8 row blocks at 4096x4096 (the layout Nsight Compute measured
    with 25% fewer DRAM bytes than 8 x 16)."""
    assert choose_config(4096, 4096, 7168, NUM_SMS).group_n == 16
    assert raster_group_n(16, 32, 256, 128, 132, 2, "a") == 8  # cluster tiles of two columns


@pytest.mark.parametrize("m,n,k,kind,native", [
    (8192, 8192, 2048, "1d2d", True),    # 256x128 tiles: native measured 0.95-1.22x cuBLAS
    (4096, 32768, 512, "1d2d", True),    # the shallowest compared: 1.22x
    (4096, 4096, 7168, "1d2d", True),
    (4096, 2112, 7168, "1d2d", False),   # 256x88: 0.94x
    (128, 4096, 7168, "1d2d", True),     # few rows on 64-wide tiles in one wave: 1.12-2.0x
    (128, 7168, 2048, "1d2d", True),
    (64, 7168, 1024, "1d2d", False),     # shallower than any compared
    (128, 32768, 512, "1d2d", False),    # wider tiles (more than a wave of 64-wide ones): 0.97x
    (512, 768, 1024, "1d2d", False),     # 128-row tiles
    (4096, 4096, 32768, "1d1d", False),  # wgrad: 0.86x
    (4096, 4100, 7168, "1d2d", False),   # N % 8 != 0: no native kernel (and no ValueError)
    (2048, 2048, 128, "1d2d", False),    # 256x128 tiles, but K shallower than any compared
])
def test_auto_takes_the_native_dense_gemm_where_it_measured_faster(m, n, k, kind, native):
    from fp8train.ops.backend import native_beats_cublas

    assert native_beats_cublas(m, n, k, kind) is native


def test_sharing_b_needs_a_cluster_of_two_and_even_halves():
    GemmConfig(256, 128, 3, NUM_SMS, 8, "1d2d", 2, shares="b")
    for cluster, block_n in ((1, 128), (2, 120)):
        with pytest.raises(ValueError, match="shares"):
            GemmConfig(128, block_n, 3, 132, 8, "1d2d", cluster, shares="b")


@needs_toolchain
def test_bench_kernels_compile_to_qgmma_without_spills(tmp_path, monkeypatch):
    from fp8train.ops.jit import compiler

    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    compiler._reset_process_caches()
    kernels = bench_kernels()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        compiled = list(pool.map(lambda args: compile_kernel(*args), kernels))
    for (cfg, n, k, acc, grouping), ck in zip(kernels, compiled):
        report = check_sass(ck.cubin_path)
        assert report.qgmma_count > 0, f"{ck.name}: no QGMMA, off the FP8 tensor-core path"
        assert report.local_memory_ops == 0 and ck.spill_bytes == 0, f"{ck.name}: spills"


def test_config_listing_runs_without_a_gpu(capsys):
    from fp8train.ops.native.__main__ import main

    assert main(["--shapes", "4096,7168,2048;64,2112,7168", "--num-sms", "114"]) == 0
    out = capsys.readouterr().out
    assert "4096" in out and "2112" in out and len(out.strip().splitlines()) == 3


@pytest.mark.parametrize("kind,accumulate,grouping,cluster,error", [
    ("1d1d", False, "m_contiguous", 1, "runs the 1d2d kernel"),
    ("1d2d", False, "k_contiguous", 1, "runs the 1d1d kernel"),
    ("1d2d", True, "none", 1, "only the 1D1D"),
    ("1d2d", False, "m_masked", 2, "without clusters"),
    ("1d2d", False, "batched", 1, "grouping: expected one of"),
])
def test_render_rejects_impossible_kernels(kind, accumulate, grouping, cluster, error):
    from fp8train.ops.native.gemm_config import GemmConfig
    from fp8train.ops.native.sm90_fp8_gemm import render_source

    cfg = GemmConfig(block_m=128, block_n=128, num_stages=4, num_ctas=132, group_n=8, kind=kind,
                     cluster=cluster)
    with pytest.raises(ValueError, match=error):
        render_source(cfg, 4096, 7168, accumulate, grouping)


def test_contiguous_m_grouped_256_row_tiles_need_256_row_segments():
    """A 256-row tile over 128-row segments could span two experts: the launch refuses it
    (before touching a GPU) unless the caller promises 256-row segments, and only then may
    the heuristic pick one. Masked experts and k-grouped outputs never share a tile."""
    from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native, render_source

    tall = GemmConfig(256, 128, 3, 132, 8, "1d2d")
    a = per_token_cast(torch.zeros(512, 256))
    b = per_block_cast(torch.zeros(2, 128, 256))
    offsets = torch.tensor([0, 256, 512], dtype=torch.int32)
    out = torch.empty(512, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="segment_rows=256"):
        fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False, tall, group_offsets=offsets)
    assert choose_config(8192, 4096, 7168, NUM_SMS, grouped=True).block_m == 128
    assert choose_config(8192, 4096, 7168, NUM_SMS, grouped=True, segment_rows=256).block_m == 256
    with pytest.raises(ValueError, match="segment_rows"):
        choose_config(8192, 4096, 7168, NUM_SMS, grouped=True, segment_rows=512)
    for grouping in ("m_contiguous", "m_masked"):
        render_source(tall, 4096, 7168, False, grouping)
    render_source(GemmConfig(256, 128, 4, 132, 8, "1d1d"), 4096, 7168, True, "k_contiguous")


def test_masked_and_k_grouped_gemms_take_256_row_tiles_where_they_need_fewer_waves():
    """256x128 ran the masked GEMM 2-8% and the k-grouped one 5-9% faster than their 128-row
    tiles on every swept problem (H100): the heuristic takes them there. A masked expert's
    rows are tiled on their own, so 128 or fewer rows an expert keep the shorter tiles."""
    for g, rows, n, k in ((8, 512, 4096, 7168), (8, 1024, 4096, 7168), (16, 512, 2048, 7168),
                          (4, 2048, 7168, 2048), (8, 256, 4096, 7168)):
        cfg = choose_config(g * rows, n, k, NUM_SMS, "1d2d", rows_per_group=rows)
        assert (cfg.block_m, cfg.block_n) == (256, 128), (g, rows, cfg)
    assert choose_config(8 * 128, 4096, 7168, NUM_SMS, "1d2d", rows_per_group=128).block_m == 128
    assert choose_config(8 * 64, 4096, 7168, NUM_SMS, "1d2d", rows_per_group=64).block_m == 64
    # 300 rows an expert: two 256-row tiles each (not 1.2 of them), and 128-row tiles win.
    assert choose_config(8 * 300, 4096, 7168, NUM_SMS, "1d2d", rows_per_group=300).block_m == 128
    with pytest.raises(ValueError, match="rows_per_group"):
        choose_config(8 * 128, 4096, 7168, NUM_SMS, "1d2d", rows_per_group=300)
    for g, m, n in ((8, 4096, 7168), (4, 7168, 2048), (16, 2048, 7168)):  # wgrad: experts' [M, N]
        cfg = choose_config(g * m, n, 128, NUM_SMS, "1d1d", grouped=True)
        assert (cfg.block_m, cfg.block_n) == (256, 128), (g, m, n, cfg)


@settings(max_examples=200, deadline=None)
@given(groups=st.integers(1, 64), rows=st.integers(1, 4096), n=st.integers(1, 64).map(lambda b: 128 * b),
       k=st.integers(1, 56).map(lambda b: 128 * b))
def test_masked_configs_are_legal_and_fit_an_expert(groups, rows, n, k):
    """Every masked choice is a legal config, no taller than an expert's rows need (64-row
    tiles for <= 64 rows), and launches no more CTAs than it has tiles or SMs."""
    cfg = choose_config(groups * rows, n, k, NUM_SMS, "1d2d", rows_per_group=rows)
    assert cfg.block_m == 64 if rows <= 64 else cfg.block_m in (128, 256)
    assert cfg.block_m < 2 * max(rows, 64), cfg
    tiles = groups * -(-rows // cfg.block_m) * -(-n // cfg.block_n)
    assert 1 <= cfg.num_ctas <= min(NUM_SMS, tiles)
    assert (cfg.split_k, cfg.cluster) == (1, 1)


@needs_toolchain
@pytest.mark.parametrize("kind,accumulate,grouping", [("1d2d", False, "m_masked"), ("1d2d", False, "m_contiguous"),
                                                      ("1d1d", False, "none"), ("1d1d", True, "k_contiguous")])
def test_256_row_tiles_compile_for_masked_and_wgrad_kernels(tmp_path, monkeypatch, kind, accumulate, grouping):
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    cfg = GemmConfig(256, 128, 3 if kind == "1d2d" else 4, 132, 8, kind)
    ck = compile_kernel(cfg, 520, 640, accumulate, grouping)
    report = check_sass(ck.cubin_path)
    assert report.qgmma_count == 8 and report.local_memory_ops == 0 and ck.spill_bytes == 0


def test_kernel_source_does_not_depend_on_the_grid():
    """Configs differing only in num_ctas share one compiled kernel."""
    from dataclasses import replace

    from fp8train.ops.native.sm90_fp8_gemm import render_source

    cfg = choose_config(4096, 4096, 7168, NUM_SMS)
    assert render_source(cfg, 4096, 7168, False) == render_source(replace(cfg, num_ctas=64), 4096, 7168, False)


def test_k_grouped_kernel_is_one_for_every_token_count():
    from fp8train.ops.native.sm90_fp8_gemm import kernel_name, render_source

    cfg = choose_config(8 * 4096, 7168, 128, NUM_SMS, "1d1d")
    assert render_source(cfg, 7168, 128, False, "k_contiguous") == \
        render_source(cfg, 7168, 4096, False, "k_contiguous")
    assert "kvar" in kernel_name(cfg, 7168, 4096, False, "k_contiguous")


def test_grouped_configs_never_take_split_k_or_clusters():
    """Grouped GEMMs run without split-K or clusters whatever the options say, and the
    config cache follows the options."""
    from fp8train.ops.native.sm90_fp8_gemm import render_source

    assert choose_config(128, 2112, 7168, NUM_SMS).split_k > 1
    assert choose_config(8192, 4096, 7168, NUM_SMS, multicast=True).cluster == 2
    assert choose_config(8192, 4096, 7168, NUM_SMS).cluster == 1
    for m, rows in ((128, None), (8192, None), (1024, 128)):
        cfg = choose_config(m, 4096, 7168, NUM_SMS, "1d2d", rows_per_group=rows, grouped=True,
                            multicast=True)
        assert (cfg.split_k, cfg.cluster) == (1, 1) and cfg.block_m <= 128
        render_source(cfg, 4096, 7168, False, "m_contiguous")
    assert choose_config(128, 2112, 7168, NUM_SMS, split_k=False).split_k == 1


@needs_toolchain
@pytest.mark.parametrize("shares", ["a", "b"])
def test_multicast_kernel_has_no_gpu_fence_per_k_block(tmp_path, monkeypatch, shares):
    """The cluster-of-two kernel's remote stage releases must not carry a GPU-wide fence:
    `mbarrier.arrive.release.cluster` compiled to MEMBAR.ALL.GPU before every arrive (two per
    warp per K block), which held multicast to ~330 TFLOP/s on the H100. What remains is one
    fence per cluster barrier (kernel start, and each warpgroup's exit)."""
    from fp8train.ops.jit import compiler
    from fp8train.ops.jit.sass import disassemble
    from fp8train.ops.native.gemm_config import GemmConfig

    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    compiler._reset_process_caches()
    ck = compile_kernel(GemmConfig(128, 128, 5, 132, 8, "1d2d", 2, shares=shares), 4096, 7168, False, "none")
    sass = disassemble(ck.cubin_path)
    assert "UTMALDG.2D.MULTICAST" in sass
    assert sass.count("MEMBAR.ALL.GPU") <= sass.count("UCGABAR_ARV"), \
        (sass.count("MEMBAR.ALL.GPU"), sass.count("UCGABAR_ARV"))
