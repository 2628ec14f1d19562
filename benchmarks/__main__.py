"""Benchmarks on a Hopper GPU: ``python -m benchmarks gemm|grouped|linear|moe|mlp|quant|hf``, run
from the root of a source checkout (they are not part of the installed package).

Each suite first checks correctness against the reference, then prints its table; ratios
are always against baselines measured in the same run.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=["gemm", "grouped", "linear", "moe", "mlp", "quant", "hf"],
                        help="which benchmark to run")
    parser.add_argument("--shapes", default=None,
                        help="only these shapes, e.g. '4096,7168,2048;128,2112,7168'")
    parser.add_argument("--models", default=None,
                        help="hf suite: only these models, e.g. 'llama-1b,qwen3-moe-1b'")
    parser.add_argument("--eager-only", action="store_true",
                        help="hf suite: skip the compiled rows (each compiles every layer)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("benchmarks needs an sm_90 (Hopper) GPU", file=sys.stderr)
        return 2
    if args.suite == "gemm":
        from .gemm import run

        return run(args.shapes, args.json)
    if args.suite == "grouped":
        from .grouped import run as run_grouped

        return run_grouped(args.json)
    if args.suite == "quant":
        from .quant import run as run_quant

        return run_quant(args.json)
    if args.suite in ("linear", "moe", "mlp"):
        from .layers import run_suite

        return run_suite(args.suite, args.json)
    if args.suite == "hf":
        from .hf import run as run_hf  # needs transformers (the hf extra)

        return run_hf(args.models, args.json, compiled=(False,) if args.eager_only else (False, True))
    return 1


if __name__ == "__main__":
    sys.exit(main())
