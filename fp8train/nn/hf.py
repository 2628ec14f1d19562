"""Hugging Face transformers models: FP8 experts through transformers' ``ExpertsInterface``.

``convert_to_fp8`` calls in here when the model holds transformers modules. Dense
``nn.Linear``s take the generic path (``FP8Linear``); here we add what is HF-specific:

- routers stay in high precision: an ``nn.Linear`` named ``gate``/``router``/
  ``shared_expert_gate`` is an MoE router (Qwen2-MoE, older Mixtral), never quantized;
- fused expert modules (classes decorated with ``@use_experts_implementation``, weights
  ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``) keep their Parameters and their
  class; their forward is switched to the experts implementation ``"fp8train"`` registered
  with ``ExpertsInterface``. It permutes tokens into fp8train's padded contiguous layout
  (``moe_layout``; for the first projection inside its FP8 casts) and runs both projections
  through ``FP8GroupedLinearFunction``: fprop and dgrad m-grouped, wgrad k-grouped; the
  default SwiGLU gate runs inside the second projection's casts. So
  ``state_dict``, ``save_pretrained`` and ``from_pretrained`` see exactly the model they
  saw before.
- SwiGLU MLPs (``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a plain SiLU, checked
  on the class's own source) whose down projection is an ``FP8Linear`` compute the product
  inside its input casts, and with all three layers FP8 run as one Function whose backward
  makes SwiGLU's gradients inside their casts (``fuse_swiglu_mlps``, ``swiglu_mlp``).

transformers is imported here only, and only when an HF model is converted.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Optional

import torch
from torch import nn

from .._checks import check_tensor
from .grouped_linear import FP8GroupedLinearFunction, _forward as _grouped_forward
from .grouped_swiglu import FP8GroupedSwiGLUFunction, fuses_expert_block
from .linear import FP8Linear
from .swiglu_mlp import swiglu_mlp
from .linear_function import GROUP, check_main_grad, compute_dtype
from .moe_layout import build_moe_layout, segment_rows_for, unpermute
from .recipe import FP8Recipe

EXPERTS_IMPLEMENTATION = "fp8train"
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# Attributes set on a converted experts module (plain attributes: not in the state_dict).
_RECIPE_ATTR = "_fp8train_recipe"
_PREVIOUS_ATTR = "_fp8train_previous_implementation"
# Decided at conversion, not in forward: a compiled forward must not import or inspect.
_FUSED_SWIGLU_ATTR = "_fp8train_fused_swiglu"


def linear_skip_reason(name: str) -> Optional[str]:
    """Why an ``nn.Linear`` of an HF model stays in high precision beyond the generic
    rules (dims, output head), or None."""
    last = name.rsplit(".", 1)[-1]
    if last in ROUTER_NAMES:
        return f"MoE router (named {last!r}), kept in high precision"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """A module of a class decorated with transformers' ``use_experts_implementation``."""
    return (hasattr(module, "is_transposed") and hasattr(module, "has_gate")
            and hasattr(module, "down_proj") and hasattr(type(module).forward, "__wrapped__"))


def _up_weight(module: nn.Module) -> torch.Tensor:
    return module.gate_up_proj if module.has_gate else module.up_proj


def experts_fp8_ineligible(module: nn.Module) -> Optional[str]:
    """None if the fused experts ``module`` can run on fp8train's grouped GEMMs, else why not."""
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel experts (sentinel expert ids) are not supported"
    up, down = _up_weight(module), module.down_proj
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)
            and up.dim() == 3 and down.dim() == 3):
        return "expert weights are not 3-D tensors [E, N, K]"
    if not (up.is_floating_point() and down.is_floating_point()):
        return f"expert weights of dtype {up.dtype} (already quantized?)"
    dims = {"up/gate_up": tuple(up.shape[1:]), "down": tuple(down.shape[1:])}
    bad = [f"{name} {shape}" for name, shape in dims.items() if any(d % GROUP for d in shape)]
    return f"expert dims {', '.join(bad)} not multiples of {GROUP}" if bad else None


@functools.lru_cache(maxsize=None)
def _default_gate_parts() -> tuple:
    """(transformers' default ``_apply_gate``, the plain SiLU activation classes), looked
    up once (the experts forward runs every step)."""
    from transformers import activations
    from transformers.integrations import moe as hf_moe

    silu_types = tuple(t for t in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if t is not None)
    return getattr(hf_moe, "_default_apply_gate", None), silu_types


def _default_swiglu_gate(module: nn.Module) -> bool:
    """Whether the experts gate as transformers' default does, silu(gate) * up on
    ``h.chunk(2, -1)`` with a plain SiLU: what the FP8 down projection computes inside its
    input casts (a model's own gate or activation runs as written)."""
    default_gate, silu_types = _default_gate_parts()
    return (module.has_gate and default_gate is not None
            and getattr(type(module), "_apply_gate", None) is default_gate
            and type(getattr(module, "act_fn", None)) in silu_types)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, layout, recipe: FP8Recipe,
                    transposed: bool, bias: Optional[torch.Tensor],
                    src_tokens: Optional[torch.Tensor] = None, swiglu: bool = False) -> torch.Tensor:
    """``out[seg g] = x[seg g] @ W[g]^T (+ bias[g])`` on the FP8 grouped GEMMs; with
    ``src_tokens`` x is the tokens and the rows are ``x[src_tokens]``, gathered inside the
    FP8 casts; with ``swiglu`` x is [gate | up] and the input silu(gate) * up, made inside
    the casts (``FP8GroupedLinear``)."""
    if recipe.accumulate_into_main_grad:
        if transposed:
            raise ValueError("recipe: accumulate_into_main_grad needs experts stored [E, N, K] "
                             "(is_transposed=False)")
        check_main_grad(weight)
    if transposed:
        # Stored [E, K, N]: the kernels read K-major [E, N, K], so materialise it (its
        # backward transposes the gradient back).
        weight = weight.transpose(1, 2).contiguous()
    out_dtype = compute_dtype(x)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = FP8GroupedLinearFunction.apply(x, weight, layout.group_offsets, recipe, out_dtype,
                                             src_tokens, layout.align, swiglu)
    else:
        out = _grouped_forward(x, weight, layout.group_offsets, src_tokens, recipe, out_dtype,
                               False, False, layout.align, swiglu)[0]
    if bias is not None:
        # Expert of each padded row; padding rows get a bias too, but unpermute never reads
        # them and their gradient rows are zero, so they change nothing.
        rows = torch.arange(out.shape[0], device=out.device)
        expert = torch.searchsorted(layout.group_offsets[1:-1].long(), rows, right=True)
        out = out + bias[expert].to(out.dtype)
    return out


def _fallback(module: nn.Module) -> Callable:
    """The implementation an unconverted experts module ran before the switch."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    previous = getattr(module, _PREVIOUS_ATTR, None)
    original = type(module).forward.__wrapped__
    if previous in (None, "eager", EXPERTS_IMPLEMENTATION):
        return original
    return ALL_EXPERTS_FUNCTIONS.get_interface(previous, original)


def fp8train_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                             top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward (``[T, H]``, ``[T, k]`` ids, ``[T, k]`` weights) ->
    ``[T, H]`` through fp8train's padded layout and grouped FP8 GEMMs."""
    recipe = getattr(self, _RECIPE_ATTR, None)
    if recipe is None:  # an experts module conversion left alone (dims, filter_fn)
        return _fallback(self)(self, hidden_states, top_k_index, top_k_weights)
    up = _up_weight(self)
    num_experts = up.shape[0]
    layout = build_moe_layout(top_k_index, num_experts, segment_rows_for(top_k_index.numel(), num_experts))
    up_bias = down_bias = None
    if self.has_bias:
        up_bias = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
        down_bias = self.down_proj_bias
    check_tensor("hidden_states", hidden_states, ndims=(2,))
    if hidden_states.shape[0] != layout.num_tokens:
        raise ValueError(f"hidden_states: expected {layout.num_tokens} rows (tokens), got "
                         f"{hidden_states.shape[0]}")
    swiglu = getattr(self, _FUSED_SWIGLU_ATTR, False)  # fused into the down projection's casts
    if (swiglu and not self.has_bias and not self.is_transposed
            and fuses_expert_block(hidden_states, up, self.down_proj, recipe)):
        # Both projections as one Function: SwiGLU's gradient made inside the casts too.
        y = FP8GroupedSwiGLUFunction.apply(hidden_states, up, self.down_proj, layout.group_offsets,
                                           layout.src_tokens, recipe, compute_dtype(hidden_states),
                                           layout.align)                       # [rows, H]
    else:
        # The permutation into the padded layout happens inside the FP8 casts.
        h = _grouped_linear(hidden_states, up, layout, recipe, self.is_transposed, up_bias,
                            layout.src_tokens)                                 # [rows, 2I]
        if not swiglu:
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)       # [rows, I]
        y = _grouped_linear(h, self.down_proj, layout, recipe, self.is_transposed, down_bias,
                            swiglu=swiglu)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    return unpermute(y, layout, top_k_weights).to(hidden_states.dtype)        # [T, H]


def register_experts_implementation() -> None:
    """Register ``"fp8train"`` with transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fp8train_experts_forward)


def convert_experts(model: nn.Module, recipe: FP8Recipe, filter_fn, report) -> None:
    """Route every eligible fused experts module of ``model`` through fp8train; record each
    in ``report`` (converted, skipped with the reason, or already FP8)."""
    experts = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    if not experts:
        return
    register_experts_implementation()
    converted = []
    for name, module in experts:
        if getattr(module, _RECIPE_ATTR, None) is not None:
            report.already_fp8.append(name)
            continue
        if not hasattr(module, _PREVIOUS_ATTR):
            setattr(module, _PREVIOUS_ATTR, module.config._experts_implementation)
        why = experts_fp8_ineligible(module)
        if why is None and filter_fn is not None and not filter_fn(module, name):
            why = "filter_fn returned False"
        if why is not None:
            report.skipped.append((name, why))
            continue
        setattr(module, _RECIPE_ATTR, recipe)
        setattr(module, _FUSED_SWIGLU_ATTR, _default_swiglu_gate(module))
        converted.append(module)
        report.converted.append((name, f"{type(module).__name__} (experts_implementation="
                                       f"{EXPERTS_IMPLEMENTATION!r})"))
    for name, module in experts:
        # Every experts module of a config must run "fp8train" (it falls back by itself when
        # not converted): the implementation is a per-config choice in transformers.
        module.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    if hasattr(model, "set_experts_implementation") and hasattr(model, "config"):
        model.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION


# The bodies of transformers' SwiGLU MLP forwards (Llama, Mistral, Qwen2/3 and the dense
# MLPs of their MoE variants), whitespace removed: the modules fuse_swiglu_mlps may fuse.
_SWIGLU_PRODUCT = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
_SWIGLU_MLP_BODIES = (f"down_proj={_SWIGLU_PRODUCT}returndown_proj", f"return{_SWIGLU_PRODUCT}")


@functools.lru_cache(maxsize=None)
def _is_swiglu_mlp_class(cls: type) -> bool:
    """Whether ``cls.forward`` is, to the character, ``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))``: only then does the fused forward compute what the class computes."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return False
    return (len(lines) > 1 and lines[0].strip().startswith("def forward(self, x")
            and "".join("".join(lines[1:]).split()) in _SWIGLU_MLP_BODIES)


def _swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A transformers SwiGLU MLP's forward as one FP8 Function where it can (``swiglu_mlp``:
    SwiGLU and its gradients made inside the FP8 casts): the same bits as the class's own."""
    return swiglu_mlp(self.gate_proj, self.up_proj, self.down_proj, x)


def fuse_swiglu_mlps(model: nn.Module) -> None:
    """Give every transformers SwiGLU MLP whose down projection is an ``FP8Linear`` and
    whose activation is a plain SiLU the fused forward (an instance attribute: the class,
    its parameters and its state_dict are unchanged)."""
    silu_types = _default_gate_parts()[1]
    for module in model.modules():
        if ("forward" not in vars(module) and isinstance(getattr(module, "down_proj", None), FP8Linear)
                and type(getattr(module, "act_fn", None)) in silu_types
                and isinstance(getattr(module, "gate_proj", None), nn.Module)
                and isinstance(getattr(module, "up_proj", None), nn.Module)
                and _is_swiglu_mlp_class(type(module))):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)


def skip_routers(model: nn.Module, report) -> None:
    """List the routers that are not ``nn.Linear`` (so the generic loop never sees them) as
    kept in high precision, so the report accounts for them."""
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ROUTER_NAMES and not isinstance(module, nn.Linear) \
                and isinstance(getattr(module, "weight", None), torch.Tensor):
            report.skipped.append((name, f"MoE router ({type(module).__name__}), kept in "
                                         "high precision"))
