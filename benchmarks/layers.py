"""``python -m benchmarks linear|moe|mlp``: forward+backward of the FP8 modules against the
same modules in BF16, timed on the GPU the way DESIGN.md times the anchors. ``mlp`` is a
SwiGLU MLP (gate, up, down) run as one FP8 Function (``swiglu_mlp``: silu(gate) * up made
inside the down projection's casts, SwiGLU's gradients inside the gate and up projections'),
timed beside the same FP8 layers as three Functions, with the product fused and without
(what each fusion saves); ``moe`` likewise times the FP8 experts as two grouped-layer
Functions beside the one expert-block Function.

Each row also checks the FP8 layer's output and gradients against the BF16 layer (relative
error within FP8 bounds) before timing, and reports peak memory of one step.
"""
from __future__ import annotations

import copy
import json
import statistics

import torch
import torch.nn as nn

from fp8train import ops
import torch.nn.functional as F

from fp8train.nn import FP8Linear, FP8MoE, MoE, SwiGLUMLP, swiglu_linear
from .tensorwise_linear import tensorwise_twin, torchao_twin
from .timing import time_calls

LINEAR_SHAPES = [(16384, 4096, 14336), (16384, 7168, 2048), (8192, 8192, 8192)]  # (T, K, N)
LINEAR_BARS = {(16384, 4096, 14336): 1.6, (16384, 7168, 2048): 1.3}
# (tokens, hidden, expert dim, experts, top-k): the MoE target is >= 1.4x.
MOE_SHAPES = [(16384, 4096, 2048, 8, 2)]
MOE_BAR = 1.4
# (tokens, hidden, intermediate): a 1B and an 8B Llama's MLP at 16,384 tokens. No bar.
MLP_SHAPES = [(16384, 2048, 8192), (16384, 4096, 14336)]
# Relative-error limits (out, dx, dW) vs BF16: one FP8 GEMM per linear path, up to four
# chained in an MoE (tests/test_nn_* derive the same bounds).
LIMITS = {"linear": (0.05, 0.08, 0.08), "moe": (0.1, 0.15, 0.15), "mlp": (0.1, 0.15, 0.15)}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward+backward; returns the closure and the tensors it fills."""
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)
    return step


def compare(baseline: nn.Module, fp8: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Output, input-gradient and weight-gradient errors of `fp8` against `baseline`."""
    errors = {}
    outs = []
    for module in (baseline, fp8):
        xi = x.detach().clone().requires_grad_(True)
        for p in module.parameters():
            p.grad = None
        y = module(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, [p.grad for p in module.parameters()]))
    errors["out"] = rel_err(outs[1][0], outs[0][0])
    errors["dx"] = rel_err(outs[1][1], outs[0][1])
    errors["dw"] = max(rel_err(g1, g0) for g0, g1 in zip(outs[0][2], outs[1][2])
                       if g0 is not None and g1 is not None)
    return errors


def time_synced(step, *, warmup: int = 3, iters: int = 10) -> float:
    """Median ms per call of `step`, each timed alone between two synchronizations.

    For layers that read values back to the host mid-step (the BF16 MoE's per-expert loop
    and the reference grouped GEMMs read the group offsets): `time_calls` keeps the GPU busy
    with a sleep while the host queues, which a host sync waits out, so it would drop every
    batch and fail. The host gaps such a layer causes are part of its step time here.
    """
    for _ in range(warmup):  # JIT compiles, cuBLAS handles, allocator
        step()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(module: nn.Module, x: torch.Tensor, grad: torch.Tensor,
            host_syncs: bool = False) -> tuple[float, float]:
    """(median ms per forward+backward, peak GiB of one step above what was allocated
    before it: activations, saved tensors, gradients, workspaces)."""
    step = step_fn(module, x, grad)
    if host_syncs:
        ms = time_synced(step)
    else:
        ms, _ = time_calls([step], batch=10, repeats=5)
    # Free the last step's gradients first: still allocated, they would count in the base
    # and then be freed and reallocated inside the step, hiding their size from the peak.
    x.grad = None
    for p in module.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def build_linear(t, k, n, device):
    base = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    return base, FP8Linear.from_linear(copy.deepcopy(base))


def build_moe(t, hidden, expert_dim, experts, top_k, device):
    base = MoE(hidden, expert_dim, experts, top_k).to(device=device, dtype=torch.bfloat16)
    return base, FP8MoE.from_moe(copy.deepcopy(base))


class LayerByLayerSwiGLUMLP(nn.Module):
    """``SwiGLUMLP``'s FP8 layers as three Functions: the product made inside the down
    projection's casts (``fuse_product``) or before it reads it; SwiGLU's gradients made and
    cast by the layers either way."""

    def __init__(self, mlp: SwiGLUMLP, fuse_product: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.fuse_product = fuse_product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_product:
            return swiglu_linear(self.down_proj, self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerByLayerFP8MoE(nn.Module):
    """An ``FP8MoE``'s experts as two grouped-layer Functions (SwiGLU's gradient made and
    cast by the layers): what the one expert-block Function replaces."""

    def __init__(self, moe: FP8MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original = self.moe._expert_rows
        self.moe._expert_rows = lambda x_tokens, layout: MoE._expert_rows(self.moe, x_tokens, layout)
        try:
            return self.moe(x)
        finally:
            self.moe._expert_rows = original


def build_mlp(t, hidden, intermediate, device):
    base = SwiGLUMLP(hidden, intermediate, device=device, dtype=torch.bfloat16)
    fp8 = copy.deepcopy(base)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(fp8, name, FP8Linear.from_linear(getattr(fp8, name)))
    return base, fp8


BUILDERS = {"linear": (build_linear, LINEAR_SHAPES), "moe": (build_moe, MOE_SHAPES), "mlp": (build_mlp, MLP_SHAPES)}


def run_suite(suite: str, json_path: str | None, backends=("auto", "native")) -> int:
    device = torch.device("cuda")
    rows, failures = [], 0
    build, shapes = BUILDERS[suite]
    for shape in shapes:
        base, fp8 = build(*shape, device)
        t, k = shape[0], shape[1]
        n_out = shape[2] if suite == "linear" else shape[1]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(t, k, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        grad = torch.randn(t, n_out, device=device, dtype=torch.bfloat16, generator=gen)
        # The MoE (both the BF16 loop over experts and, until the grouped kernels are
        # verified, the FP8 reference path) syncs the host inside a step.
        host_syncs = suite == "moe"
        bf16_ms, bf16_gib = measure(base, x, grad, host_syncs)
        for backend in backends:
            ops.set_backend(backend)
            try:
                errors = compare(base, fp8, x, grad)
                ms, gib = measure(fp8, x, grad, host_syncs)
            except RuntimeError as exc:  # e.g. a backend that cannot serve this layer
                print(f"{suite} {shape} backend={backend}: skipped ({exc})", flush=True)
                continue
            finally:
                ops.set_backend("auto")
            limits = LIMITS[suite]
            ok = errors["out"] < limits[0] and errors["dx"] < limits[1] and errors["dw"] < limits[2]
            failures += not ok
            row = {"suite": suite, "shape": shape, "backend": backend, "ok": ok, **errors,
                   "bf16_ms": bf16_ms, "fp8_ms": ms, "speedup": bf16_ms / ms,
                   "bf16_peak_gib": bf16_gib, "fp8_peak_gib": gib}
            rows.append(row)
            bar = LINEAR_BARS.get(tuple(shape)) if suite == "linear" else MOE_BAR
            print(f"{suite} {shape} backend={backend:6s} {'ok ' if ok else 'BAD'} "
                  f"err out {errors['out']:.3f} dx {errors['dx']:.3f} dw {errors['dw']:.3f} | "
                  f"bf16 {bf16_ms:7.3f} ms fp8 {ms:7.3f} ms speedup {bf16_ms / ms:.2f}"
                  + (f" (target >= {bar}: {'met' if bf16_ms / ms >= bar else 'MISSED'})"
                     if bar else "")
                  + f" | peak GiB {bf16_gib:.2f} / {gib:.2f}", flush=True)
        if suite == "linear":
            rows += reference_rows(base, x, grad, shape, bf16_ms, bf16_gib)
        if suite == "moe":  # the same FP8 experts as two grouped-layer Functions
            ms, gib = measure(LayerByLayerFP8MoE(fp8), x, grad, host_syncs)
            rows.append({"suite": suite, "shape": shape, "backend": "auto, 2 expert Functions",
                         "bf16_ms": bf16_ms, "fp8_ms": ms, "speedup": bf16_ms / ms,
                         "bf16_peak_gib": bf16_gib, "fp8_peak_gib": gib})
            print(f"{suite} {shape} 2 expert Functions {ms:7.3f} ms speedup {bf16_ms / ms:.2f} "
                  f"| peak GiB {gib:.2f}", flush=True)
        if suite == "mlp":  # the same FP8 layers as three Functions, with and without the fused product
            for fuse_product, label in ((True, "3 Functions, product fused"), (False, "3 Functions, unfused")):
                ms, gib = measure(LayerByLayerSwiGLUMLP(fp8, fuse_product), x, grad)
                rows.append({"suite": suite, "shape": shape, "backend": f"auto, {label}",
                             "bf16_ms": bf16_ms, "fp8_ms": ms, "speedup": bf16_ms / ms,
                             "bf16_peak_gib": bf16_gib, "fp8_peak_gib": gib})
                print(f"{suite} {shape} {label:27s} {ms:7.3f} ms speedup {bf16_ms / ms:.2f} "
                      f"| peak GiB {gib:.2f}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


def reference_rows(base: nn.Module, x: torch.Tensor, grad: torch.Tensor, shape, bf16_ms: float,
                   bf16_gib: float) -> list[dict]:
    """The torchao-style tensorwise FP8 linear (and torchao's own, where installed) timed
    like the FP8 rows, side by side. Not bars: context."""
    rows = []
    for name, build in (("tensorwise stand-in", tensorwise_twin), ("torchao tensorwise", torchao_twin)):
        try:
            module = build(base)
            if module is None:
                print(f"linear {shape} {name}: torchao not installed", flush=True)
                continue
            errors = compare(base, module, x, grad)
            ms, gib = measure(module, x, grad)
        except Exception as exc:  # a reference this torch cannot run must not end the run
            print(f"linear {shape} {name}: failed ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
            continue
        rows.append({"suite": "linear", "shape": shape, "backend": name, **errors, "bf16_ms": bf16_ms,
                     "fp8_ms": ms, "speedup": bf16_ms / ms, "bf16_peak_gib": bf16_gib, "fp8_peak_gib": gib})
        print(f"linear {shape} {name:19s} err out {errors['out']:.3f} dx {errors['dx']:.3f} "
              f"dw {errors['dw']:.3f} | {ms:7.3f} ms speedup {bf16_ms / ms:.2f} | peak GiB {gib:.2f}",
              flush=True)
    return rows
