"""Python-side host cost of one native GEMM call, measured without a GPU: the driver calls
(TMA encoding, the launch, the raw stream) are stubbed and CPU tensors stand in for device
ones, so what is timed is the Python the launcher and the public op run per call.

    python scripts/host_cost_cpu.py [M]      (default 4096; CPU tensors make the per-call copy
                                             of A's scales real work: M = 64 shows the overhead)
"""
import ctypes
import sys
import time

import torch

from fp8train import ops
from fp8train.ops import backend
from fp8train.ops import gemm as public
from fp8train.ops.jit import device, runtime
from fp8train.ops.native import sm90_fp8_gemm as native
from fp8train.quant import per_block_cast, per_token_cast
from fp8train.ops.scale_layout import as_kblock_major

M, N, K = int(sys.argv[1]) if len(sys.argv) > 1 else 4096, 4096, 7168


def per_call_us(fn, reps=20000):
    for _ in range(100):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main():
    device.set_num_sms(132)
    descriptor = (ctypes.c_uint8 * 128)()

    class FakeMap:
        def getPtr(self):
            return ctypes.addressof(descriptor)

    class NoLaunch:
        def launch_params(self, *args):
            pass

    runtime.encode_tma_2d = lambda *args: FakeMap()
    native._raw_stream = lambda index: 0
    torch.cuda.is_current_stream_capturing = lambda: False
    cfg = native.choose_config(M, N, K, 132, split_k=False)  # split-K's scratch and counters need CUDA
    launch = native._Launch(cfg, NoLaunch(), 1024, cfg.num_ctas)
    native._launch_for = lambda *args, **kwargs: launch
    a = per_token_cast(torch.randn(M, 256).repeat(1, K // 256))
    b = per_block_cast(torch.randn(N, 256).repeat(1, K // 256))
    out = torch.empty(M, N, dtype=torch.bfloat16)
    launcher = per_call_us(lambda: native.fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False))
    print(f"M={M}, A scales K-block-major")
    print(f"native launcher:               {launcher:5.2f} us")
    ready = (a[0], as_kblock_major(a[1]))
    print(f"native launcher, A scales already K-block-major: "
          f"{per_call_us(lambda: native.fp8_gemm_nt_native(ready[0], ready[1], b[0], b[1], out, '1d2d', False)):5.2f} us")
    backend.is_hopper = lambda index: True
    public._native.toolchain_status = lambda: (True, "ok")
    public._plan_fp8_gemm_nt = lambda *args: ("native", "1d2d", M, N, torch.bfloat16)
    ops.set_backend("native")
    print(f"public fp8_gemm_nt, out given: {per_call_us(lambda: ops.fp8_gemm_nt(a, b, out)):5.2f} us")


if __name__ == "__main__":
    main()
