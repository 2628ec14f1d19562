"""Which implementation serves a GEMM or cast call: native kernels, cuBLAS or the reference.

``auto`` picks the fastest one available for the call's device and says once which path
runs; an explicit choice that cannot serve a call raises instead of falling back.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .. import _env
from .native.gemm_config import choose_config, takes_narrow_tiles

_backend = None  # None: read FP8TRAIN_BACKEND at first use

# `auto` runs a dense GEMM on cuBLAS where cuBLAS serves it (our `_scaled_mm` wrapper,
# ops/cublas.py, matches the reference there: tests/test_gemm_cublas.py), except where the
# native kernel measured faster in the same run (`native_beats_cublas`, docs/kernels.md); the
# grouped GEMMs have no cuBLAS counterpart.
MEASURED_SMS = 132  # the H100 the routing was measured on


def native_beats_cublas(m: int, n: int, k: int, kind: str) -> bool:
    """Dense shapes where the native kernel measured faster than cuBLAS (H100, 1D2D only;
    the 1D1D wgrad kernel ran 0.86x):
    - M <= 128 on 64-wide tiles in one wave (``takes_narrow_tiles``), K >= 2048: 1.12-2.0x
      over the seven such shapes of one run (64/128 x 2112-7168 x 2048-16384); the wider
      tiles that 128x32768x512 takes ran 0.97x;
    - tiles of 256x128 with K >= 512: 0.95-1.22x over the thirteen such shapes of one run,
      1.06x median (4096-16384 rows, N 1024-32768, K 512-16384; the shallow ones 1.06-1.22x);
      a 256x88 tile (N = 2112) ran 0.92-0.94x, and K below 512 was not compared."""
    if kind != "1d2d" or min(n, k) < 1 or n % 8 or k % 128:  # what the native kernel needs
        return False
    if m <= 128:
        return k >= 2048 and takes_narrow_tiles(m, n, k, MEASURED_SMS)
    config = choose_config(m, n, k, MEASURED_SMS)
    return config.block_m == 256 and config.block_n == 128 and k >= 512


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


def chosen(backend) -> str:
    """The backend a call runs on: its own ``backend`` argument (checked), or the
    process-wide choice when that is None. An argument never changes the process-wide
    choice, so layers with different recipes can run side by side, in any thread."""
    if backend is None:
        return get_backend()
    if backend not in _env.BACKENDS:
        raise ValueError(f"backend: expected None or one of {_env.BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.lru_cache(maxsize=None)
def announce(message: str) -> None:
    """Say once per process which path runs (a warning, so it can be filtered)."""
    warnings.warn(f"fp8train: {message}", stacklevel=3)


def resolve(op: str, device: torch.device, *, native_ok, cublas_ok: bool,
            cublas_first: bool = False, backend=None) -> str:
    """Pick the implementation of ``op`` for tensors on ``device`` under ``backend`` (None:
    the process-wide choice).

    native_ok: callable returning (available, reason); cublas_ok: cuBLAS serves this call;
    cublas_first: ``auto`` takes cuBLAS over a native kernel.
    """
    name = chosen(backend)
    on_hopper = device.type == "cuda" and is_hopper(device.index or 0)
    if name == "reference":
        return "reference"
    if name == "native":
        ok, why = native_ok() if on_hopper else (False, f"tensors on {device}, not an sm_90 GPU")
        if not ok:
            raise RuntimeError(f"{op}: backend 'native' requested but unavailable: {why}")
        return "native"
    if name == "cublas":
        if not cublas_ok:
            raise RuntimeError(f"{op}: backend 'cublas' requested but cuBLAS has no "
                               f"blockwise FP8 GEMM for this call (tensors on {device})")
        return "cublas"
    # auto
    why = f"tensors on {device}" + (", not an sm_90 GPU" if device.type == "cuda" else "")
    if on_hopper:
        if cublas_ok and cublas_first:
            return "cublas"
        ok, why = native_ok()
        if ok:
            return "native"
        if cublas_ok:
            announce(f"{op} runs on cuBLAS: native kernels unavailable ({why})")
            return "cublas"
        why = f"native kernels unavailable: {why}"
    announce(f"{op} runs on the reference emulation ({why})")
    return "reference"
