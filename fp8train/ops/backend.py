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

# cuBLAS blockwise beats the native dense kernels on large shapes today (0.77x / 0.89x
# median, docs/kernels.md), but our `_scaled_mm` wrapper (ops/cublas.py) has only been
# timed on a GPU, never checked against the reference; the native kernels have. So `auto`
# runs native kernels first, and prefers cuBLAS once tests/test_gemm_cublas.py has passed
# on the device (set this to True then, if cuBLAS is still the faster one).
PREFER_CUBLAS = False


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
        if cublas_ok and PREFER_CUBLAS:
            return "cublas"
        ok, why = native_ok() if native_in_auto else (False, "not yet verified on a GPU")
        if ok:
            return "native"
        if cublas_ok:
            announce(f"{op} runs on cuBLAS: native kernels unavailable ({why})")
            return "cublas"
    announce(f"{op} runs on the reference emulation (tensors on {device})")
    return "reference"
