"""The FP8 GEMM operators (DeepGEMM-style names), their checks and their dispatch.

Every operator computes ``D = A @ B.T`` on E4M3 operands stored K-major, with FP32
dequantization scales and FP32 promotion per 128-wide K block; see ``reference`` for the
exact numerics. Scales are accepted as contiguous row-major tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import FP8_DTYPE, check_bool, check_same_device, check_shape, check_tensor, ceil_div
from . import backend as _backend
from . import cublas as _cublas
from . import native as _native
from . import reference as _ref
from .native.sm90_fp8_gemm import fp8_gemm_nt_native, k_grouped_native, m_grouped_masked_native

GROUP = 128
FP8Pair = Tuple[torch.Tensor, torch.Tensor]
OUT_DTYPES = (torch.bfloat16, torch.float32)


def _unpack(name: str, pair) -> FP8Pair:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected a (tensor_fp8, scale) pair, got {type(pair).__name__}")
    data, scale = pair
    check_tensor(f"{name}[0]", data, dtypes=(FP8_DTYPE,))
    check_tensor(f"{name}[1]", scale, dtypes=(torch.float32,))
    if data.dim() > 0 and data.stride(-1) != 1:
        raise ValueError(f"{name}[0]: expected K-major storage (stride 1 along the last dim), "
                         f"got strides {tuple(data.stride())}")
    return data, scale


def _operands(a, b, a_ndim: int, b_ndim: int) -> tuple:
    """(a, sa, b, sb) of two (fp8, scale) pairs: types, dims and one device checked."""
    a, sa = _unpack("a", a)
    b, sb = _unpack("b", b)
    check_tensor("a[0]", a, ndims=(a_ndim,))
    check_tensor("b[0]", b, ndims=(b_ndim,))
    check_same_device(a=a, sa=sa, b=b, sb=sb)
    return a, sa, b, sb


def _check_k(name: str, k: int) -> int:
    if k % GROUP != 0 or k == 0:
        raise ValueError(f"{name}: the contraction dim must be a positive multiple of {GROUP}, got {k}")
    return k // GROUP


def _check_out(out, shape, device, accumulate: bool,
               dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``dtype``: the one dtype ``out`` must have (the grouped GEMMs' kernels write one);
    None: bf16 or fp32, ``out``'s own dtype is the output dtype (``fp8_gemm_nt``)."""
    if out is None:
        if accumulate:
            raise ValueError("out: accumulate=True needs an existing float32 `out` to add into")
        return None
    check_tensor("out", out, dtypes=OUT_DTYPES if dtype is None else (dtype,))
    check_shape("out", out, shape)
    if out.device != device:
        raise ValueError(f"out: expected device {device}, got {out.device}")
    if accumulate and out.dtype != torch.float32:
        raise TypeError(f"out: accumulate=True needs a float32 out, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor, got strides {tuple(out.stride())}")
    return out


def _check_offsets(name: str, offsets, groups: int, total: int, device, align: int = GROUP) -> list[int]:
    """int32 [G+1] offsets: 0 first, at most `total` last, non-decreasing, multiples of
    `align` (128, or 256 where the caller promised 256-row segments).
    Rows (tokens) past the last offset belong to no group: a static-size buffer's spare
    rows, left out of the math.

    Values are checked on the host here (the reference path); native kernels read them on
    the device and trust them, so that no call syncs.
    """
    check_tensor(name, offsets, dtypes=(torch.int32,), ndims=(1,))
    check_shape(name, offsets, (groups + 1,))
    if offsets.device != device:
        raise ValueError(f"{name}: expected device {device}, got {offsets.device}")
    values = offsets.tolist()
    ok = values[0] == 0 and values[-1] <= total and all(
        b >= a for a, b in zip(values, values[1:])) and all(v % align == 0 for v in values)
    if not ok:
        raise ValueError(f"{name}: expected non-decreasing multiples of {align} from 0 to at "
                         f"most {total}, got {values}")
    return values


_PLAN_LIMIT = 4096  # cached plans per operator; cleared when full (shapes that never repeat)


def _pair(p) -> tuple:
    """An (fp8, scale) pair for a plan key (anything else: planned afresh, which raises)."""
    if not isinstance(p, (tuple, list)) or len(p) != 2:
        raise TypeError("not a pair")
    return tuple(p)


def _flag(value) -> bool:
    """A bool for a plan key (anything else: planned afresh, which raises)."""
    if not isinstance(value, bool):
        raise TypeError("not a bool")
    return value


def _int(value) -> int:
    """An int for a plan key (anything else, 256.0 and True included: planned afresh, which
    raises)."""
    if type(value) is not int:
        raise TypeError("not an int")
    return value


def _tensors_key(*tensors) -> tuple:
    """What the checks of a call depend on: each tensor's shape, strides, dtype and device."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def _cached_plan(plans: dict, key_fn, plan_fn):
    """Every eager GEMM pays its argument checks on the host: a call whose signature
    (``key_fn()``: shapes, strides, dtypes, devices, options, backend) was checked before
    reuses that plan; anything ``key_fn`` cannot describe is planned (and checked) afresh."""
    try:
        key = key_fn()
        plan = plans.get(key)
    except (TypeError, ValueError, AttributeError):
        key = plan = None
    if plan is None:
        plan = plan_fn()
        if key is not None:
            if len(plans) >= _PLAN_LIMIT:
                plans.clear()
            plans[key] = plan
    return plan


def fp8_gemm_nt(a: FP8Pair, b: FP8Pair, out: Optional[torch.Tensor] = None, *,
                out_dtype: torch.dtype = torch.bfloat16, accumulate: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
    """``out = (a * sa) @ (b * sb).T``.

    a: (e4m3 ``[M, K]``, float32 ``[M, K/128]``), 1x128 scales.
    b: (e4m3 ``[N, K]``, float32 scales): 128x128 ``[ceil(N/128), K/128]`` (fprop/dgrad) or
       1x128 ``[N, K/128]`` (wgrad).
    out: optional ``[M, N]`` bf16/fp32; when given, its dtype is the output dtype.
    accumulate: add into ``out`` (float32) instead of overwriting it.
    backend: ``auto``, ``native``, ``cublas`` or ``reference`` for this call; None: the
       process-wide choice (``set_backend``).
    """
    path, kind, m, n, dtype = _cached_plan(
        _dense_plans,
        lambda: (_tensors_key(*_pair(a), *_pair(b), out), out is None or out.is_contiguous(),
                 out_dtype, _flag(accumulate), backend, _backend.get_backend()),
        lambda: _plan_fp8_gemm_nt(a, b, out, out_dtype, accumulate, backend))
    x, sx = a
    y, sy = b
    if path == "native":
        if out is None:
            out = torch.empty(m, n, dtype=dtype, device=x.device)
        if m and n:  # TMA descriptors cannot describe an empty tensor; there is nothing to do
            fp8_gemm_nt_native(x, sx, y, sy if kind == "1d1d" else sy.contiguous(), out, kind, accumulate)
        return out
    if path == "cublas":
        return _cublas.fp8_gemm_nt_cublas(x, sx, y, sy, dtype, out)
    result = _ref.fp8_gemm_nt_ref(x, sx, y, sy)
    if out is None:
        return result.to(dtype)
    if accumulate:
        out.add_(result)
    else:
        out.copy_(result)
    return out


_dense_plans: dict = {}  # argument signature -> (path, kind, m, n, out dtype)


def _plan_fp8_gemm_nt(a, b, out, out_dtype, accumulate, backend) -> tuple:
    """Full argument checks of fp8_gemm_nt (each error names the argument), then the path."""
    a, sa, b, sb = _operands(a, b, 2, 2)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"b[0]: expected K = {k} columns to match a, got shape {tuple(b.shape)}")
    kb = _check_k("a[0]", k)
    check_shape("a[1]", sa, (m, kb))
    if tuple(sb.shape) not in ((ceil_div(n, GROUP), kb), (n, kb)):
        raise ValueError(f"b[1]: expected 128x128 scales {(ceil_div(n, GROUP), kb)} or 1x128 "
                         f"scales {(n, kb)}, got {tuple(sb.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected torch.bfloat16 or torch.float32, got {out_dtype}")
    check_bool("accumulate", accumulate)
    out = _check_out(out, (m, n), a.device, accumulate)
    dtype = out.dtype if out is not None else out_dtype
    kind = "1d1d" if sb.shape[0] == n and n > 1 else "1d2d"
    path = _backend.resolve("fp8_gemm_nt", a.device,
                            native_ok=lambda: _native.dense_support(n, kind, dtype, accumulate),
                            cublas_ok=_cublas.supports(a, n, dtype, accumulate),
                            cublas_first=not _backend.native_beats_cublas(m, n, k, kind),
                            backend=backend)
    return path, kind, m, n, dtype


def m_grouped_fp8_gemm_nt_contiguous(a: FP8Pair, b: FP8Pair, group_offsets: torch.Tensor,
                                     out: Optional[torch.Tensor] = None, *,
                                     segment_rows: int = GROUP,
                                     backend: Optional[str] = None) -> torch.Tensor:
    """MoE fprop/dgrad on the contiguous layout: rows of segment g times ``b[g]``.

    a: (e4m3 ``[M, K]``, float32 ``[M, K/128]``), rows sorted by group, segments padded to
       multiples of 128 (padding rows are computed like any other row).
    b: (e4m3 ``[G, N, K]``, float32 ``[G, ceil(N/128), K/128]``).
    group_offsets: int32 ``[G+1]`` row offsets from 0, non-decreasing multiples of 128, the
       last at most M: rows past it belong to no expert (the spare rows of a static-size
       buffer) and come out as zeros without costing math.
       The reference path checks the values (a host sync); the native kernel reads them on
       the device and trusts them, so a native call never syncs.
    segment_rows: 128, or 256 when every offset is a multiple of 256
       (``build_moe_layout(..., align=256)``): the native kernel may then take 256-row tiles.
    Returns bf16 ``[M, N]`` (written into ``out`` when given).
    """
    path, m, n, g = _cached_plan(
        _m_grouped_plans,
        lambda: (_tensors_key(*_pair(a), *_pair(b), group_offsets, out),
                 out is None or out.is_contiguous(), _int(segment_rows), backend, _backend.get_backend()),
        lambda: _plan_m_grouped(a, b, group_offsets, out, segment_rows, backend))
    a, sa = a
    b, sb = b
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if path == "native":
        if m and n:
            fp8_gemm_nt_native(a, sa, b, sb.contiguous(), out, "1d2d", False,
                               group_offsets=group_offsets.contiguous(), segment_rows=segment_rows)
        return out
    offsets = _check_offsets("group_offsets", group_offsets, g, m, a.device, segment_rows)
    _ref.m_grouped_contiguous_ref(a, sa, b, sb, offsets, out)
    return out


_m_grouped_plans: dict = {}  # argument signature -> (path, m, n, groups)


def _plan_m_grouped(a, b, group_offsets, out, segment_rows, backend) -> tuple:
    """Full argument checks of m_grouped_fp8_gemm_nt_contiguous, then the path."""
    if type(segment_rows) is not int or segment_rows not in (GROUP, 2 * GROUP):
        raise ValueError(f"segment_rows: expected {GROUP} or {2 * GROUP}, got {segment_rows!r}")
    a, sa, b, sb = _operands(a, b, 2, 3)
    m, k = a.shape
    g, n = b.shape[:2]
    check_shape("b[0]", b, (g, n, k))
    kb = _check_k("a[0]", k)
    check_shape("a[1]", sa, (m, kb))
    check_shape("b[1]", sb, (g, ceil_div(n, GROUP), kb))
    check_tensor("group_offsets", group_offsets, dtypes=(torch.int32,), ndims=(1,))
    check_shape("group_offsets", group_offsets, (g + 1,))
    if group_offsets.device != a.device:
        raise ValueError(f"group_offsets: expected device {a.device}, got {group_offsets.device}")
    out = _check_out(out, (m, n), a.device, False, torch.bfloat16)
    path = _backend.resolve("m_grouped_fp8_gemm_nt_contiguous", a.device,
                            native_ok=lambda: _native.m_grouped_support(m, n, b),
                            cublas_ok=False,
                            backend=backend)
    return path, m, n, g


def m_grouped_fp8_gemm_nt_masked(a: FP8Pair, b: FP8Pair, masked_m: torch.Tensor,
                                 out: Optional[torch.Tensor] = None, *,
                                 expected_m: Optional[int] = None,
                                 backend: Optional[str] = None) -> torch.Tensor:
    """MoE GEMM on the masked layout: ``out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``.

    a: (e4m3 ``[G, M_max, K]``, float32 ``[G, M_max, K/128]``).
    b: (e4m3 ``[G, N, K]``, float32 ``[G, ceil(N/128), K/128]``).
    masked_m: int32 ``[G]`` valid rows per group (0..M_max), on a's device. The reference
       path checks the values (a host sync); the native kernel reads them on the device
       (clipped to [0, M_max]) and never syncs, so it can be captured in a CUDA graph.
    expected_m: rows per expert the caller expects (picks the native kernel's tile config;
       default M_max). Any masked_m stays correct whatever the hint.
    Rows at or past ``masked_m[g]`` are not written (zeros when ``out`` is allocated here).
    """
    a, sa, b, sb = _operands(a, b, 3, 3)
    g, m_max, k = a.shape
    n = b.shape[1]
    check_shape("b[0]", b, (g, n, k))
    kb = _check_k("a[0]", k)
    check_shape("a[1]", sa, (g, m_max, kb))
    check_shape("b[1]", sb, (g, ceil_div(n, GROUP), kb))
    check_tensor("masked_m", masked_m, dtypes=(torch.int32,), ndims=(1,))
    check_shape("masked_m", masked_m, (g,))
    if masked_m.device != a.device:
        raise ValueError(f"masked_m: expected device {a.device}, got {masked_m.device}")
    if expected_m is not None and (not isinstance(expected_m, int) or expected_m < 0):
        raise ValueError(f"expected_m: expected a non-negative int, got {expected_m!r}")
    out = _check_out(out, (g, m_max, n), a.device, False, torch.bfloat16)
    path = _backend.resolve("m_grouped_fp8_gemm_nt_masked", a.device,
                            native_ok=lambda: _native.m_grouped_masked_support(n, a, b),
                            cublas_ok=False,
                            backend=backend)
    if out is None:
        out = torch.zeros(g, m_max, n, dtype=torch.bfloat16, device=a.device)
    if path == "native":
        if g and m_max and n:
            m_grouped_masked_native(a, sa, b, sb.contiguous(), masked_m.contiguous(), out,
                                    m_max if expected_m is None else min(expected_m, m_max))
        return out
    counts = masked_m.tolist()
    if any(c < 0 or c > m_max for c in counts):
        raise ValueError(f"masked_m: expected values in [0, {m_max}], got {counts}")
    _ref.m_grouped_masked_ref(a, sa, b, sb, counts, out)
    return out


def k_grouped_fp8_gemm_nt_contiguous(a: FP8Pair, b: FP8Pair, group_offsets: torch.Tensor,
                                     out: Optional[torch.Tensor] = None, *,
                                     accumulate: bool = False,
                                     backend: Optional[str] = None) -> torch.Tensor:
    """MoE weight gradient: ``out[g] = a[:, seg g] @ b[:, seg g].T`` for every expert g.

    a: (e4m3 ``[N, T]``, float32 ``[N, T/128]``) and b: (e4m3 ``[K, T]``, float32
    ``[K, T/128]``), both 1x128 along T (tokens sorted by expert).
    group_offsets: int32 ``[G+1]`` token offsets from 0, non-decreasing multiples of 128, the
       last at most T (tokens past it belong to no expert and are left out).
    Returns float32 ``[G, N, K]``; an expert with no tokens gets zeros, or is left alone
    when ``accumulate``.
    """
    path, n, k, t, g = _cached_plan(
        _k_grouped_plans,
        lambda: (_tensors_key(*_pair(a), *_pair(b), group_offsets, out),
                 out is None or out.is_contiguous(), _flag(accumulate), backend, _backend.get_backend()),
        lambda: _plan_k_grouped(a, b, group_offsets, out, accumulate, backend))
    a, sa = a
    b, sb = b
    if out is None:
        out = torch.empty(g, n, k, dtype=torch.float32, device=a.device)
    if path == "native":
        if t == 0 and not accumulate:
            out.zero_()  # every expert is empty: zero gradients
        elif t and n and k:
            # The kernel reads the offsets on the device (never a host sync) and trusts them.
            k_grouped_native(a, sa, b, sb, group_offsets.contiguous(), out, accumulate)
        return out
    offsets = _check_offsets("group_offsets", group_offsets, g, t, a.device)
    _ref.k_grouped_contiguous_ref(a, sa, b, sb, offsets, out, accumulate)
    return out


_k_grouped_plans: dict = {}  # argument signature -> (path, n, k, tokens, groups)


def _plan_k_grouped(a, b, group_offsets, out, accumulate, backend) -> tuple:
    """Full argument checks of k_grouped_fp8_gemm_nt_contiguous, then the path."""
    a, sa, b, sb = _operands(a, b, 2, 2)
    n, t = a.shape
    k = b.shape[0]
    check_shape("b[0]", b, (k, t))
    tb = t // GROUP
    if t % GROUP:
        raise ValueError(f"a[0]: expected T (tokens) a multiple of {GROUP}, got {t}")
    check_shape("a[1]", sa, (n, tb))
    check_shape("b[1]", sb, (k, tb))
    check_tensor("group_offsets", group_offsets, dtypes=(torch.int32,), ndims=(1,))
    if group_offsets.shape[0] < 2:
        raise ValueError(f"group_offsets: expected [G+1] offsets with G >= 1, got shape "
                         f"{tuple(group_offsets.shape)}")
    g = group_offsets.shape[0] - 1
    if group_offsets.device != a.device:
        raise ValueError(f"group_offsets: expected device {a.device}, got {group_offsets.device}")
    check_bool("accumulate", accumulate)
    out = _check_out(out, (g, n, k), a.device, accumulate, torch.float32)
    path = _backend.resolve("k_grouped_fp8_gemm_nt_contiguous", a.device,
                            native_ok=lambda: _native.k_grouped_support(n, k, a, b),
                            cublas_ok=False,
                            backend=backend)
    return path, n, k, t, g
