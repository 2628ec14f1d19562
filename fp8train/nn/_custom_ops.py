"""The FP8 casts and GEMMs used by the autograd functions, registered as
``torch.library`` custom ops (namespace ``fp8train``) with fake implementations.

Why custom ops: ``torch.compile`` cannot trace into the GEMM dispatch (host-side checks,
backend choice, and later native kernel launches), so each call is one opaque node whose
output shapes the fake implementation gives. That keeps ``fullgraph=True`` working.

In eager mode the same Python bodies run directly (``_op``): a trip through the dispatcher
costs tens of microseconds of host time per call, and an eager FP8 linear layer makes
seven of these calls a step.

Every op takes ``backend`` (``""``: the process-wide choice), handed down to the casts and
GEMMs as an argument. Autocast changes nothing inside: the kernels and cuBLAS take FP8
operands, and the reference emulation turns autocast off around its FP32 block products.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..ops import gemm as _gemm
from ..ops import scale_layout
from ..quant import casts as _casts
from ..quant import moe_casts as _moe_casts
from ..quant.formats import FP8_DTYPE, GROUP

Tensor = torch.Tensor
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _ceil_to(n, multiple: int):
    # Works on ints and SymInts alike (fake implementations see symbolic sizes).
    return -(-n // multiple) * multiple


def _runs_direct(args) -> bool:
    """Whether a call may run an op's body itself: eager, no dispatch mode (fake tensors,
    tracing), and only plain tensors on a real device (a subclass or a meta tensor goes
    through the registered op and its fake)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta):
            return False
    return True


# Registered through torch.library.Library rather than torch.library.custom_op: under
# torch.compile every op call is a dispatcher round trip, and custom_op's Python wrappers
# (its autograd and inplace-or-view kernels) cost about four times the plain registration's
# host time per call (CPU: ~40 us against ~10 us). These ops are only ever called inside
# autograd Functions, which own the gradients.
_LIBRARY = torch.library.Library("fp8train", "DEF")


def _op(name: str, mutates_args=()):
    """Register the function as the custom op ``fp8train::name`` (schema from its type
    annotations); the returned callable runs the function itself where ``_runs_direct``
    allows and the op otherwise. ``.op`` is the registered op, ``.register_fake`` registers
    its fake implementation, ``.body`` is the function (what a fused op's body calls: it
    runs directly already)."""
    def register(fn):
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if _runs_direct(args) else call.op(*args)

        call.op = getattr(torch.ops.fp8train, name).default
        call.body = fn
        call.register_fake = torch.library.register_fake(f"fp8train::{name}", lib=_LIBRARY)
        return call
    return register


def _backend(backend: str):
    return backend or None


def _colwise(x: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """x [T, K] -> x.T cast 1x128 along T, T zero-padded to a multiple of 128.

    Zero rows leave every group's amax (so every scale and FP8 value) unchanged; they only
    make T a legal contraction length for the wgrad GEMM.
    """
    t, k = x.shape
    if t == 0:
        return x.new_empty(k, 0, dtype=FP8_DTYPE), x.new_empty(k, 0, dtype=torch.float32)
    pad = _ceil_to(t, GROUP) - t
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return _casts.per_token_cast_transposed(x, pow2_scale=pow2_scale, backend=_backend(backend))


# --------------------------------------------------------------------------- casts
@_op("cast_1x128")
def cast_1x128(x: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Row-wise 1x128 cast of x [T, K] (the fprop/dgrad A operand); the scale packed
    (`scale_layout.pack`)."""
    q, scale, _, _ = _cast_layouts(x, pow2_scale, True, False, backend)
    return q, scale_layout.pack(scale)


# 1x128 scales cross the custom-op boundary as their contiguous storage (scale_layout.pack):
# Inductor assumes contiguous outputs of these ops; the wrappers below unpack them outside.


def _fake_rowwise(x):
    t, k = x.shape
    kb = _ceil_to(k, GROUP) // GROUP
    return x.new_empty(t, k, dtype=FP8_DTYPE), x.new_empty(kb, scale_layout.kblock_major_ld(t), dtype=torch.float32)


def _fake_colwise(x):
    t, k = x.shape
    tp = _ceil_to(t, GROUP)
    return (x.new_empty(k, tp, dtype=FP8_DTYPE),
            x.new_empty(tp // GROUP, scale_layout.kblock_major_ld(k), dtype=torch.float32))


@cast_1x128.register_fake
def _(x, pow2_scale, backend):
    return _fake_rowwise(x)


@_op("cast_1x128_colwise")
def cast_1x128_colwise(x: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Column-wise cast of x [T, K] -> ([K, Tp] e4m3, [K, Tp/128] f32 packed), Tp = T padded
    to 128."""
    if x.shape[0] == 0:
        return _fake_colwise(x)
    qt, scale_t = _cast_layouts(x, pow2_scale, False, True, backend)[2:]
    return qt, scale_layout.pack(scale_t)


@cast_1x128_colwise.register_fake
def _(x, pow2_scale, backend):
    return _fake_colwise(x)


@_op("cast_1x128_both")
def cast_1x128_both(x: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both layouts of x [T, K] in one op: row-wise (along K) and column-wise (along T,
    padded), from one read of x; both scales packed."""
    if x.shape[0] == 0:  # no tokens: nothing to cast, empty operands of the right shapes
        return (*_fake_rowwise(x), *_fake_colwise(x))
    q, scale, qt, scale_t = _cast_layouts(x, pow2_scale, True, True, backend)
    return q, scale_layout.pack(scale), qt, scale_layout.pack(scale_t)


@cast_1x128_both.register_fake
def _(x, pow2_scale, backend):
    return (*_fake_rowwise(x), *_fake_colwise(x))


@_op("cast_swiglu")
def cast_swiglu(gate: Tensor, up: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Row-wise 1x128 cast of silu(gate) * up [T, I] (gate and up [T, I]), never written in
    high precision; the scale packed."""
    if gate.shape[0] == 0:
        return _fake_rowwise(gate)
    q, scale = _casts.swiglu_cast(gate, up, colwise=False, pow2_scale=pow2_scale,
                                  backend=_backend(backend))[:2]
    return q, scale_layout.pack(scale)


@cast_swiglu.register_fake
def _(gate, up, pow2_scale, backend):
    return _fake_rowwise(gate)


@_op("cast_swiglu_both")
def cast_swiglu_both(gate: Tensor, up: Tensor, pow2_scale: bool,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both 1x128 layouts of silu(gate) * up (row-wise, and column-wise along T, padded)
    from one read of gate and up; both scales packed."""
    if gate.shape[0] == 0:
        return (*_fake_rowwise(gate), *_fake_colwise(gate))
    q, scale, qt, scale_t = _casts.swiglu_cast(gate, up, pow2_scale=pow2_scale, backend=_backend(backend))
    return q, scale_layout.pack(scale), qt, scale_layout.pack(scale_t)


@cast_swiglu_both.register_fake
def _(gate, up, pow2_scale, backend):
    return (*_fake_rowwise(gate), *_fake_colwise(gate))


@_op("cast_swiglu_grad_both")
def cast_swiglu_grad_both(h: Tensor, grad: Tensor, pow2_scale: bool,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both 1x128 layouts of d[gate | up] [M, 2I], the gradient of silu(gate) * up (h = [gate
    | up] [M, 2I], grad [M, I], I a multiple of 128) that autograd's ops compute, without
    writing it: the SwiGLU-backward cast of each half (``swiglu_backward_cast``), side by
    side. No 1x128 group straddles the halves, so these are the bits of casting d[gate | up]
    itself. Both scales packed."""
    if grad.shape[0] == 0:
        return (*_fake_rowwise(h), *_fake_colwise(h))
    gate, up = h.chunk(2, dim=-1)
    dgate, dup = _casts.swiglu_backward_cast(grad, gate, up, pow2_scale=pow2_scale, backend=_backend(backend))
    return (torch.cat([dgate[0], dup[0]], 1),
            torch.cat([scale_layout.pack(dgate[1]), scale_layout.pack(dup[1])], 0),
            torch.cat([dgate[2], dup[2]], 0),
            torch.cat([scale_layout.pack(dgate[3]), scale_layout.pack(dup[3])], 1))


@cast_swiglu_grad_both.register_fake
def _(h, grad, pow2_scale, backend):
    return (*_fake_rowwise(h), *_fake_colwise(h))


def cast_swiglu_grad_layouts(h: Tensor, grad: Tensor, pow2_scale: bool, backend: str = ""):
    """``cast_1x128_layouts(swiglu_grad(h, grad), pow2_scale, True, True)`` without making the
    gradient (``cast_swiglu_grad_both``): (fp8, scale, t_fp8, t_scale)."""
    q, packed, qt, packed_t = cast_swiglu_grad_both(h, grad, pow2_scale, backend)
    return q, scale_layout.unpack(packed, h.shape[0]), qt, scale_layout.unpack(packed_t, h.shape[1])


def cast_swiglu_layouts(gate: Tensor, up: Tensor, pow2_scale: bool, colwise: bool, backend: str = ""):
    """``cast_1x128_layouts(silu(gate) * up, pow2_scale, True, colwise)`` without the SwiGLU
    product: (fp8, scale, t_fp8, t_scale), the last two None unless ``colwise``."""
    if _runs_direct((gate, up)) and gate.shape[0] > 0:
        return _casts.swiglu_cast(gate, up, colwise=colwise, pow2_scale=pow2_scale, backend=_backend(backend))
    if colwise:
        q, packed, qt, packed_t = cast_swiglu_both(gate, up, pow2_scale, backend)
        return q, scale_layout.unpack(packed, gate.shape[0]), qt, scale_layout.unpack(packed_t, gate.shape[1])
    q, packed = cast_swiglu(gate, up, pow2_scale, backend)
    return q, scale_layout.unpack(packed, gate.shape[0]), None, None


def _cast_layouts(x: Tensor, pow2_scale: bool, rowwise: bool, colwise: bool, backend: str):
    """The casts themselves (row-wise scales unpacked)."""
    if rowwise and colwise and x.shape[0] > 0:
        return _casts.per_token_cast_dual(x, pow2_scale=pow2_scale, backend=_backend(backend))
    q = scale = qt = scale_t = None
    if rowwise:
        q, scale = _casts.per_token_cast(x, pow2_scale=pow2_scale, backend=_backend(backend))
    if colwise:
        qt, scale_t = _colwise(x, pow2_scale, backend)
    return q, scale, qt, scale_t


def cast_1x128_layouts(x_hp: Tensor, pow2_scale: bool, rowwise: bool, colwise: bool,
                       backend: str = ""):
    """The 1x128 layouts of an activation or output gradient [T, K] that the GEMMs need,
    from one cast when both are: row-wise (fprop/dgrad A operand) and column-wise along
    tokens (wgrad operand). Returns (fp8, scale, t_fp8, t_scale); unneeded ones are None."""
    if not (rowwise or colwise):
        return None, None, None, None
    if _runs_direct((x_hp,)):
        return _cast_layouts(x_hp, pow2_scale, rowwise, colwise, backend)
    rows, cols = x_hp.shape
    if rowwise and colwise:
        q, packed, qt, packed_t = cast_1x128_both(x_hp, pow2_scale, backend)
        return q, scale_layout.unpack(packed, rows), qt, scale_layout.unpack(packed_t, cols)
    if rowwise:
        q, packed = cast_1x128(x_hp, pow2_scale, backend)
        return q, scale_layout.unpack(packed, rows), None, None
    qt, packed_t = cast_1x128_colwise(x_hp, pow2_scale, backend)
    return None, None, qt, scale_layout.unpack(packed_t, cols)


@_op("cast_128x128")
def cast_128x128(w: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """128x128 block cast of a weight [N, K] or expert stack [G, N, K]."""
    return _casts.per_block_cast(w, pow2_scale=pow2_scale, backend=_backend(backend))


def _fake_block(w):
    """(W_q, scale, (W^T)_q, scale^T) of the 128x128 casts of w [..., N, K], empty."""
    n, k = w.shape[-2:]
    nb, kb = _ceil_to(n, GROUP) // GROUP, _ceil_to(k, GROUP) // GROUP
    lead = w.shape[:-2]
    return (w.new_empty(w.shape, dtype=FP8_DTYPE),
            w.new_empty(*lead, nb, kb, dtype=torch.float32),
            w.new_empty(*lead, k, n, dtype=FP8_DTYPE),
            w.new_empty(*lead, kb, nb, dtype=torch.float32))


@cast_128x128.register_fake
def _(w, pow2_scale, backend):
    return _fake_block(w)[:2]


@_op("cast_128x128_dual")
def cast_128x128_dual(w: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 128x128 casts of a weight [N, K] (or [G, N, K]) and of its transpose from one
    read of w: (W_q, scale, (W^T)_q, scale^T). The transposed pair is byte for byte the
    first one transposed (``transpose_128x128``), written by the same kernel pass."""
    w_fp8, w_scale, wt_fp8, wt_scale = _casts.per_block_cast_dual(w, pow2_scale=pow2_scale,
                                                                  backend=_backend(backend))
    # A custom op's outputs must not alias each other: the reference transposes the scale
    # grid with .contiguous(), a view when the grid has a single row or column.
    if wt_scale.untyped_storage().data_ptr() == w_scale.untyped_storage().data_ptr():
        wt_scale = wt_scale.clone()
    return w_fp8, w_scale, wt_fp8, wt_scale


@cast_128x128_dual.register_fake
def _(w, pow2_scale, backend):
    return _fake_block(w)


@_op("cast_128x128_transposed")
def cast_128x128_transposed(w: Tensor, pow2_scale: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """The 128x128 cast of w's transpose read from w [N, K] (or [G, N, K]): dgrad's
    (W^T)_q when the forward kept no copy; the same bytes as cast_128x128_dual's pair."""
    return _casts.per_block_cast_transposed(w, pow2_scale=pow2_scale, backend=_backend(backend))


@cast_128x128_transposed.register_fake
def _(w, pow2_scale, backend):
    return _fake_block(w)[2:]


# The MoE casts with the permutation into the padded layout fused in: x [T, K] holds the
# tokens, src_tokens int64 [M] the token each padded row copies (T: a zero row), and the
# results are those of cast_1x128 / cast_1x128_both on ``permute(x)`` [M, K], which never
# exists in high precision.
def _fake_permuted_rowwise(x, src_tokens):
    return _fake_rowwise(x.new_empty(src_tokens.shape[0], x.shape[1]))


def _fake_permuted_colwise(x, src_tokens):
    return _fake_colwise(x.new_empty(src_tokens.shape[0], x.shape[1]))


@_op("cast_1x128_permuted")
def cast_1x128_permuted(x: Tensor, src_tokens: Tensor, pow2_scale: bool,
                        backend: str) -> Tuple[Tensor, Tensor]:
    """Row-wise 1x128 cast of the padded layout's rows x[src_tokens] -> [M, K], [M, K/128]."""
    if src_tokens.shape[0] == 0:  # no rows: empty operands of the right shapes
        return _fake_permuted_rowwise(x, src_tokens)
    q, scale, _, _ = _cast_permuted(x, src_tokens, pow2_scale, False, backend)
    return q, scale_layout.pack(scale)


@cast_1x128_permuted.register_fake
def _(x, src_tokens, pow2_scale, backend):
    return _fake_permuted_rowwise(x, src_tokens)


@_op("cast_1x128_permuted_both")
def cast_1x128_permuted_both(x: Tensor, src_tokens: Tensor, pow2_scale: bool,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row-wise and column-wise (along the M padded rows) casts of x[src_tokens]: the
    fprop operand and the wgrad operand of the padded layout from one gathered read."""
    if src_tokens.shape[0] == 0:
        return (*_fake_permuted_rowwise(x, src_tokens), *_fake_permuted_colwise(x, src_tokens))
    q, scale, qt, scale_t = _cast_permuted(x, src_tokens, pow2_scale, True, backend)
    return q, scale_layout.pack(scale), qt, scale_layout.pack(scale_t)


@cast_1x128_permuted_both.register_fake
def _(x, src_tokens, pow2_scale, backend):
    return (*_fake_permuted_rowwise(x, src_tokens), *_fake_permuted_colwise(x, src_tokens))


def _cast_permuted(x: Tensor, src_tokens: Tensor, pow2_scale: bool, colwise: bool, backend: str):
    """(fp8, scale, t_fp8, t_scale) of x[src_tokens], row-wise scales unpacked."""
    result = _moe_casts.per_token_cast_permuted(x, src_tokens, pow2_scale=pow2_scale,
                                                colwise=colwise, backend=_backend(backend))
    return result if colwise else (*result, None, None)


def cast_1x128_permuted_layouts(x_hp: Tensor, src_tokens: Tensor, pow2_scale: bool,
                                colwise: bool, backend: str = ""):
    """``cast_1x128_layouts(permute(x_hp), pow2_scale, True, colwise)`` without the permuted
    copy: (fp8, scale, t_fp8, t_scale), the last two None unless ``colwise``."""
    if _runs_direct((x_hp, src_tokens)) and src_tokens.shape[0] > 0:
        return _cast_permuted(x_hp, src_tokens, pow2_scale, colwise, backend)
    rows = src_tokens.shape[0]
    if colwise:
        q, packed, qt, packed_t = cast_1x128_permuted_both(x_hp, src_tokens, pow2_scale, backend)
        return q, scale_layout.unpack(packed, rows), qt, scale_layout.unpack(packed_t, x_hp.shape[1])
    q, packed = cast_1x128_permuted(x_hp, src_tokens, pow2_scale, backend)
    return q, scale_layout.unpack(packed, rows), None, None


# --------------------------------------------------------------------------- GEMMs
@_op("gemm_nt")
def gemm_nt(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
            out_dtype: torch.dtype, backend: str) -> Tensor:
    """``fp8_gemm_nt`` returning a new [M, N] tensor of ``out_dtype``."""
    return _gemm.fp8_gemm_nt((a, a_scale), (b, b_scale), out_dtype=out_dtype,
                             backend=_backend(backend))


@gemm_nt.register_fake
def _(a, a_scale, b, b_scale, out_dtype, backend):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@_op("gemm_nt_accumulate_", mutates_args=("out",))
def gemm_nt_accumulate_(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                        out: Tensor, backend: str) -> None:
    """``out += a @ b.T`` in FP32 (wgrad into ``main_grad``)."""
    _gemm.fp8_gemm_nt((a, a_scale), (b, b_scale), out, accumulate=True,
                      backend=_backend(backend))


@gemm_nt_accumulate_.register_fake
def _(a, a_scale, b, b_scale, out, backend):
    return None


@_op("grouped_gemm_nt_contiguous")
def grouped_gemm_nt_contiguous(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                               group_offsets: Tensor, k_grouped: bool, segment_rows: int,
                               backend: str) -> Tensor:
    """MoE GEMMs on the contiguous layout: fprop/dgrad (m-grouped, bf16 [M, N], offsets
    multiples of ``segment_rows``) or, with ``k_grouped``, wgrad (float32 [G, N, K] from
    1x128-along-T operands a [N, T], b [K, T]; any multiple of 128 is a legal segment)."""
    if k_grouped:
        return _gemm.k_grouped_fp8_gemm_nt_contiguous((a, a_scale), (b, b_scale), group_offsets,
                                                      backend=_backend(backend))
    return _gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (b, b_scale), group_offsets,
                                                  segment_rows=segment_rows, backend=_backend(backend))


@grouped_gemm_nt_contiguous.register_fake
def _(a, a_scale, b, b_scale, group_offsets, k_grouped, segment_rows, backend):
    if k_grouped:
        return a.new_empty(group_offsets.shape[0] - 1, a.shape[0], b.shape[0], dtype=torch.float32)
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)


@_op("k_grouped_gemm_nt_accumulate_", mutates_args=("out",))
def k_grouped_gemm_nt_accumulate_(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
                                  group_offsets: Tensor, out: Tensor, backend: str) -> None:
    """MoE wgrad added in FP32 into ``out`` [G, N, K] (``main_grad``)."""
    _gemm.k_grouped_fp8_gemm_nt_contiguous((a, a_scale), (b, b_scale), group_offsets, out,
                                           accumulate=True, backend=_backend(backend))


@k_grouped_gemm_nt_accumulate_.register_fake
def _(a, a_scale, b, b_scale, group_offsets, out, backend):
    return None


# --------------------------------------------------------------------------- a linear layer's step
# Under torch.compile every custom op call is a dispatcher round trip: on the lent H100's CPU
# about 100 us of host time on top of the op's own work, and a linear layer step made seven
# of them (compiled steps were host-bound). With the default recipe a layer step makes
# three: the input's cast (its own op, so the casts of one input by sibling layers merge),
# the forward GEMM with its weight cast, and the whole backward.
@_op("fprop_cast_weight")
def fprop_cast_weight(x_fp8: Tensor, x_scale: Tensor, weight: Tensor, pow2_scale: bool,
                      out_dtype: torch.dtype, backend: str) -> Tensor:
    """``gemm_nt(x_q, cast_128x128(weight))``: the forward GEMM [T, N] with the weight's
    128x128 cast made inside."""
    w_fp8, w_scale = cast_128x128.body(weight, pow2_scale, backend)
    return gemm_nt.body(x_fp8, x_scale, w_fp8, w_scale, out_dtype, backend)


@fprop_cast_weight.register_fake
def _(x_fp8, x_scale, weight, pow2_scale, out_dtype, backend):
    return x_fp8.new_empty(x_fp8.shape[0], weight.shape[0], dtype=out_dtype)


@_op("linear_grads")
def linear_grads(grad_out: Tensor, weight: Tensor, xt_fp8: Tensor, xt_scale: Tensor,
                 pow2_scale: bool, dx_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    """Both gradients of ``y = x @ weight.T`` from grad_out [T, N] (T >= 1) and x's
    column-wise cast: dy's two casts from one read, (W^T)_q cast from the weight, then
    dgrad (dx [T, K] in ``dx_dtype``) and wgrad (dw [N, K] float32)."""
    return _grads_from_casts(_cast_layouts(grad_out, pow2_scale, True, True, backend), weight, xt_fp8,
                             xt_scale, pow2_scale, dx_dtype, backend)


def _grads_from_casts(dy_casts: tuple, weight: Tensor, xt_fp8: Tensor, xt_scale: Tensor,
                      pow2_scale: bool, dx_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    """dgrad (in ``dx_dtype``) and wgrad (float32) of ``y = x @ weight.T`` from dy's two casts
    (dy_fp8, dy_scale, dyt_fp8, dyt_scale): (W^T)_q cast from the weight, then both GEMMs."""
    dy_fp8, dy_scale, dyt_fp8, dyt_scale = dy_casts
    w_t_fp8, w_t_scale = cast_128x128_transposed.body(weight, pow2_scale, backend)
    return (gemm_nt.body(dy_fp8, dy_scale, w_t_fp8, w_t_scale, dx_dtype, backend),
            gemm_nt.body(dyt_fp8, dyt_scale, xt_fp8, xt_scale, torch.float32, backend))


@linear_grads.register_fake
def _(grad_out, weight, xt_fp8, xt_scale, pow2_scale, dx_dtype, backend):
    return (grad_out.new_empty(grad_out.shape[0], weight.shape[1], dtype=dx_dtype),
            grad_out.new_empty(weight.shape, dtype=torch.float32))


@_op("swiglu_input_grads")
def swiglu_input_grads(grad: Tensor, gate: Tensor, up: Tensor, w_gate: Tensor, w_up: Tensor,
                       xt_fp8: Tensor, xt_scale: Tensor, pow2_scale: bool, dx_dtype: torch.dtype,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of a SwiGLU MLP's gate and up projections (``gate = x @ w_gate.T``,
    ``up = x @ w_up.T``) from the gradient of silu(gate) * up [T, I] (T >= 1): SwiGLU's
    backward and the casts of d(gate) and d(up) from one read (``swiglu_backward_cast``),
    then dgrad and wgrad of both: (dx through gate, dx through up, both [T, K] in
    ``dx_dtype``; dw_gate, dw_up [I, K] float32)."""
    dgate, dup = _casts.swiglu_backward_cast(grad, gate, up, pow2_scale=pow2_scale, backend=_backend(backend))
    dx_gate, dw_gate = _grads_from_casts(dgate, w_gate, xt_fp8, xt_scale, pow2_scale, dx_dtype, backend)
    dx_up, dw_up = _grads_from_casts(dup, w_up, xt_fp8, xt_scale, pow2_scale, dx_dtype, backend)
    return dx_gate, dx_up, dw_gate, dw_up


@swiglu_input_grads.register_fake
def _(grad, gate, up, w_gate, w_up, xt_fp8, xt_scale, pow2_scale, dx_dtype, backend):
    dx = grad.new_empty(grad.shape[0], w_gate.shape[1], dtype=dx_dtype)
    return (dx, torch.empty_like(dx), w_gate.new_empty(w_gate.shape, dtype=torch.float32),
            w_up.new_empty(w_up.shape, dtype=torch.float32))


def transpose_128x128(w_fp8: Tensor, w_scale: Tensor) -> Tuple[Tensor, Tensor]:
    """The exact FP8 copy of W^T from W's 128x128 cast: each block's scale covers the same
    elements after transposing, so transposing data and scale grid loses nothing. Used only
    for a weight that arrives already cast (``FP8BlockWeight``); a high-precision weight is
    cast directly (``cast_128x128_dual``, or ``cast_128x128_transposed`` in backward)."""
    return (w_fp8.transpose(-1, -2).contiguous(), w_scale.transpose(-1, -2).contiguous())
