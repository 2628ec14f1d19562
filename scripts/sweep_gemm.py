"""Sweep native GEMM configs on a few shapes (device only) to see what limits the kernel.

    PYTHONPATH=. python scripts/sweep_gemm.py [section ...]   (default: every section)

Sections: tiles256, raster, wgrad256, grouped256, fewest_ctas, multicast, configs, split (small M).
(The attribution and scale-layout sweeps answered their questions: docs/kernels.md has the
figures.) Prebuild their kernels with
`scripts/prebuild_kernels.py --sweep`.
"""
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/

from benchmarks import deepgemm  # noqa: E402
from benchmarks.gemm import WGRAD_1D1D  # noqa: E402
from benchmarks.timing import num_input_sets, time_calls  # noqa: E402
from fp8train.ops.native.gemm_config import (MIN_K_BLOCKS_PER_SPLIT, GemmConfig, choose_config,  # noqa: E402
                                             deepest_stages, raster_group_n)
from fp8train.ops.native import sm90_fp8_gemm  # noqa: E402
from fp8train.ops.native.sm90_fp8_gemm import (fp8_gemm_nt_native, k_grouped_native,  # noqa: E402
                                               m_grouped_masked_native)
from fp8train import ops  # noqa: E402
from fp8train.quant import per_block_cast, per_token_cast  # noqa: E402


def _config(m, n, kind, bm, bn, stages, group_n, cluster):
    stages = stages or deepest_stages(bm, bn, kind)
    tiles = -(-m // bm) * -(-n // bn)
    ctas = max(cluster, min(132, tiles) // cluster * cluster)
    return GemmConfig(bm, bn, stages, ctas, group_n, kind, cluster)


def sweep(m, n, k, kind, candidates):
    """Candidates as (block_m, block_n, stages or 0 for the deepest, group_n, cluster)."""
    sweep_configs(m, n, k, kind, [_config(m, n, kind, *c) for c in candidates])


ROUNDS = 3  # the clocks drift over a sweep (a second pass ran up to 10% slower): rounds, median


def sweep_configs(m, n, k, kind, configs, deepgemm_too=True):
    """Every config (and DeepGEMM's kernel) timed once per round, ROUNDS rounds over the
    same operands; prints the median TFLOP/s and the rounds' range."""
    sets = []
    for i in range(num_input_sets(m * k + n * k)):
        a = per_token_cast(torch.randn(m, k, device="cuda"))
        b = per_block_cast(torch.randn(n, k, device="cuda")) if kind == "1d2d" else per_token_cast(torch.randn(n, k, device="cuda"))
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if kind == "1d2d" else torch.float32)
        sets.append((a, b, out))
    entries = []
    for cfg in configs:
        grid = sm90_fp8_gemm._launch_for(m, n, k, kind, False, 0, 132, cfg).grid
        label = (f"bm{cfg.block_m} bn{cfg.block_n} s{cfg.num_stages} g{cfg.group_n} "
                 f"c{cfg.cluster}{cfg.shares if cfg.cluster > 1 else ''}"
                 f"{f' split{cfg.split_k}' if cfg.split_k > 1 else ''} grid {grid}")
        entries.append((label, [lambda s=s, cfg=cfg: fp8_gemm_nt_native(s[0][0], s[0][1], s[1][0], s[1][1], s[2],
                                                                         kind, False, cfg) for s in sets]))
    deep = [deepgemm.dense_1d2d(*s) for s in sets] if kind == "1d2d" and deepgemm_too else [None]
    if all(deep):
        entries.append(("DeepGEMM", deep))
    report(f"{kind} {m}x{n}x{k}", entries, 2 * m * n * k)


def report(prefix, entries, flop):
    """Time each (label, calls) entry once per round for ROUNDS rounds; print the median
    TFLOP/s and the range."""
    rates = [[] for _ in entries]
    for _ in range(ROUNDS):
        for (_, calls), values in zip(entries, rates):
            ms, _ = time_calls(calls)
            values.append(flop / ms / 1e9)
    for (label, _), values in zip(entries, rates):
        print(f"{prefix} {label}: {statistics.median(values):7.0f} TFLOP/s "
              f"({min(values):.0f}-{max(values):.0f})", flush=True)


# Small-M 1D2D shapes of the bench, where the HBM bounds the time and DeepGEMM leads most.
SMALL_1D2D = [(64, 2112, 7168), (64, 4096, 7168), (128, 2112, 7168), (128, 4096, 7168),
              (64, 7168, 2048), (128, 7168, 2048), (128, 7168, 16384)]


def split_configs(m, n, k):
    """The heuristic's small-M config, then (BLOCK_M, BLOCK_N, split) around it: 64- and
    128-row tiles at M = 128, BLOCK_N 64-136, every split that keeps >= 4 K blocks a slice."""
    chosen = choose_config(m, n, k, 132)
    configs = [chosen]
    kb = k // 128
    for bm in ((64,) if m <= 64 else (64, 128)):
        for bn in (64, 96, 112, 128, 136):
            for split in (1, 2, 3, 4, 6, 7, 8):
                if split > 1 and kb // split < MIN_K_BLOCKS_PER_SPLIT:
                    continue
                tiles = -(-m // bm) * -(-n // bn) * split
                cfg = GemmConfig(bm, bn, deepest_stages(bm, bn, "1d2d"), min(132, tiles), 1, "1d2d", 1, split)
                if tiles <= 2 * 132 and cfg != chosen:
                    configs.append(cfg)
    return configs


# Dense 1D2D shapes where the tensor cores bound the time (M >= 4000): the bench's.
LARGE_1D2D = [(4096, 2112, 7168), (4000, 2112, 7168), (4096, 4096, 7168), (4096, 7168, 2048),
              (4096, 7168, 16384), (4096, 24576, 1536), (4096, 32768, 512), (8192, 8192, 8192),
              (16384, 7168, 2048), (16384, 2048, 7168)]


def tiles256_configs(m, n, k):
    """The heuristic's config, then 256-row tiles at BLOCK_N 88-128, 128-row tiles at 88 and
    128, and 256x128 with A or B multicast over a cluster of two."""
    configs = [choose_config(m, n, k, 132, "1d2d")]
    configs += [_config(m, n, "1d2d", 256, bn, 0, 8, 1) for bn in (88, 96, 112, 128)]
    configs += [_config(m, n, "1d2d", 128, bn, 0, 8, 1) for bn in (88, 128)]
    configs.append(_config(m, n, "1d2d", 256, 128, 0, 8, 2))
    configs.append(replace(_config(m, n, "1d2d", 256, 128, 0, 8, 2), shares="b"))
    return list(dict.fromkeys(configs))


def tiles256():
    for m, n, k in LARGE_1D2D:
        sweep_configs(m, n, k, "1d2d", tiles256_configs(m, n, k))


def fewest_ctas():
    """The heuristic's config on all SMs against the same tiles on the fewest CTAs that keep
    the number of waves (the same compiled kernel: the grid is a launch argument)."""
    for m, n, k in LARGE_1D2D:
        cfg = choose_config(m, n, k, 132, "1d2d")
        tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        waves = -(-tiles // 132)
        sweep_configs(m, n, k, "1d2d", [cfg, replace(cfg, num_ctas=-(-tiles // waves))], deepgemm_too=False)


def raster_configs(m, n, k):
    """256x128 tiles under L2 rasterisations: column blocks per scheduler group (cluster
    tiles with A multicast), alone and over clusters of two sharing A or B."""
    configs = [choose_config(m, n, k, 132, "1d2d")]
    configs += [_config(m, n, "1d2d", 256, 128, 0, g, 1) for g in (4, 8, 16, 32)]
    configs += [_config(m, n, "1d2d", 256, 128, 0, g, 2) for g in (4, 8)]
    configs += [replace(_config(m, n, "1d2d", 256, 128, 0, g, 2), shares="b") for g in (8, 16)]
    return list(dict.fromkeys(configs))


def raster():
    for m, n, k in LARGE_1D2D:
        sweep_configs(m, n, k, "1d2d", raster_configs(m, n, k))


def wgrad256_configs(m, n, k):
    """The heuristic's 1D1D config against 256-row tiles at BLOCK_N 96-128."""
    configs = [choose_config(m, n, k, 132, "1d1d")]
    for bn in (96, 112, 128):
        cfg = _config(m, n, "1d1d", 256, bn, 0, 1, 1)
        group_n = raster_group_n(-(-m // 256), -(-n // bn), 256, bn, cfg.num_ctas)
        configs.append(replace(cfg, group_n=group_n))
    return list(dict.fromkeys(configs))


def wgrad256():
    for m, n, k in WGRAD_1D1D:
        sweep_configs(m, n, k, "1d1d", wgrad256_configs(m, n, k))


# (experts, rows per expert, N, K): masked fprop/dgrad, every row valid (M_max = rows).
MASKED_256 = [(8, 512, 4096, 7168), (8, 1024, 4096, 7168), (16, 512, 2048, 7168), (4, 2048, 7168, 2048)]
# (experts, tokens per expert, M, N): k-grouped wgrad, out [G, M, N].
K_GROUPED_256 = [(8, 1024, 4096, 7168), (4, 2048, 7168, 2048), (16, 512, 2048, 7168)]
TALL_1D2D = GemmConfig(256, 128, deepest_stages(256, 128, "1d2d"), 132, 8, "1d2d")
TALL_1D1D = GemmConfig(256, 128, deepest_stages(256, 128, "1d1d"), 132, 8, "1d1d")


def grouped256():
    """The grouped GEMMs on the heuristic's tiles (128 rows) against 256x128 tiles:
    contiguous over 256-row segments (segment_rows=256, the heuristic's choice then),
    masked and k-grouped (forced); DeepGEMM's contiguous and masked GEMMs beside."""
    for g, rows, n, k in MASKED_256:  # the same problems as contiguous segments
        a = per_token_cast(torch.randn(g * rows, k, device="cuda"))
        b = per_block_cast(torch.randn(g, n, k, device="cuda"))
        offsets = torch.arange(0, g * rows + 1, rows, dtype=torch.int32, device="cuda")
        out = torch.empty(g * rows, n, device="cuda", dtype=torch.bfloat16)
        entries = [(f"segment_rows {seg}", [lambda seg=seg: ops.m_grouped_fp8_gemm_nt_contiguous(
            a, b, offsets, out, segment_rows=seg, backend="native")]) for seg in (128, 256)]
        deep = deepgemm.m_grouped_contiguous(a, b, offsets, out)
        if deep is not None:
            entries.append(("DeepGEMM", [deep]))
        report(f"contiguous {g}x{rows} {n},{k}", entries, 2 * g * rows * n * k)
    for g, rows, n, k in MASKED_256:
        a = per_token_cast(torch.randn(g, rows, k, device="cuda"))
        b = per_block_cast(torch.randn(g, n, k, device="cuda"))
        masked_m = torch.full((g,), rows, dtype=torch.int32, device="cuda")
        out = torch.empty(g, rows, n, device="cuda", dtype=torch.bfloat16)
        entries = [(label, [lambda cfg=cfg: m_grouped_masked_native(a[0], a[1], b[0], b[1], masked_m, out, rows, cfg)])
                   for label, cfg in (("heuristic", None), ("bm256 bn128", TALL_1D2D))]
        deep = deepgemm.m_grouped_masked(a, b, masked_m, rows, out)
        if deep is not None:
            entries.append(("DeepGEMM", [deep]))
        report(f"masked {g}x{rows} {n},{k}", entries, 2 * g * rows * n * k)
    for g, tokens, m, n in K_GROUPED_256:
        t = g * tokens
        a = per_token_cast(torch.randn(m, t, device="cuda"))
        b = per_token_cast(torch.randn(n, t, device="cuda"))
        offsets = torch.arange(0, t + 1, tokens, dtype=torch.int32, device="cuda")
        out = torch.empty(g, m, n, device="cuda")
        entries = [(label, [lambda cfg=cfg: k_grouped_native(a[0], a[1], b[0], b[1], offsets, out, False, cfg)])
                   for label, cfg in (("heuristic", None), ("bm256 bn128", TALL_1D1D))]
        report(f"k-grouped {g}x{tokens} {m},{n}", entries, 2 * t * m * n)


def kernels():
    """(config, n, k, accumulate, grouping) of the tiles256, raster, wgrad256, split and
    grouped256 sections' forced configs, for prebuilding."""
    configs = {(cfg, n, k) for m, n, k in LARGE_1D2D for cfg in tiles256_configs(m, n, k) + raster_configs(m, n, k)}
    configs |= {(cfg, n, k) for m, n, k in WGRAD_1D1D for cfg in wgrad256_configs(m, n, k)}
    configs |= {(cfg, n, k) for m, n, k in SMALL_1D2D for cfg in split_configs(m, n, k)}
    kernels = [(cfg, n, k, False, "none") for cfg, n, k in configs]
    for g, rows, n, k in MASKED_256:
        for cfg in (choose_config(g * rows, n, k, 132, "1d2d", rows_per_group=rows), TALL_1D2D):
            kernels.append((cfg, n, k, False, "m_masked"))
        for seg in (128, 256):
            kernels.append((choose_config(g * rows, n, k, 132, "1d2d", grouped=True, segment_rows=seg), n, k,
                            False, "m_contiguous"))
    for g, _, m, n in K_GROUPED_256:
        for cfg in (choose_config(g * m, n, 128, 132, "1d1d", grouped=True), TALL_1D1D):
            kernels.append((cfg, n, 128, False, "k_contiguous"))
    return kernels


def multicast():
    """Clusters of two sharing A, the grid cut to the clusters that fit at once (v7 ran 3x
    slower without the cut), next to the same tiles without a cluster."""
    sweep(4096, 4096, 7168, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2), (128, 160, 0, 8, 2)])
    sweep(8192, 8192, 8192, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2), (128, 128, 0, 16, 2)])
    sweep(4096, 7168, 2048, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2)])
    sweep(4096, 7168, 16384, "1d1d", [(128, 176, 0, 8, 1), (128, 176, 0, 8, 2), (128, 128, 0, 8, 2)])


def configs():
    sweep(8192, 8192, 8192, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 16, 1), (128, 128, 4, 8, 1)])
    sweep(4096, 7168, 2048, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 16, 1)])
    sweep(4096, 7168, 16384, "1d1d", [(128, 176, 0, 8, 1), (128, 128, 0, 8, 1)])


def split():
    """Small M: the heuristic's config (first) against tiles and splits around it, DeepGEMM
    beside (at most two waves each; the median of three rounds)."""
    for m, n, k in SMALL_1D2D:
        sweep_configs(m, n, k, "1d2d", split_configs(m, n, k))


SECTIONS = {"tiles256": tiles256, "raster": raster, "wgrad256": wgrad256, "grouped256": grouped256, "fewest_ctas": fewest_ctas, "multicast": multicast, "configs": configs, "split": split}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SECTIONS)
    unknown = [c for c in chosen if c not in SECTIONS]
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in chosen:
        print(f"== {name}", flush=True)
        SECTIONS[name]()
