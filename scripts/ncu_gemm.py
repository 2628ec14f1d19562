"""One 1D2D GEMM call for Nsight Compute to profile, ours or DeepGEMM's (device only), and
the side-by-side table of two profiles:

    PYTHONPATH=.:.deepgemm python scripts/ncu_gemm.py run ours|deepgemm M N K [BM BN]
    PYTHONPATH=.:.deepgemm python scripts/ncu_gemm.py run-grouped ours|deepgemm G ROWS N K
    PYTHONPATH=. python scripts/ncu_gemm.py run-masked masked|contiguous G ROWS N K
    python scripts/ncu_gemm.py table a.csv b.csv [NAME_A NAME_B]   # markdown, metric by metric

`run-grouped` is the m-grouped contiguous GEMM, G experts of ROWS rows each (256-row segments
where ROWS allows, as the MoE layers lay them out). `bash scripts/ncu_compare.sh M N K`, or
`bash scripts/ncu_compare.sh grouped G ROWS N K`, runs both under ncu and prints the table.
`run-masked` is our m-grouped masked GEMM (G experts of ROWS valid rows in M_max = 2 x ROWS)
or our contiguous GEMM on the same rows, as `bench grouped` compares them
(`bash scripts/ncu_compare.sh masked G ROWS N K`).
"""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/


def run(which: str, m: int, n: int, k: int, tile: list) -> None:
    import torch

    from benchmarks import deepgemm
    from fp8train.ops.native.gemm_config import GemmConfig, choose_config, deepest_stages
    from fp8train.ops.native.sm90_fp8_gemm import fp8_gemm_nt_native
    from fp8train.quant import per_block_cast, per_token_cast

    a = per_token_cast(torch.randn(m, k, device="cuda"))
    b = per_block_cast(torch.randn(n, k, device="cuda"))
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    if which == "deepgemm":
        call = deepgemm.dense_1d2d(a, b, out)
        if call is None:
            sys.exit("deep_gemm is not importable: put .deepgemm on PYTHONPATH")
        call()
    else:
        config = None
        if tile:
            bm, bn = tile
            config = GemmConfig(bm, bn, deepest_stages(bm, bn, "1d2d"), min(132, -(-m // bm) * -(-n // bn)), 8,
                                "1d2d")
        fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False, config)
        print("config:", config or choose_config(m, n, k, 132))
    torch.cuda.synchronize()


def run_grouped(which: str, groups: int, rows: int, n: int, k: int) -> None:
    import torch

    from benchmarks import deepgemm
    from benchmarks.kernel_list import segment_rows_of
    from fp8train import ops
    from fp8train.quant import per_block_cast, per_token_cast

    a = per_token_cast(torch.randn(groups * rows, k, device="cuda"))
    b = per_block_cast(torch.randn(groups, n, k, device="cuda"))
    offsets = torch.arange(0, groups * rows + 1, rows, dtype=torch.int32, device="cuda")
    out = torch.empty(groups * rows, n, device="cuda", dtype=torch.bfloat16)
    if which == "deepgemm":
        call = deepgemm.m_grouped_contiguous(a, b, offsets, out)
        if call is None:
            sys.exit("deep_gemm is not importable: put .deepgemm on PYTHONPATH")
        call()
    else:
        ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, out, segment_rows=segment_rows_of(rows),
                                             backend="native")
    torch.cuda.synchronize()


def run_masked(which: str, groups: int, rows: int, n: int, k: int) -> None:
    import torch

    from benchmarks.kernel_list import segment_rows_of
    from fp8train import ops
    from fp8train.quant import per_block_cast, per_token_cast

    b = per_block_cast(torch.randn(groups, n, k, device="cuda"))
    if which == "masked":
        a = per_token_cast(torch.randn(groups, 2 * rows, k, device="cuda"))
        masked_m = torch.full((groups,), rows, dtype=torch.int32, device="cuda")
        ops.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m=rows, backend="native")
    else:
        padded = -(-rows // 128) * 128
        a = per_token_cast(torch.randn(groups * padded, k, device="cuda"))
        offsets = torch.arange(0, groups * padded + 1, padded, dtype=torch.int32, device="cuda")
        ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, segment_rows=segment_rows_of(padded), backend="native")
    torch.cuda.synchronize()


def _metrics(path: str) -> dict:
    """(section, metric) -> 'value unit' of the one kernel an ncu --csv --page details file holds."""
    rows = {}
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu prints its own lines first
    for row in csv.DictReader(lines):
        key = (row["Section Name"], row["Metric Name"])
        rows.setdefault(key, f"{row['Metric Value']} {row['Metric Unit']}".strip())
    return rows


def table(ours_path: str, theirs_path: str, names=("ours", "DeepGEMM")) -> None:
    ours, theirs = _metrics(ours_path), _metrics(theirs_path)
    print(f"| section | metric | {names[0]} | {names[1]} |\n| --- | --- | --- | --- |")
    for key in ours:
        print(f"| {key[0]} | {key[1]} | {ours[key]} | {theirs.get(key, '-')} |")


if __name__ == "__main__":
    if len(sys.argv) in (6, 8) and sys.argv[1] == "run" and sys.argv[2] in ("ours", "deepgemm"):
        run(sys.argv[2], *(int(v) for v in sys.argv[3:6]), [int(v) for v in sys.argv[6:8]])
    elif len(sys.argv) == 7 and sys.argv[1] == "run-grouped" and sys.argv[2] in ("ours", "deepgemm"):
        run_grouped(sys.argv[2], *(int(v) for v in sys.argv[3:7]))
    elif len(sys.argv) == 7 and sys.argv[1] == "run-masked" and sys.argv[2] in ("masked", "contiguous"):
        run_masked(sys.argv[2], *(int(v) for v in sys.argv[3:7]))
    elif len(sys.argv) in (4, 6) and sys.argv[1] == "table":
        table(sys.argv[2], sys.argv[3], *([tuple(sys.argv[4:6])] if len(sys.argv) == 6 else []))
    else:
        sys.exit(__doc__)
