"""Python host cost of one FP8Linear forward+backward on the native path, measured without a
GPU: CPU tensors stand in for device ones and only the driver calls are stubbed (kernel
launches, TMA encoding, the raw stream), so everything fp8train runs in Python per step
(autograd Function, casts' checks and allocations, argument packing, GEMM plans) is timed.

    python scripts/host_cost_layer_cpu.py [--profile]

Prints microseconds per forward+backward beside nn.Linear's on the same (tiny) shapes, whose
math is negligible next to the host work at these sizes.
"""
import argparse
import cProfile
import ctypes
import pstats
import time

import torch

from fp8train import FP8Linear
from fp8train.ops import backend
from fp8train.ops import native as ops_native
from fp8train.ops.jit import device, runtime
from fp8train.ops.native import sm90_fp8_gemm as gemm_native
from fp8train.quant import native as cast_native

T, K, N = 128, 128, 128


def stub_driver() -> None:
    """Everything below the driver call is skipped; everything above it runs as on a GPU."""
    device.set_num_sms(132)
    descriptor = (ctypes.c_uint8 * 128)()

    class FakeMap:
        def getPtr(self):
            return ctypes.addressof(descriptor)

    class StubKernel(runtime.Kernel):
        def launch_params(self, *args, **kwargs):  # the driver call itself
            pass

    stub = StubKernel("stub", 0, None, smem_limit=232448)
    runtime.encode_tma_2d = lambda *args: FakeMap()
    gemm_native._raw_stream = lambda index: 0
    torch.cuda.is_current_stream_capturing = lambda: False
    real_launch_for = gemm_native._launch_for

    def launch_for(m, n, k, kind, accumulate, dev, num_sms, config=None, grouping="none", out_f32=False):
        key = (m, n, k, kind, accumulate, grouping, out_f32)
        if key not in launches:
            cfg = config or gemm_native.choose_config(m, n, k, num_sms, kind, grouped=grouping != "none")
            launches[key] = gemm_native._Launch(cfg, stub, 1024, cfg.num_ctas)
        return launches[key]

    launches = {}
    gemm_native._launch_for = launch_for
    assert real_launch_for is not launch_for
    cast_native._kernel = lambda *args, **kwargs: stub
    cast_native._raw_stream = lambda index: 0
    cast_native.supports = lambda x: x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.is_contiguous()
    ops_native.toolchain_status = lambda: (True, "ok")
    backend.is_hopper = lambda index: True
    real_resolve = backend.resolve
    # CPU tensors are no GPU to dispatch: the GEMMs take the native path as on an H100.
    backend.resolve = lambda op, device, **kw: "native" if op == "fp8_gemm_nt" else real_resolve(op, device, **kw)


def per_step_us(step, reps: int = 300) -> float:
    for _ in range(30):
        step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="cProfile 300 steps of the FP8 layer")
    args = parser.parse_args()
    stub_driver()
    torch.manual_seed(0)
    results = {}
    for cls in (torch.nn.Linear, FP8Linear):
        layer = cls(K, N, bias=False)
        x = torch.randn(T, K, requires_grad=True)
        dy = torch.randn(T, N)

        def step():
            layer(x).backward(dy)

        results[cls.__name__] = per_step_us(step)
        print(f"{cls.__name__:10s} {T}x{K}->{N} forward+backward: {results[cls.__name__]:7.1f} us of host time")
    print(f"FP8Linear / nn.Linear: {results['FP8Linear'] / results['Linear']:.2f}x")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
