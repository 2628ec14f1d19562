"""List the kernel configs the heuristic picks, without a GPU:

    python -m fp8train.ops.native --shapes "4096,7168,2048;64,2112,7168" [--kind 1d1d] [--num-sms 114]
"""
from __future__ import annotations

import argparse
import sys

from .gemm_config import choose_config, shared_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8train.ops.native", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", required=True, help="'M,N,K;M,N,K'")
    parser.add_argument("--kind", choices=["1d2d", "1d1d"], default="1d2d",
                        help="B scales 128x128 (1d2d, default) or 1x128 (1d1d)")
    parser.add_argument("--num-sms", type=int, default=132, help="SMs to plan for (H100: 132)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    except ValueError:
        parser.error(f"--shapes: expected 'M,N,K;...', got {args.shapes!r}")
    if any(len(s) != 3 for s in shapes):
        parser.error(f"--shapes: every shape needs M,N,K, got {args.shapes!r}")
    rows = [(s, args.kind) for s in shapes]
    print(f"{'kind':5} {'M':>6} {'N':>6} {'K':>6} | BM  BN  stages CTAs group cluster | smem")
    for (m, n, k), kind in rows:
        try:
            c = choose_config(m, n, k, args.num_sms, kind)
        except ValueError as exc:
            print(f"{kind:5} {m:>6} {n:>6} {k:>6} | {exc}")
            continue
        smem = shared_bytes(c.block_m, c.block_n, c.num_stages, kind)
        print(f"{kind:5} {m:>6} {n:>6} {k:>6} | {c.block_m:3} {c.block_n:3} {c.num_stages:6} "
              f"{c.num_ctas:4} {c.group_n:5} {c.cluster:7} | {smem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
