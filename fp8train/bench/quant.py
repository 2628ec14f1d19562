"""``python -m fp8train.bench quant``: effective bandwidth of the FP8 casts (issue 5).

Effective GB/s = (bytes read + bytes written) / time. Next to each cast: a device-to-device
copy of the same input (the ceiling) and ``torch.compile`` of the reference cast, all
measured in this run. The native casts are checked bit-exact against the reference first.
"""
from __future__ import annotations

import json

import torch

from ..quant import native
from ..quant.reference import dual_cast_ref, per_token_cast_ref
from .timing import num_input_sets, time_calls

SHAPES = [(16384, 4096), (16384, 7168), (32768, 2048), (4096, 14336)]  # [T, K], bf16 inputs


def _bytes(t: int, k: int, dual: bool) -> int:
    tp = -(-t // 128) * 128
    read = 2 * t * k
    rowwise = t * k + 4 * t * -(-k // 128)
    colwise = k * tp + 4 * k * (tp // 128)
    return read + rowwise + (colwise if dual else 0)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _bit_exact(got, want) -> bool:
    for g, w in zip(got, want):
        if g is None:
            continue
        if g.dtype == torch.float8_e4m3fn:
            if not torch.equal(g.view(torch.uint8), w.view(torch.uint8)):
                return False
        elif not (torch.equal(g, w) or torch.equal(g.isnan(), w.isnan())):
            return False
    return True


def run(json_path: str | None) -> int:
    rows, failures = [], 0
    compiled_row = torch.compile(per_token_cast_ref)
    compiled_dual = torch.compile(dual_cast_ref)
    for t, k in SHAPES:
        sets = [torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
                for _ in range(num_input_sets(2 * t * k, limit=8))]
        ok = _bit_exact(native.dual_cast(sets[0], False), dual_cast_ref(sets[0], False))
        failures += not ok
        copies = [torch.empty_like(x) for x in sets]
        timings = {
            "copy": (4 * t * k, [lambda x=x, c=c: c.copy_(x) for x, c in zip(sets, copies)]),
            "rowwise native": (_bytes(t, k, False),
                               [lambda x=x: native.dual_cast(x, False, colwise=False) for x in sets]),
            "rowwise compiled ref": (_bytes(t, k, False), [lambda x=x: compiled_row(x) for x in sets]),
            "dual native": (_bytes(t, k, True), [lambda x=x: native.dual_cast(x, False) for x in sets]),
            "dual compiled ref": (_bytes(t, k, True), [lambda x=x: compiled_dual(x) for x in sets]),
        }
        row = {"shape": [t, k], "bit_exact": ok}
        for name, (nbytes, calls) in timings.items():
            try:
                ms, _ = time_calls(calls, batch=20)
                row[name] = _gbps(nbytes, ms)
            except Exception as exc:  # keep the rest of the table if one baseline fails
                print(f"[{t}x{k}] {name}: failed ({type(exc).__name__}: {exc})", flush=True)
        copy = row.get("copy") or float("nan")
        print(f"[{t:>5}x{k:>5}] {'exact' if ok else 'NOT BIT-EXACT'} | copy {copy:6.0f} GB/s | "
              + " | ".join(f"{n} {row[n]:6.0f} ({row[n] / copy:4.0%})" for n in timings
                           if n != "copy" and n in row), flush=True)
        rows.append(row)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0
