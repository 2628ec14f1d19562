"""``python -m benchmarks quant``: effective bandwidth of the FP8 casts.

Effective GB/s = (bytes read + bytes written) / time (the SwiGLU cast reads x as [gate |
up] and writes the two casts of silu(gate) * up; SwiGLU's backward also reads the gradient
and writes the two casts of each of d(gate) and d(up)). Next to each native cast: a
device-to-device copy of the same input (the ceiling) and ``torch.compile`` of the reference
cast, all measured in this run. Every native cast is checked bit-exact against the eager
reference first (the run exits 1 if one is not). The target: each native cast >= 85% of the
copy's GB/s on the large shapes and faster than the compiled reference.
"""
from __future__ import annotations

import json

import torch

from fp8train.nn.moe_layout import build_moe_layout
from fp8train.quant import native
from fp8train.quant.reference import (
    dual_cast_ref,
    per_block_cast_dual_ref,
    per_token_cast_ref,
    permute_cast_ref,
    swiglu_backward_cast_ref,
    swiglu_cast_ref,
)
from .timing import num_input_sets, time_calls

SHAPES = [(16384, 4096), (16384, 7168), (32768, 2048), (4096, 14336)]  # [T, K], bf16 inputs
BAR = 0.85  # of the copy's effective bandwidth
MOE_EXPERTS, MOE_TOP_K = 8, 2  # the permuted cast: T/2 tokens, each sent to 2 of 8 experts


def _rowwise_bytes(rows: int, k: int) -> int:
    return rows * k + 4 * rows * -(-k // 128)  # e4m3 data + float32 scales


def _colwise_bytes(rows: int, k: int) -> int:
    tp = -(-rows // 128) * 128
    return k * tp + 4 * k * (tp // 128)


def _bytes(t: int, k: int, dual: bool) -> int:
    read = 2 * t * k
    return read + _rowwise_bytes(t, k) + (_colwise_bytes(t, k) if dual else 0)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _bit_exact(got, want) -> bool:
    for g, w in zip(got, want):
        if g is None or w is None:
            if (g is None) != (w is None):
                return False
            continue
        if g.dtype == torch.float8_e4m3fn:
            if not torch.equal(g.view(torch.uint8), w.view(torch.uint8)):
                return False
        else:
            nan = w.isnan()
            if not (torch.equal(g.isnan(), nan) and torch.equal(g[~nan], w[~nan])):
                return False
    return True


def _cases(t: int, k: int, src: torch.Tensor, grad: torch.Tensor, ref):
    """name -> (bytes moved, native cast of x, reference cast of x) for [T, K] bf16 inputs;
    ``ref`` maps each reference function to what to call for it (itself, or its compiled
    version), ``src`` is the MoE layout's src_tokens for the permuted casts, ``grad`` [T, K/2]
    the gradient SwiGLU's backward takes with x as [gate | up]."""
    tokens, m = t // 2, src.shape[0]
    weight_bytes = 2 * t * k + 2 * (t * k + 4 * -(-t // 128) * -(-k // 128))
    # Each assignment reads its token's row (2 bytes an element) and its int64 index.
    permuted_bytes = 2 * k * tokens * MOE_TOP_K + 8 * m + _rowwise_bytes(m, k)
    per_token, dual = ref[per_token_cast_ref], ref[dual_cast_ref]
    block, permuted, swiglu = ref[per_block_cast_dual_ref], ref[permute_cast_ref], ref[swiglu_cast_ref]
    swiglu_backward = ref[swiglu_backward_cast_ref]
    # SwiGLU's backward: x read as [gate | up] and the gradient [T, I] beside it; d(gate)'s and
    # d(up)'s two casts written.
    swiglu_backward_bytes = 3 * t * k + 2 * (_rowwise_bytes(t, k // 2) + _colwise_bytes(t, k // 2))
    # SwiGLU: x read as [gate | up], I = K/2; the product's two casts written.
    swiglu_bytes = 2 * t * k + _rowwise_bytes(t, k // 2) + _colwise_bytes(t, k // 2)
    return {
        "per-token": (_bytes(t, k, False), lambda x: native.per_token_cast(x, False),
                      lambda x: per_token(x, False)),
        "dual": (_bytes(t, k, True), lambda x: native.dual_cast(x, False), lambda x: dual(x, False)),
        "weight+T": (weight_bytes, lambda x: native.block_cast(x, False, plain=True, transposed=True),
                     lambda x: block(x, False)),
        "permuted": (permuted_bytes,
                     lambda x: native.per_token_cast(x[:tokens], False, src_rows=src, num_rows=m),
                     lambda x: permuted(x[:tokens], src, False)),
        "permuted dual": (permuted_bytes + _colwise_bytes(m, k),
                          lambda x: native.dual_cast(x[:tokens], False, src_rows=src, num_rows=m),
                          lambda x: permuted(x[:tokens], src, False, True)),
        "swiglu dual": (swiglu_bytes, lambda x: native.swiglu_dual_cast(*x.chunk(2, dim=-1), False),
                        lambda x: swiglu(*x.chunk(2, dim=-1), False)),
        "swiglu bwd dual": (swiglu_backward_bytes,
                            lambda x: tuple(out for pair in native.swiglu_backward_dual_cast(
                                grad, *x.chunk(2, dim=-1), False) for out in pair),
                            lambda x: swiglu_backward(grad, *x.chunk(2, dim=-1), False)),
    }


def _time(calls) -> float | None:
    try:
        return time_calls(calls, batch=20)[0]
    except Exception as exc:  # keep the rest of the table if one baseline fails
        print(f"    failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def run(json_path: str | None) -> int:
    rows, failures = [], 0
    references = (per_token_cast_ref, dual_cast_ref, per_block_cast_dual_ref, permute_cast_ref, swiglu_cast_ref,
                  swiglu_backward_cast_ref)
    eager = {f: f for f in references}
    # One compiled function per reference, shared by the shapes (dynamo recompiles per shape
    # as it needs), so the run compiles a handful of graphs, not one per case and shape.
    compiled = {f: torch.compile(f) for f in references}
    for t, k in SHAPES:
        sets = [torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
                for _ in range(num_input_sets(2 * t * k, limit=8))]
        copies = [torch.empty_like(x) for x in sets]
        copy_ms = _time([lambda x=x, c=c: c.copy_(x) for x, c in zip(sets, copies)])
        copy = _gbps(4 * t * k, copy_ms) if copy_ms else float("nan")
        print(f"[{t:>5}x{k:>5}] copy {copy:6.0f} GB/s", flush=True)
        ids = torch.randint(0, MOE_EXPERTS, (t // 2, MOE_TOP_K), device="cuda")
        src = build_moe_layout(ids, MOE_EXPERTS).src_tokens
        grad = torch.randn(t, k // 2, device="cuda", dtype=torch.bfloat16)  # one for both case sets
        checks = _cases(t, k, src, grad, eager)
        row = {"shape": [t, k], "copy": copy}
        for name, (nbytes, cast, fn) in _cases(t, k, src, grad, compiled).items():
            ok = _bit_exact(cast(sets[0]), checks[name][2](sets[0]))
            failures += not ok
            ms_native = _time([lambda x=x: cast(x) for x in sets])
            ms_ref = _time([lambda x=x: fn(x) for x in sets])
            gb_native = _gbps(nbytes, ms_native) if ms_native else float("nan")
            gb_ref = _gbps(nbytes, ms_ref) if ms_ref else float("nan")
            meets = gb_native >= BAR * copy and gb_native > gb_ref
            row[name] = {"bit_exact": ok, "native": gb_native, "compiled_ref": gb_ref,
                         "meets_bar": meets}
            print(f"    {name:<16} {'exact' if ok else 'NOT BIT-EXACT'} | native {gb_native:6.0f} "
                  f"GB/s ({gb_native / copy:4.0%} of copy) | compiled ref {gb_ref:6.0f} "
                  f"({gb_ref / copy:4.0%}) | {'meets' if meets else 'misses'} the bar", flush=True)
        rows.append(row)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0
