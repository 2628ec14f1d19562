"""``python -m benchmarks grouped``: the grouped (MoE) FP8 GEMMs.

m-grouped contiguous: native (checked against the reference first; on 256-row segments
where every expert's rows are a multiple of 256) vs a loop of cuBLAS
blockwise ``_scaled_mm`` per expert (same operands), ``torch._scaled_grouped_mm`` (rowwise
FP8), ``torch._grouped_mm`` (bf16) and DeepGEMM (same operands, where importable), on even
splits and a Zipf-like uneven one (also on the 256-row segments the MoE layers would pad
it to, charged the 128-row layout's FLOPs). m-grouped masked: native at expected rows 64/128/256 per
expert vs the contiguous kernel on the same rows and DeepGEMM's masked GEMM. k-grouped
wgrad: see ``grouped_wgrad``.
"""
from __future__ import annotations

import json
import statistics

import torch

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.quant import per_block_cast, per_token_cast
from . import deepgemm
from fp8train.nn.moe_layout import segment_rows_for
from .kernel_list import segment_rows_of
from .timing import graphed_or_none, num_input_sets, time_candidates

SHAPES = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168),
          (8, 4096, 7168, 2048), (32, 1024, 4096, 7168), (64, 512, 2048, 7168)]


def zipf_rows(groups: int, total: int, seed: int = 0) -> list[int]:
    """Rows per expert from a Zipf-like router, each rounded up to 128 (empty allowed)."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, groups + 1, dtype=torch.float64) ** 1.1
    weights = weights[torch.randperm(groups, generator=gen)]
    rows = (weights / weights.sum() * total).floor().long().tolist()
    return [-(-r // 128) * 128 for r in rows]


def _operands(rows: list[int], n: int, k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m = sum(rows)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(len(rows), n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    offsets = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return x, w, offsets, per_token_cast(x), per_block_cast(w)


def _rowwise_fp8(t: torch.Tensor):
    amax = t.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return (t.float() * (448.0 / amax)).to(torch.float8_e4m3fn), (amax / 448.0).squeeze(-1)


def run_case(label: str, rows: list[int], n: int, k: int) -> dict:
    m = sum(rows)
    flops = 2 * m * n * k
    sets = [_operands(rows, n, k, seed) for seed in range(num_input_sets(m * k + len(rows) * n * k, 8))]
    x, w, offsets, a, b = sets[0]
    # 256-row segments where every expert's rows allow (as the MoE layers lay out experts
    # averaging >= TALL_SEGMENT_MIN_ROWS rows): the native kernel may then take 256-row tiles.
    seg = segment_rows_of(*rows)
    expect = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ref.m_grouped_contiguous_ref(a[0], a[1], b[0], b[1], offsets.tolist(), expect)
    ops.set_backend("native")
    got = ops.m_grouped_fp8_gemm_nt_contiguous(a, b, offsets, segment_rows=seg)
    torch.cuda.synchronize()
    err = ((got.double() - expect.double()).norm() / expect.double().norm()).item()
    row = {"case": label, "m": m, "n": n, "k": k, "segment_rows": seg, "rel_err": err, "ok": err < 4e-3}
    bounds = [(int(offsets[g]), int(offsets[g + 1])) for g in range(len(rows))]
    candidates = {
        "native": [lambda s=s: ops.m_grouped_fp8_gemm_nt_contiguous(s[3], s[4], s[2], segment_rows=seg)
                   for s in sets],
    }
    # One cuBLAS call per expert, replayed from a CUDA graph: the GPU's time, not the host's
    # (64 launches could not be queued fast enough to keep the GPU busy).
    loop = graphed_or_none(label, "cublas loop", [lambda s=s: [torch._scaled_mm(
        s[3][0][lo:hi], s[4][0][g].t(), s[3][1][lo:hi].t().contiguous().t(), s[4][1][g].t(),
        out_dtype=torch.bfloat16) for g, (lo, hi) in enumerate(bounds) if hi > lo] for s in sets])
    if loop:
        candidates["cublas loop"] = loop
    rowwise = []
    for s in sets:
        xa, xs = _rowwise_fp8(s[0])
        wb, ws = _rowwise_fp8(s[1])
        rowwise.append((xa, xs, wb.transpose(-2, -1), ws, s[2][1:]))
    candidates["scaled_grouped_mm rowwise"] = [lambda r=r: torch._scaled_grouped_mm(
        r[0], r[2], r[1], r[3], offs=r[4], out_dtype=torch.bfloat16) for r in rowwise]
    candidates["grouped_mm bf16"] = [lambda s=s: torch._grouped_mm(
        s[0], s[1].transpose(-2, -1), offs=s[2][1:]) for s in sets]
    deep = [deepgemm.m_grouped_contiguous(s[3], s[4], s[2], torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
            for s in sets]
    if all(deep):
        candidates["DeepGEMM"] = deep
    if seg == 128 and segment_rows_for(m, len(rows)) == 256:
        # Uneven splits: the MoE layers pad such experts to 256 rows and take 256-row tiles.
        # Charged the FLOPs of the 128-row layout, so the extra padding counts against it.
        rows256 = [-(-r // 256) * 256 for r in rows]
        padded = [_operands(rows256, n, k, seed) for seed in range(len(sets))]
        p = padded[0]
        expect256 = torch.empty(sum(rows256), n, device="cuda", dtype=torch.bfloat16)
        ref.m_grouped_contiguous_ref(p[3][0], p[3][1], p[4][0], p[4][1], p[2].tolist(), expect256)
        got256 = ops.m_grouped_fp8_gemm_nt_contiguous(p[3], p[4], p[2], segment_rows=256)
        err256 = ((got256.double() - expect256.double()).norm() / expect256.double().norm()).item()
        row["ok"] = row["ok"] and err256 < 4e-3
        candidates["native 256-row layout"] = [
            lambda s=s: ops.m_grouped_fp8_gemm_nt_contiguous(s[3], s[4], s[2], segment_rows=256)
            for s in padded]
    row.update(time_candidates(label, candidates, flops))
    ops.set_backend("auto")
    return row


def run_masked_case(g: int, expected: int, n: int, k: int) -> dict:
    """Every expert holds `expected` valid rows of M_max = 2 x expected: masked native vs the
    contiguous kernel on the same rows (the bar: within 10%), and the batched baselines."""
    m_max = 2 * expected
    flops = 2 * g * expected * n * k
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_sets = num_input_sets(g * m_max * k + g * n * k, 8)
    sets = []
    for _ in range(num_sets):
        x = torch.randn(g, m_max, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        sets.append((x, w, per_token_cast(x), per_block_cast(w)))
    masked_m = torch.full((g,), expected, dtype=torch.int32, device="cuda")
    x, w, a, b = sets[0]
    expect = torch.zeros(g, m_max, n, device="cuda", dtype=torch.bfloat16)
    ref.m_grouped_masked_ref(a[0], a[1], b[0], b[1], [expected] * g, expect)
    ops.set_backend("native")
    got = ops.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m=expected)
    torch.cuda.synchronize()
    err = ((got.double() - expect.double()).norm() / expect.double().norm()).item()
    row = {"case": f"masked {g}x{expected} {n},{k}", "m": g * expected, "n": n, "k": k,
           "rel_err": err, "ok": err < 4e-3}
    # The same valid rows, packed contiguously (expected is a multiple of 64; pad to 128).
    padded = -(-expected // 128) * 128
    offsets = torch.arange(g + 1, dtype=torch.int32, device="cuda") * padded
    contiguous = [((s[2][0][:, :padded].reshape(-1, k), s[2][1][:, :padded].reshape(g * padded, -1)),
                   s[3]) for s in sets]
    valid = [s[0][:, :expected].contiguous() for s in sets]
    # Into a given output, as DeepGEMM's row and the contiguous one (which allocates without
    # a fill) run; the allocating call also zero-fills G x M_max x N (rows past masked_m
    # read as zeros), timed beside it.
    outs = [torch.empty(g, m_max, n, device="cuda", dtype=torch.bfloat16) for _ in sets]
    candidates = {
        "native masked": [lambda s=s, o=o: ops.m_grouped_fp8_gemm_nt_masked(
            s[2], s[3], masked_m, o, expected_m=expected) for s, o in zip(sets, outs)],
        "native masked, allocating": [lambda s=s: ops.m_grouped_fp8_gemm_nt_masked(
            s[2], s[3], masked_m, expected_m=expected) for s in sets],
        "native contiguous": [lambda c=c: ops.m_grouped_fp8_gemm_nt_contiguous(
            c[0], c[1], offsets, segment_rows=segment_rows_of(padded)) for c in contiguous],
        "grouped_mm bf16": [lambda v=v, s=s: torch._grouped_mm(v, s[1].transpose(-2, -1))
                            for v, s in zip(valid, sets)],
    }
    deep = [deepgemm.m_grouped_masked(s[2], s[3], masked_m, expected,
                                      torch.empty(g, m_max, n, device="cuda", dtype=torch.bfloat16)) for s in sets]
    if all(deep):
        candidates["DeepGEMM masked"] = deep
    # Contiguous computes the padded rows too; count only the valid ones everywhere.
    row.update(time_candidates(row["case"], candidates, flops))
    ops.set_backend("auto")
    return row


def run(json_path: str | None) -> int:
    from .grouped_wgrad import run_wgrad

    rows_out = []
    cases = [(f"{g}x{r} {n},{k}", [r] * g, n, k) for g, r, n, k in SHAPES]
    cases += [(f"zipf {g} {n},{k}", zipf_rows(g, g * r), n, k) for g, r, n, k in SHAPES[2:4]]
    for label, rows, n, k in cases:
        row = run_case(label, rows, n, k)
        rows_out.append(row)
        native = row.get("native", float("nan"))
        print(f"{label:>22} {'ok ' if row['ok'] else 'BAD'} err {row['rel_err']:.1e} | native {native:6.0f} (seg {row['segment_rows']})"
              + "".join(f" | {name} {row[name]:6.0f} ({native / row[name]:.2f}x)"
                        for name in ("cublas loop", "scaled_grouped_mm rowwise", "grouped_mm bf16", "DeepGEMM")
                        if name in row), flush=True)
        if "native 256-row layout" in row:
            tall = row["native 256-row layout"]
            print(f"{'':>22} native on the MoE layers' 256-row layout {tall:6.0f}"
                  + "".join(f" | {tall / row[name]:.2f}x {name}" for name in ("cublas loop", "DeepGEMM")
                            if name in row), flush=True)
    ratios = [r["native"] / r["scaled_grouped_mm rowwise"] for r in rows_out
              if "native" in r and "scaled_grouped_mm rowwise" in r]
    if ratios:
        print(f"median native / scaled_grouped_mm rowwise: {statistics.median(ratios):.2f}")
    for g, _, n, k in SHAPES:
        for expected in (64, 128, 256):
            row = run_masked_case(g, expected, n, k)
            rows_out.append(row)
            masked = row.get("native masked", float("nan"))
            print(f"{row['case']:>28} {'ok ' if row['ok'] else 'BAD'} err {row['rel_err']:.1e} | masked "
                  f"{masked:6.0f}" + "".join(f" | {name} {row[name]:6.0f} ({masked / row[name]:.2f}x)"
                                             for name in ("native masked, allocating", "native contiguous",
                                                          "grouped_mm bf16", "DeepGEMM masked")
                                             if name in row), flush=True)
    rows_out += run_wgrad(SHAPES)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 0 if all(r["ok"] for r in rows_out) else 1
