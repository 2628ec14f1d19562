"""Fill the kernel cache before a device call, on a machine without a GPU:

    FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py

Compiles every GEMM kernel the benchmark shapes launch (dense, split-K, grouped) and every
cast kernel (each kind, dtype and scale rule). The cache key holds the full `nvcc --version`
text, so a carried cache is used on the device only where its nvcc is the very same build;
elsewhere the kernels simply compile again. Device time saved: ~1 s of nvcc per kernel.
"""
import concurrent.futures
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_gemm_kernels_compile import bench_kernels  # noqa: E402  (the bench's kernel list)

from fp8train.ops.jit import compiler  # noqa: E402
from fp8train.ops.native.sm90_fp8_gemm import compile_kernel  # noqa: E402
from fp8train.quant import native  # noqa: E402


def main() -> int:
    if not os.environ.get("FP8TRAIN_CACHE_DIR"):
        print("set FP8TRAIN_CACHE_DIR to the cache folder to fill", file=sys.stderr)
        return 2
    jobs = [("gemm", args) for args in bench_kernels()]
    jobs += [("cast", (kind, dtype, pow2)) for kind in native.KINDS
             for dtype in (torch.bfloat16, torch.float16, torch.float32) for pow2 in (False, True)]

    def build(job):
        what, args = job
        if what == "gemm":
            return compile_kernel(*args)
        kind, dtype, pow2 = args
        return compiler.compile_cubin(native.compiled_name(kind, dtype, pow2),
                                      native.render_source(kind, dtype, pow2))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for i, kernel in enumerate(pool.map(build, jobs), 1):
            print(f"[{i}/{len(jobs)}] {kernel.name} {'cached' if kernel.cached else f'{kernel.compile_seconds:.1f} s'}",
                  flush=True)
    print(f"{len(jobs)} kernels in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
