"""``convert_to_fp8``: swap a model's eligible ``nn.Linear`` and ``MoE`` modules for their
FP8 versions in place, and say what was swapped and why the rest was not.

Kept in high precision (DeepSeek-V3): embeddings (never an ``nn.Linear``), the output head,
routers (``Router`` is not an ``nn.Linear``), norms and attention math, and any linear layer
whose dims are not multiples of 128. The output head is recognised as an ``nn.Linear``
that shares its weight with an ``nn.Embedding`` (tied), projects to an embedding's vocabulary
size from outside the layer stack (no numeric component in its name), or is named
``lm_head``/``output``/``head``/``classifier``/``score``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from torch import nn

from .linear import FP8Linear, fp8_eligible_dims
from .moe import FP8MoE, MoE, moe_fp8_ineligible
from .recipe import FP8Recipe

HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConversionReport:
    """What ``convert_to_fp8`` did: ``converted`` (name, new type), ``skipped`` (name,
    reason), ``already_fp8`` (names left as they were). ``print(report)`` shows a table."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    already_fp8: List[str] = field(default_factory=list)

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"convert_to_fp8: {len(self.converted)} converted, {len(self.skipped)} kept "
                 f"in high precision, {len(self.already_fp8)} already FP8"]
        lines += [f"  converted  {name or '<root>'} -> {kind}" for name, kind in self.converted]
        lines += [f"  kept       {name or '<root>'}: {why}" for name, why in self.skipped]
        lines += [f"  already    {name or '<root>'}" for name in self.already_fp8]
        return "\n".join(lines)


def _head_reason(name: str, linear: nn.Linear, embeddings: List[nn.Embedding]) -> Optional[str]:
    if any(linear.weight is emb.weight for emb in embeddings):
        return "output head (weight tied to an embedding)"
    # Inside a stack of layers (a numeric path component) a vocabulary-sized projection is
    # a coincidence of sizes (an MLP as wide as the vocabulary), not the head.
    in_stack = any(part.isdigit() for part in name.split("."))
    if not in_stack and any(linear.out_features == emb.num_embeddings for emb in embeddings):
        return "output head (projects to an embedding's vocabulary)"
    if name.rsplit(".", 1)[-1] in HEAD_NAMES:
        return f"output head (named {name.rsplit('.', 1)[-1]!r})"
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_to_fp8(model: nn.Module, recipe: Optional[FP8Recipe] = None,
                   filter_fn: Optional[FilterFn] = None, *,
                   keep_head: bool = True) -> ConversionReport:
    """Swap eligible layers of ``model`` for FP8 ones, in place; returns a report.

    ``nn.Linear`` -> ``FP8Linear`` and ``MoE`` -> ``FP8MoE``, sharing the original
    Parameters (an existing optimizer keeps working). A layer is converted when its GEMM
    dims are multiples of 128, it is not the output head (unless ``keep_head=False``), and
    ``filter_fn(module, name)`` (if given) returns True. Converting twice changes nothing.

    Hugging Face transformers models (see ``fp8train.nn.hf``, docs/hf.md) also keep their
    routers in high precision and run their fused experts modules through the grouped FP8
    GEMMs (experts implementation ``"fp8train"``); their SwiGLU MLPs make the product inside
    the FP8 down projection's casts; their state_dict stays as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    recipe = FP8Recipe() if recipe is None else recipe
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe: expected an FP8Recipe or None, got {type(recipe).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, name) -> bool or None, "
                        f"got {type(filter_fn).__name__}")
    if not isinstance(keep_head, bool):
        raise TypeError(f"keep_head: expected a bool, got {type(keep_head).__name__}")
    if type(model) in (nn.Linear, MoE):
        raise ValueError(f"model: a bare {type(model).__name__} cannot be swapped in place; "
                         "use FP8Linear.from_linear / FP8MoE.from_moe")

    report = ConversionReport()
    # Hugging Face models get router rules and fused-experts routing from .hf (the only
    # module that imports transformers, and only for them).
    hf = None
    if is_hf_model(model):
        from . import hf
    modules = list(model.named_modules())  # snapshot: the loop replaces modules
    embeddings = [m for _, m in modules if isinstance(m, nn.Embedding)]
    for name, module in modules:
        if isinstance(module, (FP8Linear, FP8MoE)):
            report.already_fp8.append(name)
            continue
        if isinstance(module, (nn.Linear, MoE)) and type(module) not in (nn.Linear, MoE):
            # A subclass has behaviour of its own that the swap would drop.
            report.skipped.append((name, f"{type(module).__name__} is a subclass, not swapped"))
            continue
        if isinstance(module, MoE):
            why = moe_fp8_ineligible(module)
            build = FP8MoE.from_moe
        elif isinstance(module, nn.Linear):
            why = fp8_eligible_dims(module.in_features, module.out_features)
            if why is None and keep_head:
                why = _head_reason(name, module, embeddings)
            if why is None and hf is not None:
                why = hf.linear_skip_reason(name)
            build = FP8Linear.from_linear
        else:
            continue
        if why is None and filter_fn is not None and not filter_fn(module, name):
            why = "filter_fn returned False"
        if why is not None:
            report.skipped.append((name, why))
            continue
        new = build(module, recipe)
        _set_submodule(model, name, new)
        report.converted.append((name, type(new).__name__))
    if hf is not None:
        hf.convert_experts(model, recipe, filter_fn, report)
        hf.skip_routers(model, report)
        hf.fuse_swiglu_mlps(model)
    return report


def is_hf_model(model: nn.Module) -> bool:
    """True when ``model`` is or holds a transformers module (by module name: transformers
    is never imported for a plain PyTorch model)."""
    return any(type(m).__module__.startswith("transformers.") for m in model.modules())
