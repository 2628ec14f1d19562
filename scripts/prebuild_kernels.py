"""Fill the kernel cache before a device call, on a machine without a GPU:

    FP8TRAIN_CACHE_DIR=.kcache python scripts/prebuild_kernels.py [--recipe small 1b ...]

Compiles every GEMM kernel the benchmark shapes launch (dense, split-K, grouped) and every
cast kernel (each kind, dtype and scale rule). The cache key holds the full `nvcc --version`
text, so a carried cache is used on the device only where its nvcc is the very same build;
elsewhere the kernels simply compile again. Device time saved: ~1 s of nvcc per kernel.
`--recipe NAME...` adds the dense GEMMs of those recipe configs' linear layers (fprop, dgrad
and wgrad at micro_batch_size x seq_len tokens), so several recipe runs sharing a GPU do not
each compile the same kernels at their start.
"""
import argparse
import concurrent.futures
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/, recipes/
from benchmarks.kernel_list import NUM_SMS, bench_kernels  # noqa: E402
from fp8train.ops.jit import compiler  # noqa: E402
from fp8train.ops.native.sm90_fp8_gemm import compile_kernel  # noqa: E402
from fp8train.ops.native.gemm_config import choose_config  # noqa: E402
from fp8train.quant import native  # noqa: E402



def recipe_kernels(spec: str) -> list:
    """(config, n, k, accumulate, grouping, out_f32) of the dense GEMMs of one recipe config,
    ``NAME`` or ``NAME:key=value,...`` (overrides, e.g. ``small:micro_batch_size=8``): every
    nn.Linear that convert_to_fp8 swaps (all but lm_head), built on the meta device."""
    import torch.nn as nn
    from recipes.config import load_config
    from recipes.model import build_model

    name, _, overrides = spec.partition(":")
    cfg = load_config(Path(__file__).resolve().parent.parent / "recipes" / "configs" / f"{name}.yaml",
                      [o for o in overrides.split(",") if o])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.seq_len)
    m = cfg.micro_batch_size * cfg.seq_len
    shapes = {(mod.out_features, mod.in_features) for full, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and not full.endswith("lm_head")}
    kernels = []
    for n, k in sorted(shapes):
        kernels.append((choose_config(m, n, k, NUM_SMS, "1d2d"), n, k, False, "none", False))  # fprop
        kernels.append((choose_config(m, k, n, NUM_SMS, "1d2d"), k, n, False, "none", False))  # dgrad
        for accumulate in (False, True):  # wgrad, fresh and accumulated into .grad
            kernels.append((choose_config(n, k, m, NUM_SMS, "1d1d"), k, m, accumulate, "none", False))
    return kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", nargs="*", default=[], help="recipe configs: NAME or NAME:key=value,...")
    parser.add_argument("--sweep", action="store_true", help="also the forced configs of scripts/sweep_gemm.py's sections")
    opts = parser.parse_args()
    if not os.environ.get("FP8TRAIN_CACHE_DIR"):
        print("set FP8TRAIN_CACHE_DIR to the cache folder to fill", file=sys.stderr)
        return 2
    jobs = [("gemm", args) for args in bench_kernels()]
    for name in opts.recipe:
        kernels = recipe_kernels(name)
        print(f"{name}: {len(kernels)} GEMM kernels")
        jobs += [("gemm", kernel) for kernel in kernels]
    if opts.sweep:
        spec = importlib.util.spec_from_file_location("sweep_gemm", Path(__file__).with_name("sweep_gemm.py"))
        sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep)
        jobs += [("gemm", kernel) for kernel in sweep.kernels()]
    jobs += [("cast", (kind, dtype, pow2)) for kind in native.KINDS
             for dtype in (torch.bfloat16, torch.float16, torch.float32) for pow2 in (False, True)]

    def build(job):
        what, args = job
        if what == "gemm":
            return compile_kernel(*args)
        return compiler.compile_cubin(native.compiled_name(*args), native.render_source(*args))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for i, kernel in enumerate(pool.map(build, jobs), 1):
            print(f"[{i}/{len(jobs)}] {kernel.name} {'cached' if kernel.cached else f'{kernel.compile_seconds:.1f} s'}",
                  flush=True)
    print(f"{len(jobs)} kernels in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
