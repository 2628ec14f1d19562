"""Which implementation serves a GEMM call: native kernels, cuBLAS or the reference.

``auto`` picks the fastest one available for the call's device and says once which path
runs; an explicit choice that cannot serve a call raises instead of falling back.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .. import _env

_backend = None  # None: read FP8TRAIN_BACKEND at first use

# `auto` runs the native dense kernels only once they beat cuBLAS: on the H100 the native
# 1D2D/1D1D GEMMs measure 0.78x/0.88x of cuBLAS blockwise (median over the bench shapes,
# docs/kernels.md), so today `auto` prefers cuBLAS wherever it serves the call and uses the
# native kernels for what cuBLAS cannot do (in-place FP32 accumulation, grouped GEMMs).
NATIVE_BEATS_CUBLAS = False


def set_backend(name: str) -> None:
    """Select ``auto``, ``native``, ``cublas`` or ``reference`` for every later call."""
    global _backend
    if not isinstance(name, str) or name.lower() not in _env.BACKENDS:
        raise ValueError(f"name: expected one of {_env.BACKENDS}, got {name!r}")
    _backend = name.lower()


def get_backend() -> str:
    global _backend
    if _backend is None:
        _backend = _env.backend()
    return _backend


@functools.lru_cache(maxsize=None)
def is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.lru_cache(maxsize=None)
def announce(message: str) -> None:
    """Say once per process which path runs (a warning, so it can be filtered)."""
    warnings.warn(f"fp8train: {message}", stacklevel=3)


def resolve(op: str, device: torch.device, *, native_ok, cublas_ok: bool,
            native_in_auto: bool = True) -> str:
    """Pick the implementation of ``op`` for tensors on ``device``.

    native_ok: callable returning (available, reason); cublas_ok: cuBLAS serves this call;
    native_in_auto: False keeps a native kernel opt-in (``native`` backend) until it has
    been verified on a GPU.
    """
    chosen = get_backend()
    on_hopper = device.type == "cuda" and is_hopper(device.index or 0)
    if chosen == "reference":
        return "reference"
    if chosen == "native":
        ok, why = native_ok() if on_hopper else (False, f"tensors on {device}, not an sm_90 GPU")
        if not ok:
            raise RuntimeError(f"{op}: backend 'native' requested but unavailable: {why}")
        return "native"
    if chosen == "cublas":
        if not cublas_ok:
            raise RuntimeError(f"{op}: backend 'cublas' requested but cuBLAS has no "
                               f"blockwise FP8 GEMM for this call (tensors on {device})")
        return "cublas"
    # auto
    if on_hopper:
        if cublas_ok and not NATIVE_BEATS_CUBLAS:
            return "cublas"
        ok, why = native_ok() if native_in_auto else (False, "not yet verified on a GPU")
        if ok:
            return "native"
        if cublas_ok:
            announce(f"{op} runs on cuBLAS: native kernels unavailable ({why})")
            return "cublas"
    announce(f"{op} runs on the reference emulation (tensors on {device})")
    return "reference"
