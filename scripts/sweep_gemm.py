"""Sweep native GEMM configs on a few shapes (device only) to see what limits the kernel.

    PYTHONPATH=. python scripts/sweep_gemm.py
"""
import torch

from fp8train.bench.timing import num_input_sets, time_calls
from fp8train.ops.native.gemm_config import SMEM_LIMIT, GemmConfig, shared_bytes
from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native
from fp8train.quant import per_block_cast, per_token_cast


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
        print(f"{kind} {m}x{n}x{k} bm{bm} bn{bn} s{stages} g{group_n} c{cluster}: "
              f"{2 * m * n * k / ms / 1e9:7.0f} TFLOP/s", flush=True)


from fp8train.ops.native import sm90_fp8_gemm

for flags in ((), ("-DFP8TRAIN_DEBUG_NO_LOADS",)):
    sm90_fp8_gemm.debug_flags = flags
    print("flags:", flags or "none", flush=True)
    sweep(4096, 4096, 7168, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2), (128, 160, 0, 8, 2)])
sm90_fp8_gemm.debug_flags = ()
sweep(8192, 8192, 8192, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2)])
sweep(4096, 7168, 2048, "1d2d", [(128, 128, 0, 8, 1), (128, 128, 0, 8, 2), (128, 128, 0, 16, 2)])
sweep(4096, 7168, 16384, "1d1d", [(128, 176, 0, 8, 1), (128, 176, 0, 8, 2)])
