"""Every environment variable fp8train reads, read here and nowhere else (README table)."""
from __future__ import annotations

import os
from pathlib import Path

BACKENDS = ("auto", "native", "cublas", "reference")


def backend() -> str:
    """FP8TRAIN_BACKEND: which GEMM implementation runs (auto|native|cublas|reference)."""
    value = os.environ.get("FP8TRAIN_BACKEND", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"FP8TRAIN_BACKEND: expected one of {BACKENDS}, got {value!r}")
    return value


LAUNCHERS = ("auto", "bindings", "ctypes")


def launcher() -> str:
    """FP8TRAIN_LAUNCHER: how kernels are launched: cuda-bindings' cuLaunchKernelEx
    (`bindings`), libcuda's through ctypes (`ctypes`, less host time), or `auto`."""
    value = os.environ.get("FP8TRAIN_LAUNCHER", "auto").strip().lower()
    if value not in LAUNCHERS:
        raise ValueError(f"FP8TRAIN_LAUNCHER: expected one of {LAUNCHERS}, got {value!r}")
    return value


def cache_dir() -> Path:
    """FP8TRAIN_CACHE_DIR: where compiled kernels are cached (default ~/.cache/fp8train)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fp8train"
    return Path(os.environ.get("FP8TRAIN_CACHE_DIR", default)).expanduser().resolve()


def nvcc() -> str | None:
    """FP8TRAIN_NVCC: the nvcc to run (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH)."""
    return os.environ.get("FP8TRAIN_NVCC") or None


# nvcc reads these itself: they change what a compile produces, so they are part of every
# kernel cache key (a build with such a flag must not be served to a process without it).
NVCC_ENV = ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "NVCC_CCBIN")


def nvcc_environment() -> dict[str, str]:
    """The nvcc environment variables that are set (NVCC_ENV), name -> value."""
    return {name: os.environ[name] for name in NVCC_ENV if name in os.environ}


def jit_debug() -> bool:
    """FP8TRAIN_JIT_DEBUG=1 prints each compile with its timing."""
    return os.environ.get("FP8TRAIN_JIT_DEBUG", "0") not in ("", "0", "false", "False")
