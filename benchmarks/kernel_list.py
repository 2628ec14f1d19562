"""Every native GEMM kernel the benchmarks launch, as ``compile_kernel`` arguments: what
``scripts/prebuild_kernels.py`` compiles ahead of a device call and what the kernel compile
tests check (QGMMA, no spills) without a GPU."""
from __future__ import annotations

from fp8train.ops.native.gemm_config import choose_config
from .gemm import DENSE_1D2D, WGRAD_1D1D

NUM_SMS = 132  # the H100 the project measures on

# The grouped bench's shapes: (experts, rows per expert, N, K).
M_GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168),
             (8, 4096, 7168, 2048), (32, 1024, 4096, 7168), (64, 512, 2048, 7168)]


def segment_rows_of(*rows: int) -> int:
    """The segment alignment the grouped benches promise the contiguous GEMM: 256 where every
    expert's rows are a multiple of 256, else 128."""
    return 256 if all(r % 256 == 0 for r in rows) else 128


def grouped_kernels(num_sms: int = NUM_SMS) -> list:
    """(config, n, k, accumulate, grouping) of the grouped benchmark's kernels: m-grouped
    contiguous and masked (expected rows 64/128/256), k-grouped wgrad with and without
    accumulation; the choices mirror the launchers in ops/native/sm90_fp8_gemm.py."""
    seen = {}
    for g, rows, n, k in M_GROUPED:
        seen[(choose_config(g * rows, n, k, num_sms, "1d2d", grouped=True, segment_rows=segment_rows_of(rows)),
              n, k, False, "m_contiguous")] = None
        for expected in (64, 128, 256):
            cfg = choose_config(g * expected, n, k, num_sms, "1d2d", rows_per_group=expected)
            seen[(cfg, n, k, False, "m_masked")] = None
            padded = -(-expected // 128) * 128  # the contiguous kernel on the same rows
            cfg = choose_config(g * padded, n, k, num_sms, "1d2d", grouped=True,
                                segment_rows=segment_rows_of(padded))
            seen[(cfg, n, k, False, "m_contiguous")] = None
        for accumulate in (False, True):  # wgrad: a = dY^T [N, T], b = X^T [K, T]
            seen[(choose_config(g * n, k, 128, num_sms, "1d1d", grouped=True), k, 0, accumulate,
                  "k_contiguous")] = None
    return list(seen)


def split_k_kernels(num_sms: int = NUM_SMS) -> list:
    """The split-K kernels the heuristic picks for the small-M bench shapes."""
    return [(choose_config(m, n, k, num_sms, "1d2d"), n, k, False, "none")
            for m, n, k in DENSE_1D2D if m <= 128]


def bench_kernels(num_sms: int = NUM_SMS) -> list:
    """(config, n, k, accumulate, grouping) of every kernel the benchmark shapes launch."""
    seen = dict.fromkeys(split_k_kernels(num_sms))
    for m, n, k in DENSE_1D2D:
        seen[(choose_config(m, n, k, num_sms, "1d2d"), n, k, False, "none")] = None
    for m, n, k in WGRAD_1D1D:
        for accumulate in (False, True):
            seen[(choose_config(m, n, k, num_sms, "1d1d"), n, k, accumulate, "none")] = None
    for key in grouped_kernels(num_sms):
        seen[key] = None
    return list(seen)
