"""The k-grouped wgrad part of ``python -m benchmarks grouped``.

For each grouped shape (G experts, rows per expert, N, K) of the fprop, the weight gradient
``dW[g] = dY[g]^T X[g]``: a = dY^T ``[N, T]`` and b = X^T ``[K, T]``, both 1x128 along the
T tokens. Native k-grouped (checked against the reference first) vs a loop of cuBLAS
1x128 x 1x128 ``_scaled_mm`` per expert (scales laid out for cuBLAS before timing) and vs
the dense native 1D1D kernel on the same total tokens (same FLOPs, one output).
"""
from __future__ import annotations

import torch

from fp8train import ops
from fp8train.ops import reference as ref
from fp8train.quant import per_token_cast
from .timing import graphed_or_none, num_input_sets, time_candidates


def _operands(g: int, tokens: int, n: int, k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    t = g * tokens
    a = per_token_cast(torch.randn(n, t, device="cuda", dtype=torch.bfloat16, generator=gen))
    b = per_token_cast(torch.randn(k, t, device="cuda", dtype=torch.bfloat16, generator=gen))
    return a, b


def _cublas_loop_args(a, b, g: int, tokens: int):
    """Per expert, made once, outside the timing: (a's columns, b's columns transposed, a's
    scales outer-dim-major, b's scales [Kb, K]), contiguous as cuBLAS wants them."""
    args = []
    for e in range(g):
        cols, blocks = slice(e * tokens, (e + 1) * tokens), slice(e * tokens // 128, (e + 1) * tokens // 128)
        args.append((a[0][:, cols].contiguous(), b[0][:, cols].contiguous().t(),
                     a[1][:, blocks].t().contiguous().t(), b[1][:, blocks].t().contiguous()))
    return args


def run_wgrad_case(g: int, tokens: int, n: int, k: int) -> dict:
    flops = 2 * g * tokens * n * k
    sets = [_operands(g, tokens, n, k, seed) for seed in range(num_input_sets(g * tokens * (n + k), 8))]
    a, b = sets[0]
    offsets = torch.arange(g + 1, dtype=torch.int32, device="cuda") * tokens
    expect = torch.empty(g, n, k, device="cuda")
    ref.k_grouped_contiguous_ref(a[0], a[1], b[0], b[1], offsets.tolist(), expect, False)
    ops.set_backend("native")
    got = ops.k_grouped_fp8_gemm_nt_contiguous(a, b, offsets)
    torch.cuda.synchronize()
    err = ((got.double() - expect.double()).norm() / expect.double().norm()).item()
    row = {"case": f"wgrad {g}x{tokens} {n},{k}", "m": n, "n": k, "k": g * tokens, "rel_err": err,
           "ok": err < 1e-3}
    outs = [torch.empty(g, n, k, device="cuda") for _ in sets]
    dense_out = [torch.empty(n, k, device="cuda") for _ in sets]
    loops = [_cublas_loop_args(s[0], s[1], g, tokens) for s in sets]
    candidates = {
        "native k-grouped": [lambda s=s, o=o: ops.k_grouped_fp8_gemm_nt_contiguous(s[0], s[1], offsets, o)
                             for s, o in zip(sets, outs)],
        "native dense 1d1d": [lambda s=s, o=o: ops.fp8_gemm_nt(s[0], s[1], o, out_dtype=torch.float32)
                              for s, o in zip(sets, dense_out)],
    }
    # Replayed from a CUDA graph: the GPU's time, not the host's queueing of G launches.
    loop = graphed_or_none(row["case"], "cublas loop", [
        lambda args=args: [torch._scaled_mm(x, y, sx, sy, out_dtype=torch.float32) for x, y, sx, sy in args]
        for args in loops])
    if loop:
        candidates["cublas loop"] = loop
    row.update(time_candidates(row["case"], candidates, flops))
    ops.set_backend("auto")
    return row


def run_wgrad(shapes) -> list[dict]:
    rows = []
    for g, tokens, n, k in shapes:
        row = run_wgrad_case(g, tokens, n, k)
        rows.append(row)
        native = row.get("native k-grouped", float("nan"))
        print(f"{row['case']:>28} {'ok ' if row['ok'] else 'BAD'} err {row['rel_err']:.1e} | native "
              f"{native:6.0f}" + "".join(f" | {name} {row[name]:6.0f} ({native / row[name]:.2f}x)"
                                         for name in ("cublas loop", "native dense 1d1d") if name in row),
              flush=True)
    return rows
