"""``python -m benchmarks hf``: training steps of Hugging Face models, FP8 vs BF16.

Two ~1B models built from configs (nothing downloaded): a Llama-style dense model and a
Qwen3-MoE-style model (hidden 2048, 16 experts top-4). Each runs AdamW training steps on
random tokens twice from the same init: as built (BF16 GEMMs under autocast; the MoE with
transformers' ``grouped_mm`` experts), and after ``fp8train.convert_to_fp8`` (FP8Linear and
the ``"fp8train"`` grouped FP8 experts). Both keep FP32 master weights and run under
``torch.autocast(bfloat16)``, the recipes' setting, eager and with every decoder layer
compiled. Printed: tokens/s and peak memory side by side, and their ratios. Where torchao
is importable, a third run converts the same model with torchao's float8 training (tensorwise
for every linear layer but the head and the MoE router; MoE experts stay BF16, see
``torchao_convert``) for a row of its own beside ours; a failure there is reported and the
run goes on.

Correctness first: the FP8 model's first loss must be within 2% of the BF16 model's, and
each decoder layer's output (before training, first sequence, every layer fed the same
input) within its measured limit of the same FP8 model run on the reference emulation (same
quantization, so only FP32 summation order differs; the limit is ``SPREAD_FACTOR`` times
what a one-ulp nudge of the layer's input moves the reference). (At random init the loss is
~ln(vocab) whatever the layers compute, so the loss alone would not notice broken FP8
GEMMs.) The FP8-vs-BF16 hidden-state error is printed too: it is the recipe's own error.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fp8train import ops
from fp8train.nn import convert_to_fp8

# Each decoder layer's output on the GPU paths vs the reference emulation of the same FP8
# model, both fed the reference's input to that layer: the same quantization, so only FP32
# summation order differs, and that moves an element across an e4m3 rounding boundary now
# and then (by up to 2^-4 of its group's scale). The limit for each layer is measured, not
# chosen: SPREAD_FACTOR times how far the reference's own output moves when the layer's
# input moves by one BF16 ulp. Broken kernels give ~1.
SPREAD_FACTOR = 2.0
# FP8 vs BF16 at random init is the recipe's own error, printed, not checked: llama-1b's
# last hidden states sit 0.298 from FP32 with FP8 GEMMs (the reference emulation, on a CPU)
# against 0.025 with BF16 ones: ~0.03 per GEMM over 112 GEMMs adds up in the residual stream.
# The target: FP8 training-step tokens/s >= 1.3x BF16 (and peak memory no higher).
SPEEDUP_BAR = 1.3
# The table a run is held against: the last one measured, kept in the source tree's docs/.
PREVIOUS_TABLE = Path(__file__).resolve().parents[1] / "docs" / "bench" / "hf_previous.json"
# A row this much slower than the previous table's is flagged.
REGRESSION = 0.05


# The BF16 baseline's experts implementation, registered below.
BF16_EXPERTS = "fp8train_bench_grouped_mm_bf16"

# transformers config kwargs (AutoConfig.for_model) of the two models the issue asks for.
MODELS: Dict[str, dict] = {
    # ~1.14B parameters (DESIGN.md's Llama anchor size).
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, vocab_size=32768),
    # ~1.16B total, ~0.47B active: 16 experts of 768, top-4, every layer MoE.
    "qwen3-moe-1b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                         moe_intermediate_size=768, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                         num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1,
                         mlp_only_layers=[], vocab_size=32768),
}


# Tiny transformers models from configs (no download), for GPU diagnostics at a size where
# every op can be compared (scripts/trace_custom_ops.py, scripts/compiled_vs_eager_steps.py)
# and for the CPU tests: every GEMM dim a multiple of 128 except DeepSeek-V3's
# kv_a_proj_with_mqa (kv_lora_rank + qk_rope_head_dim = 192), which conversion must keep in
# high precision and report.
TINY_ARCHS = {
    "llama": dict(intermediate_size=256, head_dim=64),
    "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                      num_experts_per_tok=2, head_dim=64, decoder_sparse_step=1),
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=64),
    "deepseek_v3": dict(intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64),
}
# Experts stored transposed ([E, H, 2I]) with biases and a clamped, interleaved gate:
# the is_transposed / has_bias paths of the "fp8train" experts implementation.
TINY_ARCHS_EXTRA = {
    "gpt_oss": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=64, layer_types=["full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
TINY_VOCAB = 256


def tiny_config(arch: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=TINY_VOCAB,
                                max_position_embeddings=64,
                                **{**TINY_ARCHS, **TINY_ARCHS_EXTRA}[arch])


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


class _CastExperts:
    """An experts module as transformers' ``grouped_mm`` forward reads it, with every
    floating Parameter cast to ``dtype``: what autocast does to an ``nn.Linear`` weight."""

    def __init__(self, experts, dtype: torch.dtype):
        self._experts, self._dtype = experts, dtype

    def __getattr__(self, name):
        value = getattr(self._experts, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def _grouped_mm_autocast_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' ``grouped_mm`` experts with the GEMMs in autocast's dtype.

    ``grouped_mm`` is not autocast-aware: it casts the tokens to the weights' dtype, so with
    the FP32 master weights kept here it would run the experts in FP32 (slow fallback
    kernels) and the FP8/BF16 ratio would be measured against an FP32 baseline.
    """
    from transformers.integrations.moe import grouped_mm_experts_forward

    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        self = _CastExperts(self, torch.get_autocast_dtype(device_type))
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _build(spec: dict, seq_len: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(spec)
    config = AutoConfig.for_model(kwargs.pop("model_type"), max_position_embeddings=seq_len,
                                  **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).cuda()
    if hasattr(model, "set_experts_implementation") and "num_experts" in spec:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(BF16_EXPERTS, _grouped_mm_autocast_forward)
        model.set_experts_implementation(BF16_EXPERTS)  # the BF16 baseline's experts
    return model


def _step(model, optimizer, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        # use_cache=False: in training, transformers would otherwise fill a KV cache whose
        # update (keyed by each layer's own layer_idx) makes dynamo recompile every compiled
        # layer; past the recompile limit (8) the rest of the 16 layers silently run eager.
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _last_hidden(model, ids) -> torch.Tensor:
    """The first sequence's last hidden states, from a forward of the whole batch: with
    grad on and the training batch shape, as the steps run (a no_grad or batch-1 call would
    compile the layers a second time, the steps then recompiling them with dynamic shapes)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return hidden[:1].detach().double().cpu()


def _layer_outputs(model, ids, inputs: Optional[list] = None):
    """Each decoder layer's (input, output) hidden states, detached, on one forward; with
    ``inputs`` (another run's captured inputs), each layer is fed those instead of what the
    layer below it produced, so a layer's error is its own."""
    captured, handles = [], []
    for i, layer in enumerate(model.model.layers):
        def pre_hook(module, args, kwargs, i=i):
            if inputs is None:
                return None
            if args:
                return (inputs[i].clone(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs[i].clone()}

        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured.append((hidden_in.detach(), hidden_out.detach()))

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
            model.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def one_ulp_nudge(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x moved by one BF16 ulp, up or down at random, element by element."""
    bits = x.to(torch.bfloat16).view(torch.int16)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    step = torch.randint(0, 2, bits.shape, device=x.device, generator=gen, dtype=torch.int16) * 2 - 1
    return (bits + step).view(torch.bfloat16).to(x.dtype)


def _layer_native_errs(model, ids) -> Tuple[List[float], List[float], torch.Tensor]:
    """Each decoder layer's error on the GPU paths against the reference emulation, each
    layer's limit (``SPREAD_FACTOR`` x the reference's own change under a one-ulp nudge of
    its input), and the reference's last hidden states (its last layer's output through the
    final norm)."""
    saved = ops.get_backend()
    ops.set_backend("reference")
    try:
        reference = _layer_outputs(model, ids)
        nudged = _layer_outputs(model, ids, inputs=[one_ulp_nudge(inp, i) for i, (inp, _) in enumerate(reference)])
    finally:
        ops.set_backend(saved)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        last_hidden = model.model.norm(reference[-1][1])
    native = _layer_outputs(model, ids, inputs=[inp for inp, _ in reference])
    errs = [_rel_err(got.double(), want.double()) for (_, got), (_, want) in zip(native, reference)]
    limits = [SPREAD_FACTOR * _rel_err(moved.double(), want.double())
              for (_, moved), (_, want) in zip(nudged, reference)]
    return errs, limits, last_hidden.double().cpu()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def torchao_convert(model) -> bool:
    """Convert ``model`` with torchao's float8 training: tensorwise for every linear layer
    whose dimensions it takes but the head and the MoE router. MoE experts stay in BF16 on
    transformers' ``grouped_mm``: torchao's FP8 grouped GEMMs (0.17) need every expert's
    token count a multiple of 16 and do not pad it themselves, which transformers' experts
    do not either (a device-side assert that ends the process). False without torchao."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        return False

    def wanted(module, fqn: str) -> bool:
        return (not fqn.endswith(("lm_head", "mlp.gate")) and module.in_features % 16 == 0
                and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=wanted)
    return True


def _measure(name: str, spec: dict, precision: str, compiled: bool, batch: int, seq_len: int,
             steps: int, warmup: int) -> dict:
    """One row: ``precision`` is "bf16", "fp8" (ours) or "torchao" (``torchao_convert``)."""
    fp8 = precision == "fp8"
    torch.cuda.synchronize()
    # Whatever an earlier run left allocated (caches, a leak) is not this run's memory.
    leftover = torch.cuda.memory_allocated()
    model = _build(spec, seq_len, seed=0)
    if fp8:
        convert_to_fp8(model)
    elif precision == "torchao":
        torchao_convert(model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, spec["vocab_size"], (batch, seq_len), device="cuda", generator=gen)
    # Before compiling: the hooks of the per-layer check would be traced into the graphs.
    layer_err = layer_limit = hidden_ref = None
    if fp8:  # and the same FP8 model's last hidden states on the reference emulation
        layer_errs, limits, hidden_ref = _layer_native_errs(model, ids[:1])
        # The layer furthest outside (or nearest to) its own limit.
        layer_err, layer_limit = max(zip(layer_errs, limits), key=lambda e: e[0] / max(e[1], 1e-30))
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    hidden = _last_hidden(model, ids)
    first = _step(model, optimizer, ids).item()
    for _ in range(warmup - 1):
        _step(model, optimizer, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = _step(model, optimizer, ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"model": name, "precision": precision, "compiled": compiled,
           "params": sum(p.numel() for p in model.parameters()), "first_loss": first,
           "last_loss": loss.item(), "tokens_per_s": batch * seq_len * steps / seconds,
           "peak_mem_gb": (torch.cuda.max_memory_allocated() - leftover) / 2**30,
           "leftover_gb": leftover / 2**30, "hidden": hidden, "hidden_ref": hidden_ref,
           "max_layer_native_err": layer_err, "layer_native_limit": layer_limit}
    del model, optimizer, loss
    if compiled:
        torch._dynamo.reset()  # drop the compiled layers' code caches (and what they hold)
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run(models: Optional[str] = None, json_path: Optional[str] = None, *, batch: int = 4,
        seq_len: int = 2048, steps: int = 10, warmup: int = 3, compiled=(False, True),
        previous_path: Optional[Path] = PREVIOUS_TABLE) -> int:
    """Measure ``models`` (comma-separated names of ``MODELS``; None: all), eager and/or
    with compiled layers (``compiled``); 0 on success, 1 if a correctness check failed."""
    compiled_rows = tuple(compiled)
    names = list(MODELS) if models is None else [m.strip() for m in models.split(",")]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise ValueError(f"models: unknown {unknown}; choose from {list(MODELS)}")
    rows: List[dict] = []
    status = 0
    with_torchao = _torchao_available()
    if not with_torchao:
        print("torchao: not importable, its rows are left out")
    print(f"{'model':<14} {'compiled':>8} {'params':>8} {'bf16 tok/s':>11} {'fp8 tok/s':>10} "
          f"{'speedup':>7} {'bf16 GiB':>8} {'fp8 GiB':>7} {'mem ratio':>9}")
    for name in names:
        for compiled in compiled_rows:
            bf16, fp8 = (_measure(name, MODELS[name], precision, compiled, batch, seq_len, steps,
                                  warmup) for precision in ("bf16", "fp8"))
            h_bf16, h_fp8, h_ref = bf16.pop("hidden"), fp8.pop("hidden"), fp8.pop("hidden_ref")
            bf16.pop("hidden_ref")
            fp8["hidden_rel_err"] = _rel_err(h_fp8, h_bf16)
            fp8["native_vs_reference_err"] = _rel_err(h_fp8, h_ref)
            bf16.pop("max_layer_native_err")
            bf16.pop("layer_native_limit")
            rows += [bf16, fp8]
            print(f"  {name} compiled={compiled}: first loss bf16 {bf16['first_loss']:.4f} "
                  f"fp8 {fp8['first_loss']:.4f}; last loss bf16 {bf16['last_loss']:.4f} fp8 "
                  f"{fp8['last_loss']:.4f}; FP8 GPU paths vs their reference emulation: worst "
                  f"layer {fp8['max_layer_native_err']:.4f} (its limit {fp8['layer_native_limit']:.4f}: "
                  f"{SPREAD_FACTOR:g}x the reference's one-ulp spread; eager), "
                  f"last hidden states {fp8['native_vs_reference_err']:.4f}; last hidden states "
                  f"FP8 vs BF16 {fp8['hidden_rel_err']:.3f}", flush=True)
            if not abs(fp8["first_loss"] - bf16["first_loss"]) <= 0.02 * bf16["first_loss"]:
                print(f"  {name}: FP8 first loss {fp8['first_loss']:.4f} vs BF16 "
                      f"{bf16['first_loss']:.4f}: more than 2% apart (or not finite)")
                status = 1
            if not fp8["max_layer_native_err"] <= fp8["layer_native_limit"]:
                print(f"  {name}: a decoder layer's FP8 output is {fp8['max_layer_native_err']:.4f} "
                      f"from the reference emulation's on the same input: more than its limit "
                      f"{fp8['layer_native_limit']:.4f} ({SPREAD_FACTOR:g}x the reference's own "
                      "change under a one-ulp input nudge)")
                status = 1
            for row in (bf16, fp8):
                if row["leftover_gb"] > 1:
                    print(f"  {name} {row['precision']}: {row['leftover_gb']:.1f} GiB still "
                          "allocated from an earlier run (left out of its peak)")
            print(f"{name:<14} {str(compiled):>8} {bf16['params'] / 1e9:>7.2f}B "
                  f"{bf16['tokens_per_s']:>11,.0f} {fp8['tokens_per_s']:>10,.0f} "
                  f"{fp8['tokens_per_s'] / bf16['tokens_per_s']:>6.2f}x "
                  f"{bf16['peak_mem_gb']:>8.1f} {fp8['peak_mem_gb']:>7.1f} "
                  f"{fp8['peak_mem_gb'] / bf16['peak_mem_gb']:>8.2f}x"
                  f"  (targets: speedup >= {SPEEDUP_BAR}, mem ratio <= 1.00)", flush=True)
            if with_torchao:
                try:
                    ao = _measure(name, MODELS[name], "torchao", compiled, batch, seq_len, steps, warmup)
                except Exception as exc:  # a baseline that fails is reported, not the end of the run
                    print(f"{name:<14} {str(compiled):>8} torchao: failed ({type(exc).__name__}: "
                          f"{str(exc)[:160]})", flush=True)
                    torch._dynamo.reset()
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                for key in ("hidden", "hidden_ref", "max_layer_native_err", "layer_native_limit"):
                    ao.pop(key)
                rows.append(ao)
                label = "torchao float8, experts BF16" if "num_experts" in MODELS[name] else "torchao float8"
                print(f"{name:<14} {str(compiled):>8} {label} {ao['tokens_per_s']:>10,.0f} tok/s "
                      f"({ao['tokens_per_s'] / bf16['tokens_per_s']:.2f}x BF16; ours "
                      f"{fp8['tokens_per_s'] / ao['tokens_per_s']:.2f}x torchao), {ao['peak_mem_gb']:.1f} GiB, "
                      f"last loss {ao['last_loss']:.4f}", flush=True)
    _print_against_previous(rows, previous_path)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "command": "python -m benchmarks hf", "rows": rows}, f, indent=2)
    return status


def _torchao_available() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _print_against_previous(rows: List[dict], path: Optional[Path]) -> None:
    """Each row's tokens/s beside the previous table's, flagging rows more than
    ``REGRESSION`` slower (timings compare only on the same kind of GPU: said if not)."""
    if path is None or not Path(path).is_file():
        return
    previous = json.loads(Path(path).read_text())
    old = {(r["model"], r["compiled"], r["precision"]): r["tokens_per_s"] for r in previous["rows"]}
    device = torch.cuda.get_device_name()
    print(f"against {path} ({previous.get('device')}, {previous.get('commit', '?')}, "
          f"{previous.get('date', '?')})" + ("" if previous.get("device") == device
                                             else f": another GPU than this {device}"))
    for row in rows:
        before = old.get((row["model"], row["compiled"], row["precision"]))
        if before is None:
            continue
        ratio = row["tokens_per_s"] / before
        flag = f"  SLOWER by more than {REGRESSION:.0%}" if ratio < 1 - REGRESSION else ""
        print(f"  {row['model']:<14} {'compiled' if row['compiled'] else 'eager':<8} "
              f"{row['precision']}: {before:>9,.0f} -> {row['tokens_per_s']:>9,.0f} tok/s "
              f"({ratio:.2f}x){flag}")
