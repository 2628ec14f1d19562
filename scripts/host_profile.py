"""Where the host time of one fp8_gemm_nt call goes (device only): microseconds per step."""
import ctypes
import time

import torch

from fp8train import ops
from fp8train.ops.jit.runtime import encode_tma_2d
from fp8train.ops.native import sm90_fp8_gemm as native
from fp8train.quant import per_block_cast, per_token_cast

ops.set_backend("native")
m, n, k = 4096, 4096, 7168
a = per_token_cast(torch.randn(m, k, device="cuda"))
b = per_block_cast(torch.randn(n, k, device="cuda"))
out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
ops.fp8_gemm_nt(a, b, out)
torch.cuda.synchronize()


def per_call_us(fn, reps=2000):
    torch.cuda._sleep(50_000_000)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


launch = native._launch_for(m, n, k, "1d2d", False, 0, 132)
cfg = launch.config
sa_mn, ld, _ = native._scales_as_read(a[1].contiguous(), 0, False, "a")  # row-major
tm_a = encode_tma_2d(a[0].data_ptr(), a[0].dtype, k, m, k, 128, cfg.block_m, 128)
tm_b = encode_tma_2d(b[0].data_ptr(), b[0].dtype, k, n, k, 128, cfg.block_n, 128)
tm_sa = encode_tma_2d(sa_mn.data_ptr(), torch.float32, k // 128, m, 4 * ld, 4, cfg.block_m, 0)
tm_out = encode_tma_2d(out.data_ptr(), out.dtype, n, m, 2 * n, cfg.block_n, cfg.block_m, 0)
steps = {
    "fp8_gemm_nt (public, out given)": lambda: ops.fp8_gemm_nt(a, b, out),
    "fp8_gemm_nt (public, allocates)": lambda: ops.fp8_gemm_nt(a, b),
    "native launcher only": lambda: native.fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False),
    "_scales_as_read (in place)": lambda: native._scales_as_read(a[1], 0, True, "a"),
    "_tma_address (cached)": lambda: native._tma_address(a[0].data_ptr(), a[0].dtype, k, m, k, 128, 128, 128),
    "encode_tma_2d x1": lambda: encode_tma_2d(a[0].data_ptr(), a[0].dtype, k, m, k, 128, 128, 128),
    "kernel.launch (tuples)": lambda: launch.kernel.launch(
        launch.config.num_ctas, launch.config.num_threads, launch.smem,
        (m, b[1].data_ptr(), out.data_ptr(), tm_a, tm_b, tm_sa, tm_a, tm_out, 0, 0, 0, 0),
        (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, None, None, None, None, None,
         ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p),
        torch.cuda.current_stream().cuda_stream),
    "raw stream": lambda: native._raw_stream(0),
    "torch.empty bf16": lambda: torch.empty(m, n, device="cuda", dtype=torch.bfloat16),
    "current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
    "a.data_ptr()": lambda: a[0].data_ptr(),
}
for name, fn in steps.items():
    print(f"{name:36s} {per_call_us(fn, 300 if 'launch' in name or 'fp8' in name else 2000):7.1f} us")
