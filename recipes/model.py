"""A Llama-style decoder in plain PyTorch, the model every recipe trains.

RMSNorm before attention and MLP, rotary position embeddings, causal attention through
``F.scaled_dot_product_attention`` (grouped-query when n_kv_heads < n_heads), SwiGLU MLPs,
and optionally MoE blocks (``fp8train.nn.MoE``). Every projection is an ``nn.Linear`` without
bias, so ``fp8train.convert_to_fp8`` can swap it for ``FP8Linear`` (and ``MoE`` for ``FP8MoE``);
embeddings, norms and the output head stay in high precision.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8train.nn import MoE, swiglu_mlp

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 even under autocast: the mean of squares loses bits in BF16.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 ``[seq_len, head_dim / 2]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + hd/2]) of ``x`` (B, nh, T, hd) by the position angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]  # (T, hd/2), broadcast over B, nh
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); once the layers are FP8Linear, one FP8 Function that
    makes the product inside the down projection's casts and SwiGLU's gradients inside the
    gate and up projections' (``fp8train.nn.swiglu_mlp``: the same bits)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(self.w1, self.w3, self.w2, x)


def moe_block(cfg: ModelConfig) -> MoE:
    """The project's MoE block (softmax top-k router, SwiGLU experts); convert_to_fp8 makes it FP8MoE."""
    return MoE(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.moe_top_k,
               shared_expert_dim=cfg.moe_shared_dim)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        use_moe = cfg.n_experts > 0 and layer >= cfg.moe_first_dense_layers
        self.mlp = moe_block(cfg) if use_moe else MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Untied head: conversion leaves it (and the embedding) in high precision by name.
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual-output projections scaled by 1/sqrt(2 L)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue  # RMSNorm gains stay at 1
            # wo, w2, and the MoE's experts_down / shared_expert.down_proj
            out_proj = name.endswith(("wo.weight", "w2.weight", "down.weight", "down_proj.weight"))
            p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers) if out_proj else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``[B, T, vocab]`` and, with ``targets``, the mean cross-entropy (float32)."""
        x = self.tok_emb(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        return logits, lm_loss(logits, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None):
    """Mean cross-entropy in float32 over already-shifted targets; None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


class HFCausalLM(nn.Module):
    """A transformers architecture (``model.hf``) built from its config, with the recipes'
    interface: ``forward(idx, targets) -> (logits, loss)`` and ``num_params()``.

    Built with ``AutoModelForCausalLM.from_config`` (transformers' own init, nothing
    downloaded); the wrapped model is ``self.hf``, so ``self.hf.save_pretrained`` works. The
    loss is computed here, as in ``Transformer``: the recipes' targets are already shifted.
    """

    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {"vocab_size": cfg.vocab_size, "max_position_embeddings": max_seq_len,
                  **cfg.hf_config}
        self.hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.hf, **kwargs))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        # No KV cache: training never reads it, and its per-layer update makes torch.compile
        # recompile each decoder layer (past the recompile limit, layers run eager).
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        return logits, lm_loss(logits, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, max_seq_len: int) -> nn.Module:
    """The model ``cfg`` describes: a transformers architecture when ``cfg.hf`` is set,
    else the built-in ``Transformer``."""
    return HFCausalLM(cfg, max_seq_len) if cfg.hf else Transformer(cfg, max_seq_len)


TORCHAO_MISSING = "precision=torchao needs torchao: pip install torchao (the release that matches your torch)"


def convert_with_torchao(model: nn.Module) -> str:
    """torchao's float8 training (tensorwise scales) on every linear layer but the head, in
    place; returns what was converted. The comparison's anchor, not part of fp8train."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise RuntimeError(TORCHAO_MISSING) from exc

    def not_the_head(module, fqn: str) -> bool:
        return not fqn.endswith("lm_head")

    converted = sum(isinstance(m, nn.Linear) and not_the_head(m, fqn) for fqn, m in model.named_modules())
    convert_to_float8_training(model, module_filter_fn=not_the_head)
    return f"torchao float8 (tensorwise): {converted} linear layers converted, the head kept"
