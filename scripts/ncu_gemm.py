"""One native GEMM call for Nsight Compute to profile (device only):

    PYTHONPATH=. ncu -k fp8train_gemm -c 1 --section SpeedOfLight --section WarpStateStats \
        python scripts/ncu_gemm.py 4096 4096 7168 [128 160]
"""
import sys

import torch

from fp8train.ops.native.gemm_config import SMEM_LIMIT, GemmConfig, choose_config, shared_bytes
from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native
from fp8train.quant import per_block_cast, per_token_cast

m, n, k = (int(v) for v in sys.argv[1:4])
config = None
if len(sys.argv) > 5:
    bm, bn = int(sys.argv[4]), int(sys.argv[5])
    stages = 12
    while shared_bytes(bm, bn, stages, "1d2d") > SMEM_LIMIT:
        stages -= 1
    config = GemmConfig(bm, bn, stages, min(132, -(-m // bm) * -(-n // bn)), 8, "1d2d")
a = per_token_cast(torch.randn(m, k, device="cuda"))
b = per_block_cast(torch.randn(n, k, device="cuda"))
out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False, config)
torch.cuda.synchronize()
print("config:", config or choose_config(m, n, k, 132))
