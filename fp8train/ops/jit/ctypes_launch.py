"""cuLaunchKernelEx called straight from libcuda through ctypes.

cuda-bindings converts its `CUlaunchConfig` object into the C struct on every call, which
costs several microseconds of the ~15 us a GEMM call may spend on the host. Here the C
structs are built once per (grid, block, smem, cluster, stream) as ctypes Structures whose
layout mirrors cuda.h (tests/test_jit_ctypes_launch.py compares sizes and offsets with the
header, compiled by the host C compiler), and each launch is one foreign call.

`runtime.Kernel.launch_params` uses it when FP8TRAIN_LAUNCHER is `ctypes` or `auto`
(VERIFIED: tests/test_jit_ctypes_launch.py passed on the H100).
"""
from __future__ import annotations

import ctypes
import functools

VERIFIED = True
CLUSTER_DIMENSION = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an enum id padded to 8 bytes, then a 64-byte value union (the
    cluster dimension is its first three unsigned ints)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _cu_launch_kernel_ex():
    """libcuda's cuLaunchKernelEx(config*, CUfunction, void** params, void** extra)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeError(f"libcuda.so.1 cannot be loaded ({exc})") from exc
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class CtypesLaunch:
    """One launch configuration, ready to call: its struct (and attribute) kept alive here."""

    __slots__ = ("config", "attribute", "address", "call")

    def __init__(self, dims: tuple, block: int, smem_bytes: int, cluster: int, stream: int):
        self.config = LaunchConfig()
        self.config.gridDimX, self.config.gridDimY, self.config.gridDimZ = dims
        self.config.blockDimX, self.config.blockDimY, self.config.blockDimZ = block, 1, 1
        self.config.sharedMemBytes = smem_bytes
        self.config.hStream = stream or None
        self.attribute = None
        if cluster > 1:
            self.attribute = LaunchAttribute()
            self.attribute.id = CLUSTER_DIMENSION
            self.attribute.value[0], self.attribute.value[1], self.attribute.value[2] = cluster, 1, 1
            self.config.attrs = ctypes.pointer(self.attribute)
            self.config.numAttrs = 1
        self.address = ctypes.addressof(self.config)
        self.call = _cu_launch_kernel_ex()

    def launch(self, function: int, params_address: int) -> int:
        """The CUresult of launching `function` (a CUfunction handle as an int)."""
        return self.call(self.address, function, params_address, None)
