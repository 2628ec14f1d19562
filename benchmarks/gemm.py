"""``python -m benchmarks gemm``: correctness, then speed of the dense FP8 GEMMs.

Native vs cuBLAS blockwise (``torch._scaled_mm`` with the same FP8 operands and scales),
DeepGEMM on the same operands where it is importable, cuBLAS tensorwise FP8 and bf16
``torch.matmul``, timed as DESIGN.md's anchors were.
"""
from __future__ import annotations

import json
import math
import statistics

import torch

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.ops.native.gemm_config import choose_config
from fp8train.quant import per_block_cast, per_token_cast
from . import deepgemm
from .timing import num_input_sets, paired_ratio, time_calls

# DESIGN.md's anchor shapes (M, N, K), two of the training step's, and a 1B Llama's (8192
# tokens, hidden 2048, MLP 8192, 8 KV heads of 128: fprop and dgrad; its wgrad below).
DENSE_1D2D = [
    (64, 2112, 7168), (64, 4096, 7168), (64, 32768, 512), (64, 24576, 1536), (64, 7168, 16384),
    (64, 7168, 2048), (128, 2112, 7168), (128, 24576, 1536), (128, 32768, 512), (128, 7168, 16384),
    (128, 4096, 7168), (128, 7168, 2048), (4096, 2112, 7168), (4096, 24576, 1536),
    (4096, 32768, 512), (4096, 7168, 16384), (4096, 4096, 7168), (4096, 7168, 2048),
    (8192, 8192, 8192), (16384, 7168, 2048), (16384, 2048, 7168), (4000, 2112, 7168),
    (8192, 2048, 2048), (8192, 1024, 2048), (8192, 8192, 2048), (8192, 2048, 8192), (8192, 2048, 1024),
]
WGRAD_1D1D = [(7168, 2048, 16384), (2048, 7168, 16384), (4096, 4096, 32768), (4096, 14336, 16384),
              (2048, 2048, 8192), (1024, 2048, 8192), (8192, 2048, 8192), (2048, 8192, 8192)]
HBM_BYTES_PER_S = 3.35e12


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def roofline_pct(m, n, k, seconds, out_bytes=2) -> float:
    """Share of the HBM roofline for a GEMM bound by reading its operands once."""
    moved = m * k + n * k + 4 * (m * k // 128 + math.ceil(n / 128) * k // 128) + out_bytes * m * n
    flops_at_roofline = 2 * m * n * k / (moved / HBM_BYTES_PER_S)
    return 100 * (2 * m * n * k / seconds) / flops_at_roofline


def _operands(m, n, k, kind, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    a = per_token_cast(x)
    b = per_block_cast(w) if kind == "1d2d" else per_token_cast(w)
    return x, w, a, b


def _check(m, n, k, kind):
    """Native output vs the reference emulation: every element written, no NaN, and the
    relative error within what the output's rounding and the tensor cores' FP32 give."""
    x, w, a, b = _operands(m, n, k, kind, seed=m * 7 + n)
    out_dtype = torch.bfloat16 if kind == "1d2d" else torch.float32
    expect = ref.fp8_gemm_nt_ref(a[0], a[1], b[0], b[1])
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    ops.fp8_gemm_nt(a, b, out, backend="native")
    torch.cuda.synchronize()
    err = rel_err(out, expect)
    limit = 4e-3 if out_dtype == torch.bfloat16 else 1e-3
    ok = not torch.isnan(out).any().item() and err < limit
    if kind == "1d1d":  # accumulate: out + new
        base = torch.randn(m, n, device="cuda")
        acc = base.clone()
        ops.fp8_gemm_nt(a, b, acc, accumulate=True, backend="native")
        acc_err = rel_err(acc, base + expect)
        ok = ok and acc_err < limit
    return ok, err


def _bench_1d2d(m, n, k):
    per_set = m * k + n * k + 2 * m * n
    sets = [_operands(m, n, k, "1d2d", seed=i) for i in range(num_input_sets(per_set))]
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in sets]
    native = [lambda s=s: ops.fp8_gemm_nt(s[2], s[3], backend="native") for s in sets]
    # What a user gets: `auto` (cuBLAS or native, as dispatch decides), with and without out=.
    auto = [lambda s=s: ops.fp8_gemm_nt(s[2], s[3], backend="auto") for s in sets]
    auto_out = [lambda s=s, o=o: ops.fp8_gemm_nt(s[2], s[3], o, backend="auto") for s, o in zip(sets, outs)]
    cublas_args = [(s[2][0], s[3][0].t(), s[2][1].t().contiguous().t(), s[3][1].t()) for s in sets]
    cublas = [lambda c=c: torch._scaled_mm(c[0], c[1], c[2], c[3], out_dtype=torch.bfloat16)
              for c in cublas_args]
    cublas_out = [lambda c=c, o=o: torch._scaled_mm(c[0], c[1], c[2], c[3], out_dtype=torch.bfloat16, out=o)
                  for c, o in zip(cublas_args, outs)]
    one = torch.ones((), device="cuda")
    tw_args = [(s[0].to(torch.float8_e4m3fn), s[1].to(torch.float8_e4m3fn).t()) for s in sets]
    tensorwise = [lambda c=c: torch._scaled_mm(c[0], c[1], one, one, out_dtype=torch.bfloat16,
                                               use_fast_accum=True) for c in tw_args]
    bf16 = [lambda s=s: torch.matmul(s[0], s[1].t()) for s in sets]
    candidates = [("native", native), ("cublas", cublas), ("auto", auto), ("cublas_out", cublas_out),
                  ("auto_out", auto_out), ("tensorwise", tensorwise), ("bf16", bf16)]
    deep = [deepgemm.dense_1d2d(s[2], s[3], o) for s, o in zip(sets, outs)]
    if all(deep):
        candidates.append(("deepgemm", deep))
    times = {name: time_calls(fns) for name, fns in candidates}
    # What `auto` costs over cuBLAS called directly (throughput ratios: direct time / auto's).
    paired = {"auto_vs_cublas": 1 / paired_ratio(auto, cublas),
              "auto_out_vs_cublas_out": 1 / paired_ratio(auto_out, cublas_out)}
    return times, paired


def _bench_1d1d(m, n, k):
    per_set = m * k + n * k + 4 * m * n
    sets = [_operands(m, n, k, "1d1d", seed=i) for i in range(num_input_sets(per_set))]
    outs = [torch.empty(m, n, device="cuda") for _ in sets]
    native = [lambda s=s, o=o: ops.fp8_gemm_nt(s[2], s[3], o, backend="native") for s, o in zip(sets, outs)]
    cublas_args = [(s[2][0], s[3][0].t(), s[2][1].t().contiguous().t(), s[3][1].t().contiguous())
                   for s in sets]
    cublas = [lambda c=c: torch._scaled_mm(c[0], c[1], c[2], c[3], out_dtype=torch.float32)
              for c in cublas_args]
    return {name: time_calls(fns) for name, fns in (("native", native), ("cublas", cublas))}, {}


def _auto_path(m, n, k) -> str:
    """The path `auto` takes for this shape ("cublas" or "native")."""
    x, w, a, b = _operands(m, n, k, "1d2d", seed=0)
    plan = ops.gemm._plan_fp8_gemm_nt(a, b, None, torch.bfloat16, False, "auto")
    return plan[0]


def _tflops(m, n, k, ms):
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def run(shapes: str | None, json_path: str | None) -> int:
    dense = list(DENSE_1D2D)
    wgrad = list(WGRAD_1D1D)
    if shapes:
        wanted = [tuple(int(v) for v in s.split(",")) for s in shapes.split(";")]
        dense = [s for s in wanted if s in DENSE_1D2D or s not in WGRAD_1D1D]
        wgrad = [s for s in wanted if s in WGRAD_1D1D]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}, {num_sms} SMs, torch {torch.__version__}")
    rows, failures = [], 0
    for kind, shape_list in (("1d2d", dense), ("1d1d", wgrad)):
        for m, n, k in shape_list:
            ok, err = _check(m, n, k, kind)
            failures += not ok
            times, paired = _bench_1d2d(m, n, k) if kind == "1d2d" else _bench_1d1d(m, n, k)
            row = {"kind": kind, "m": m, "n": n, "k": k, "ok": ok, "rel_err": err,
                   "config": str(choose_config(m, n, k, num_sms, kind))}
            for name, (ms, host_us) in times.items():
                row[f"{name}_tflops"] = _tflops(m, n, k, ms)
                row[f"{name}_host_us"] = host_us
            row["ratio"] = row["native_tflops"] / row["cublas_tflops"]
            row.update(paired)
            if kind == "1d2d":
                row["auto_path"] = _auto_path(m, n, k)
            if "deepgemm_tflops" in row:
                row["native_vs_deepgemm"] = row["native_tflops"] / row["deepgemm_tflops"]
            if m <= 128:
                row["roofline_pct"] = roofline_pct(m, n, k, 2 * m * n * k / (row["native_tflops"] * 1e12))
            rows.append(row)
            _print_row(row)
    _print_summary(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


def _print_row(r):
    extra = ""
    if r["kind"] == "1d2d":
        extra = (f" auto({r['auto_path']}) {r['auto_vs_cublas']:.2f}/{r['auto_out_vs_cublas_out']:.2f}x"
                 f" tw {r['tensorwise_tflops']:6.0f} bf16 {r['bf16_tflops']:5.0f}"
                 + (f" DeepGEMM {r['deepgemm_tflops']:5.0f} ours/DG {r['native_vs_deepgemm']:.2f}"
                    if "native_vs_deepgemm" in r else ""))
    roof = f" roof {r['roofline_pct']:3.0f}%" if "roofline_pct" in r else "          "
    print(f"{r['kind']} {r['m']:>5} {r['n']:>5} {r['k']:>5} {'ok ' if r['ok'] else 'BAD'} "
          f"err {r['rel_err']:.1e} | native {r['native_tflops']:6.0f} cublas {r['cublas_tflops']:6.0f} "
          f"ratio {r['ratio']:.2f}{extra}{roof} | host us {r['native_host_us']:5.1f} / "
          f"{r['cublas_host_us']:5.1f} | {r['config']}", flush=True)


def _print_summary(rows):
    for kind in ("1d2d", "1d1d"):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        ratios = [r["ratio"] for r in sel]
        print(f"{kind}: median native/cuBLAS {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"max native {max(r['native_tflops'] for r in sel):.0f} TFLOP/s, "
              f"median host us {statistics.median(r['native_host_us'] for r in sel):.1f}, "
              f"all correct: {all(r['ok'] for r in sel)}")
        routed = [r for r in sel if r.get("auto_path") == "cublas"]
        if routed:
            print(f"{kind}: auto on cuBLAS vs cuBLAS direct, worst {min(r['auto_vs_cublas'] for r in routed):.3f}x "
                  f"(out=: {min(r['auto_out_vs_cublas_out'] for r in routed):.3f}x) over {len(routed)} shapes")
        deep = [r["native_vs_deepgemm"] for r in sel if "native_vs_deepgemm" in r]
        if deep:
            print(f"{kind}: median native/DeepGEMM {statistics.median(deep):.3f}, min {min(deep):.3f}, "
                  f"max {max(deep):.3f} over {len(deep)} shapes")
        small = [r for r in sel if "roofline_pct" in r]
        if small:
            print(f"{kind}: M<=128 roofline min {min(r['roofline_pct'] for r in small):.0f}%")
