"""One FP8 cast of an input that several linear layers read (eager mode).

Sibling projections read the same activation: q/k/v of an attention block, gate/up of a
SwiGLU MLP. Each ``FP8Linear`` would cast it again (the same bytes, the same result) and
save its own column-wise copy for wgrad. This keeps the last cast per thread, keyed by
the input tensor itself (a weak reference, so a freed tensor whose memory is reused can
never match) and its version counter (an in-place update invalidates it); the entry is
dropped when the input dies, so it never holds FP8 copies longer than the input lives.

Under ``torch.compile`` the cache is bypassed: the casts are functional custom ops, which
the compiler's common-subexpression pass merges by itself.
"""
from __future__ import annotations

import threading
import weakref

import torch

from . import _custom_ops as ops

_state = threading.local()


def _holder() -> list:
    """This thread's one-slot list; the slot is [None] or the cached entry. The list itself
    is handed to the weak reference's callback, which may run on another thread (autograd's
    backward thread frees most inputs)."""
    holder = getattr(_state, "holder", None)
    if holder is None:
        holder = _state.holder = [None]
    return holder


def cast_input_layouts(x: torch.Tensor, x_hp: torch.Tensor, pow2_scale: bool, rowwise: bool,
                       colwise: bool, backend: str = "") -> tuple:
    """``ops.cast_1x128_layouts(x_hp, ...)`` for ``x_hp = x.reshape(-1, K)``, reusing the
    previous call's result when it cast the very same ``x`` (unchanged since) with the same
    scale rule and at least the layouts asked for."""
    if torch.compiler.is_compiling() or x.is_inference() or not (rowwise or colwise):
        return ops.cast_1x128_layouts(x_hp, pow2_scale, rowwise, colwise, backend)
    holder = _holder()
    entry = holder[0]
    if entry is not None:
        ref, version, pow2, has_rows, has_cols, result = entry
        if (ref() is x and version == x._version and pow2 == pow2_scale
                and (has_rows or not rowwise) and (has_cols or not colwise)):
            q, scale, qt, scale_t = result
            return (q if rowwise else None, scale if rowwise else None,
                    qt if colwise else None, scale_t if colwise else None)
    result = ops.cast_1x128_layouts(x_hp, pow2_scale, rowwise, colwise, backend)

    def drop(dead_ref, holder=holder):
        # Called when x is freed; only the entry that refers to x is dropped.
        entry = holder[0]
        if entry is not None and entry[0] is dead_ref:
            holder[0] = None

    holder[0] = (weakref.ref(x, drop), x._version, pow2_scale, rowwise, colwise, result)
    return result


def cached() -> bool:
    """Whether this thread holds a cached cast (tests)."""
    return _holder()[0] is not None


def clear() -> None:
    """Forget this thread's cached cast."""
    _holder()[0] = None
