"""Sweep native GEMM configs on a few shapes (device only) to see what limits the kernel.

    PYTHONPATH=. python scripts/sweep_gemm.py [section ...]   (default: every section)

Sections: multicast, configs, split. (The attribution and scale-layout sweeps answered
their questions: docs/kernels.md has the figures.)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/

from benchmarks.timing import num_input_sets, time_calls  # noqa: E402
from fp8train.ops.native.gemm_config import SMEM_LIMIT, GemmConfig, shared_bytes  # noqa: E402
from fp8train.ops.native import sm90_fp8_gemm  # noqa: E402
from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native  # noqa: E402
from fp8train.quant import per_block_cast, per_token_cast  # noqa: E402


def deepest(bm, bn, kind):
    stages = 12
    while shared_bytes(bm, bn, stages, kind) > SMEM_LIMIT:
        stages -= 1
    return stages


def sweep(m, n, k, kind, candidates):
    sets = []
    for i in range(num_input_sets(m * k + n * k)):
        a = per_token_cast(torch.randn(m, k, device="cuda"))
        b = per_block_cast(torch.randn(n, k, device="cuda")) if kind == "1d2d" else per_token_cast(torch.randn(n, k, device="cuda"))
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if kind == "1d2d" else torch.float32)
        sets.append((a, b, out))
    for bm, bn, stages, group_n, cluster in candidates:
        stages = stages or deepest(bm, bn, kind)
        tiles = -(-m // bm) * -(-n // bn)
        ctas = min(132, tiles) // cluster * cluster
        cfg = GemmConfig(bm, bn, stages, ctas, group_n, kind, cluster)
        calls = [lambda s=s: fp8_gemm_nt_native(s[0][0], s[0][1], s[1][0], s[1][1], s[2], kind, False, cfg)
                 for s in sets]
        ms, _ = time_calls(calls)
        grid = sm90_fp8_gemm._launch_for(m, n, k, kind, False, 0, 132, cfg).grid
        print(f"{kind} {m}x{n}x{k} bm{bm} bn{bn} s{stages} g{group_n} c{cluster} grid {grid}: "
              f"{2 * m * n * k / ms / 1e9:7.0f} TFLOP/s", flush=True)


def sweep_split(m, n, k, candidates):
    """1D2D at small M with (block_n, split_k) forced; TFLOP/s and the share of the HBM
    roofline (A, B, their scales and the output, once each, at 3.35 TB/s)."""
    sets = []
    for seed in range(num_input_sets(m * k + n * k)):
        g = torch.Generator(device="cuda").manual_seed(seed)
        a = per_token_cast(torch.randn(m, k, device="cuda", generator=g))
        b = per_block_cast(torch.randn(n, k, device="cuda", generator=g))
        sets.append((a, b, torch.empty(m, n, device="cuda", dtype=torch.bfloat16)))
    bytes_moved = m * k + n * k + 4 * (m * k // 128 + (n // 128 + 1) * (k // 128)) + 2 * m * n
    for bn, split in candidates:
        bm = 64 if m <= 64 else 128
        tiles = -(-m // bm) * -(-n // bn) * split
        cfg = GemmConfig(bm, bn, deepest(bm, bn, "1d2d"), min(132, tiles), 1, "1d2d", 1, split)
        calls = [lambda s=s: fp8_gemm_nt_native(s[0][0], s[0][1], s[1][0], s[1][1], s[2], "1d2d", False, cfg)
                 for s in sets]
        ms, _ = time_calls(calls)
        print(f"1d2d {m}x{n}x{k} bn{bn} split{split}: {2 * m * n * k / ms / 1e9:6.0f} TFLOP/s, "
              f"{bytes_moved / (ms * 1e-3) / 3.35e12:4.0%} of the HBM roofline", flush=True)


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
    """Split-K at small M: (block_n, split_k) pairs around the heuristic's choice."""
    for m, n, k in ((64, 2112, 7168), (128, 4096, 7168), (128, 7168, 2048)):
        sweep_split(m, n, k, [(16, 1), (32, 1), (64, 2), (64, 4), (128, 2), (128, 4), (136, 8), (128, 8)])


SECTIONS = {"multicast": multicast, "configs": configs, "split": split}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SECTIONS)
    unknown = [c for c in chosen if c not in SECTIONS]
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    for name in chosen:
        print(f"== {name}", flush=True)
        SECTIONS[name]()
