"""Mixture-of-experts block: ``MoE`` (high-precision reference) and ``FP8MoE``.

    probs  = softmax(x W_router^T)            FP32, never quantized
    w, ids = top-k(probs)  (renormalised when norm_topk_prob)
    x_perm = permute(x)                         padded contiguous layout (moe_layout)
    h      = x_perm W_gate_up[e]^T              grouped GEMM, [rows, 2I]  (x_perm gathered
                                                inside it: FP8 fuses it into the casts)
    a      = silu(h[:, :I]) * h[:, I:]          SwiGLU
    y_perm = a W_down[e]^T                      grouped GEMM, [rows, H]
    out    = sum_j w[t, j] y_perm[row(t, j)]  (+ shared_expert(x))

The two classes share every line of this math; ``FP8MoE`` only builds its experts as
``FP8GroupedLinear`` (and ``convert_to_fp8`` turns the shared expert's ``nn.Linear``s into
``FP8Linear``s). No load-balancing loss is computed here: ``last_tokens_per_expert`` keeps
the routing counts of the last forward for whoever wants one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._autocast import autocast_off
from .grouped_linear import FP8GroupedLinear, GroupedLinear, _check_int
from .grouped_swiglu import FP8GroupedSwiGLUFunction, fuses_expert_block
from .swiglu_mlp import runs_hooks, swiglu_mlp
from .linear_function import GROUP, compute_dtype
from .moe_layout import build_moe_layout, segment_rows_for, unpermute
from .recipe import FP8Recipe


class Router(nn.Module):
    """Top-k softmax router, weight ``[num_experts, hidden_size]``, run in FP32.

    Not an ``nn.Linear`` on purpose: conversion must never quantize the router.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool = True, device=None, dtype=None):
        super().__init__()
        _check_int("hidden_size", hidden_size)
        if _check_int("top_k", top_k) > _check_int("num_experts", num_experts):
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device,
                                               dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.uniform_(self.weight, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))

    def forward(self, x: torch.Tensor):
        """x ``[T, H]`` -> (weights float32 ``[T, k]``, expert ids int64 ``[T, k]``)."""
        with autocast_off(x.device.type):
            probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
            weights, ids = probs.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with bias-free ``nn.Linear``s (Llama's MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(self.gate_proj, self.up_proj, self.down_proj, x)


class MoE(nn.Module):
    """Top-k MoE with SwiGLU experts in high precision (the reference ``FP8MoE`` matches).

    Args:
        hidden_size: H, the model width.
        expert_dim: I, each expert's intermediate size.
        num_experts: E.
        top_k: experts per token (1..E).
        shared_expert_dim: intermediate size of an always-on shared SwiGLU expert; 0: none.
        norm_topk_prob: renormalise the top-k probabilities to sum to one.
    Parameters: ``router.weight [E, H]``, ``experts_gate_up.weight [E, 2I, H]`` (gate rows
    first), ``experts_down.weight [E, H, I]``, ``shared_expert.{gate,up,down}_proj.weight``.
    """

    def __init__(self, hidden_size: int, expert_dim: int, num_experts: int, top_k: int,
                 shared_expert_dim: int = 0, norm_topk_prob: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size = _check_int("hidden_size", hidden_size)
        self.expert_dim = _check_int("expert_dim", expert_dim)
        self.num_experts = _check_int("num_experts", num_experts)
        self.top_k = _check_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
        if isinstance(shared_expert_dim, bool) or not isinstance(shared_expert_dim, int) \
                or shared_expert_dim < 0:
            raise ValueError(f"shared_expert_dim: expected an int >= 0, got {shared_expert_dim!r}")
        if not isinstance(norm_topk_prob, bool):
            raise TypeError(f"norm_topk_prob: expected a bool, got {type(norm_topk_prob).__name__}")
        self.shared_expert_dim = shared_expert_dim
        kw = {"device": device, "dtype": dtype}
        self.router = Router(hidden_size, num_experts, top_k, norm_topk_prob, **kw)
        self.experts_gate_up = self._experts(num_experts, hidden_size, 2 * expert_dim, **kw)
        self.experts_down = self._experts(num_experts, expert_dim, hidden_size, **kw)
        self.shared_expert = (SwiGLUMLP(hidden_size, shared_expert_dim, **kw)
                              if shared_expert_dim else None)
        self.last_tokens_per_expert: Optional[torch.Tensor] = None

    def _experts(self, num_experts, in_features, out_features, **kw) -> GroupedLinear:
        return GroupedLinear(num_experts, in_features, out_features, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., H]`` -> ``[..., H]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [..., {self.hidden_size}], got {tuple(x.shape)}")
        x_tokens = x.reshape(-1, self.hidden_size)                          # [T, H]
        topk_weights, topk_ids = self.router(x_tokens)                      # [T, k] each
        layout = build_moe_layout(topk_ids, self.num_experts,
                                  segment_rows_for(topk_ids.numel(), self.num_experts))
        self.last_tokens_per_expert = layout.tokens_per_expert.detach()
        y_perm = self._expert_rows(x_tokens, layout)                                # [rows, H]
        out = unpermute(y_perm, layout, topk_weights)                               # [T, H]
        if self.shared_expert is not None:
            out = out + self.shared_expert(x_tokens)
        return out.reshape(x.shape[:-1] + (self.hidden_size,))

    def _expert_rows(self, x_tokens: torch.Tensor, layout) -> torch.Tensor:
        """Every assignment's expert output, in the padded layout ``[rows, H]``."""
        h = self.experts_gate_up(x_tokens, layout.group_offsets, layout.src_tokens,
                                 layout.align)                                      # [rows, 2I]
        # SwiGLU inside the down projection: the FP8 layer casts silu(gate) * up directly.
        return self.experts_down(h, layout.group_offsets, segment_rows=layout.align, swiglu=True)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, expert_dim={self.expert_dim}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"shared_expert_dim={self.shared_expert_dim}")


def moe_fp8_ineligible(moe: MoE) -> Optional[str]:
    """None if ``moe``'s expert GEMMs can run in FP8, else the reason."""
    bad = [f"{name}={getattr(moe, name)}" for name in ("hidden_size", "expert_dim")
           if getattr(moe, name) % GROUP]
    return f"{', '.join(bad)} not a multiple of {GROUP}" if bad else None


class FP8MoE(MoE):
    """``MoE`` whose experts run fprop, dgrad and wgrad as grouped FP8 GEMMs.

    Same constructor (plus ``recipe``) and parameters as ``MoE``; hidden_size and expert_dim
    must be multiples of 128. The router stays FP32; the shared expert's linears are plain
    ``nn.Linear`` until ``convert_to_fp8`` swaps them.
    """

    def __init__(self, hidden_size: int, expert_dim: int, num_experts: int, top_k: int,
                 shared_expert_dim: int = 0, norm_topk_prob: bool = True,
                 device=None, dtype=None, *, recipe: Optional[FP8Recipe] = None):
        recipe = FP8Recipe() if recipe is None else recipe
        if not isinstance(recipe, FP8Recipe):
            raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
        self._recipe = recipe  # read by _experts during MoE.__init__
        for name, value in (("hidden_size", hidden_size), ("expert_dim", expert_dim)):
            if isinstance(value, int) and not isinstance(value, bool) and value % GROUP:
                raise ValueError(f"{name}: expected a multiple of {GROUP}, got {value}")
        super().__init__(hidden_size, expert_dim, num_experts, top_k, shared_expert_dim,
                         norm_topk_prob, device=device, dtype=dtype)

    @property
    def recipe(self) -> FP8Recipe:
        return self._recipe

    def _experts(self, num_experts, in_features, out_features, **kw) -> FP8GroupedLinear:
        return FP8GroupedLinear(num_experts, in_features, out_features, recipe=self._recipe, **kw)

    def _expert_rows(self, x_tokens: torch.Tensor, layout) -> torch.Tensor:
        """One Function for both expert projections where it fits (``FP8GroupedSwiGLUFunction``:
        SwiGLU's gradient made inside the gate_up projection's casts; the same bits), else
        the two layers."""
        gate_up, down = self.experts_gate_up, self.experts_down
        if (all(isinstance(m, FP8GroupedLinear) and type(m).forward is FP8GroupedLinear.forward
                and not runs_hooks(m) for m in (gate_up, down))
                and gate_up.recipe == down.recipe
                and fuses_expert_block(x_tokens, gate_up.weight, down.weight, gate_up.recipe)):
            return FP8GroupedSwiGLUFunction.apply(x_tokens, gate_up.weight, down.weight, layout.group_offsets,
                                                  layout.src_tokens, gate_up.recipe, compute_dtype(x_tokens),
                                                  layout.align)
        return super()._expert_rows(x_tokens, layout)

    @classmethod
    def from_moe(cls, moe: MoE, recipe: Optional[FP8Recipe] = None) -> "FP8MoE":
        """An FP8MoE sharing ``moe``'s parameters and submodules (router, shared expert)."""
        if not isinstance(moe, MoE):
            raise TypeError(f"moe: expected an MoE, got {type(moe).__name__}")
        why = moe_fp8_ineligible(moe)
        if why:
            raise ValueError(f"moe: {why}")
        new = cls(moe.hidden_size, moe.expert_dim, moe.num_experts, moe.top_k,
                  moe.shared_expert_dim, moe.router.norm_topk_prob, device="meta", recipe=recipe)
        new.router = moe.router
        new.experts_gate_up = FP8GroupedLinear.from_grouped(moe.experts_gate_up, new.recipe)
        new.experts_down = FP8GroupedLinear.from_grouped(moe.experts_down, new.recipe)
        new.shared_expert = moe.shared_expert
        new.train(moe.training)
        return new
