"""Quick device smoke test: one small 1D2D and one 1D1D GEMM against the reference."""
import time

import torch

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.quant import per_block_cast, per_token_cast

ops.set_backend("native")
for kind, (m, n, k) in (("1d2d", (256, 512, 1024)), ("1d1d", (256, 512, 1024)), ("1d2d", (4000, 2112, 7168))):
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda")
    a = per_token_cast(x)
    b = per_block_cast(w) if kind == "1d2d" else per_token_cast(w)
    t0 = time.time()
    out = ops.fp8_gemm_nt(a, b, out_dtype=torch.bfloat16 if kind == "1d2d" else torch.float32)
    torch.cuda.synchronize()
    t1 = time.time()
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    err = ((out.double() - expect.double()).norm() / expect.double().norm()).item()
    print(f"{kind} {m}x{n}x{k}: first call {t1 - t0:.2f}s (compile+run), rel err {err:.2e}, "
          f"nan {torch.isnan(out).any().item()}", flush=True)
