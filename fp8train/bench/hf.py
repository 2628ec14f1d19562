"""``python -m fp8train.bench hf``: training steps of Hugging Face models, FP8 vs BF16.

Two ~1B models built from configs (nothing downloaded): a Llama-style dense model and a
Qwen3-MoE-style model (hidden 2048, 16 experts top-4). Each runs AdamW training steps on
random tokens twice from the same init: as built (BF16 GEMMs under autocast; the MoE with
transformers' ``grouped_mm`` experts), and after ``fp8train.convert_to_fp8`` (FP8Linear and
the ``"fp8train"`` grouped FP8 experts). Both keep FP32 master weights and run under
``torch.autocast(bfloat16)``, the recipes' setting, eager and with every decoder layer
compiled. Printed: tokens/s and peak memory side by side, and their ratios.

Correctness first: the FP8 model's first loss must be within 2% of the BF16 model's.
"""
from __future__ import annotations

import gc
import json
import time
from typing import Dict, List, Optional

import torch

from ..nn import convert_to_fp8

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


def _build(spec: dict, seq_len: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(spec)
    config = AutoConfig.for_model(kwargs.pop("model_type"), max_position_embeddings=seq_len,
                                  **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).cuda()
    if hasattr(model, "set_experts_implementation") and "num_experts" in spec:
        model.set_experts_implementation("grouped_mm")  # the BF16 baseline's experts
    return model


def _step(model, optimizer, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _measure(name: str, spec: dict, fp8: bool, compiled: bool, batch: int, seq_len: int,
             steps: int, warmup: int) -> dict:
    model = _build(spec, seq_len, seed=0)
    if fp8:
        convert_to_fp8(model)
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, spec["vocab_size"], (batch, seq_len), device="cuda", generator=gen)
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
    row = {"model": name, "precision": "fp8" if fp8 else "bf16", "compiled": compiled,
           "params": sum(p.numel() for p in model.parameters()), "first_loss": first,
           "last_loss": loss.item(), "tokens_per_s": batch * seq_len * steps / seconds,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run(models: Optional[str] = None, json_path: Optional[str] = None, *, batch: int = 4,
        seq_len: int = 2048, steps: int = 10, warmup: int = 3) -> int:
    """Measure ``models`` (comma-separated names of ``MODELS``; None: all); 0 on success,
    1 if a correctness check failed."""
    names = list(MODELS) if models is None else [m.strip() for m in models.split(",")]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise ValueError(f"models: unknown {unknown}; choose from {list(MODELS)}")
    rows: List[dict] = []
    status = 0
    print(f"{'model':<14} {'compiled':>8} {'params':>8} {'bf16 tok/s':>11} {'fp8 tok/s':>10} "
          f"{'speedup':>7} {'bf16 GB':>8} {'fp8 GB':>7} {'mem ratio':>9}")
    for name in names:
        for compiled in (False, True):
            bf16, fp8 = (_measure(name, MODELS[name], is_fp8, compiled, batch, seq_len, steps,
                                  warmup) for is_fp8 in (False, True))
            rows += [bf16, fp8]
            if abs(fp8["first_loss"] - bf16["first_loss"]) > 0.02 * bf16["first_loss"]:
                print(f"  {name}: FP8 first loss {fp8['first_loss']:.4f} vs BF16 "
                      f"{bf16['first_loss']:.4f}: more than 2% apart")
                status = 1
            print(f"{name:<14} {str(compiled):>8} {bf16['params'] / 1e9:>7.2f}B "
                  f"{bf16['tokens_per_s']:>11,.0f} {fp8['tokens_per_s']:>10,.0f} "
                  f"{fp8['tokens_per_s'] / bf16['tokens_per_s']:>6.2f}x "
                  f"{bf16['peak_mem_gb']:>8.1f} {fp8['peak_mem_gb']:>7.1f} "
                  f"{fp8['peak_mem_gb'] / bf16['peak_mem_gb']:>8.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return status
