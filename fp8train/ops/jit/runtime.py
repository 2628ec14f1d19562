"""Load compiled cubins and launch them on torch's streams through the CUDA driver API.

`cuda.bindings` is imported on first use, so importing fp8train needs no GPU driver.

Kernel arguments go to `Kernel.launch` as two parallel tuples:
    args      = (out.data_ptr(), m, tma_a)
    arg_types = (ctypes.c_void_p, ctypes.c_int, None)
Pointers are ints typed `ctypes.c_void_p`; scalars use their ctypes type. A TMA descriptor
(kernel parameter `const __grid_constant__ CUtensorMap`) is the `CUtensorMap` object returned
by `encode_tma_2d`/`encode_tma_3d` with type `None`: cuda-bindings then passes the address
of its 128-byte struct (`getPtr()`) as the parameter pointer and the driver copies the bytes.

Host cost: the launch path does one dict lookup for a cached `CUlaunchConfig` and one
`cuLaunchKernelEx`; `encode_tma_*` is one `cuTensorMapEncodeTiled`. How many microseconds
each costs is unknown until measured on the device.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path

import torch

from ... import _env
from . import ctypes_launch
from .compiler import CompiledKernel

__all__ = ["Kernel", "load_kernel", "encode_tma_2d", "encode_tma_3d"]

_drv = None  # cuda.bindings.driver, imported on first use
_SUCCESS = None
# Kernels need an opt-in above this much dynamic shared memory per block.
_DEFAULT_DYNAMIC_SMEM = 48 * 1024
_MAX_CLUSTER = 16  # 8 is portable; up to 16 with the non-portable opt-in on H100


def _driver():
    global _drv, _SUCCESS
    if _drv is None:
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise RuntimeError("native kernels need cuda-bindings: "
                               "pip install 'cuda-bindings>=12.9'") from exc
        _SUCCESS = driver.CUresult.CUDA_SUCCESS
        _drv = driver
    return _drv


def _check(result: tuple, what: str):
    """Unpack a cuda-bindings (CUresult, *values) tuple, raising on error."""
    err = result[0]
    if err != _SUCCESS:
        name = _drv.cuGetErrorName(err)
        label = name[1].decode() if name[0] == _SUCCESS else repr(err)
        raise RuntimeError(f"{what} failed: {label}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


class _ArgBlock:
    """One ctypes value per kernel parameter and the void* array pointing at them: what
    `cuLaunchKernelEx` reads. The driver copies the values before the launch returns, so
    one block per thread and argument signature is refilled for every launch."""

    __slots__ = ("values", "_array", "address")

    def __init__(self, arg_types: tuple):
        self.values = [t() for t in arg_types]
        self._array = (ctypes.c_void_p * len(arg_types))(*[ctypes.addressof(v) for v in self.values])
        self.address = ctypes.addressof(self._array)

    def fill(self, args: tuple) -> None:
        for slot, value in zip(self.values, args):
            slot.value = value


class Kernel:
    """One `__global__` function of a loaded cubin on one device. Use load_kernel()."""

    __slots__ = ("name", "device_index", "_function", "_handle", "_smem_optin", "_smem_limit", "_configs",
                 "_ctypes_configs", "_context")

    def __init__(self, name: str, device_index: int, function, smem_limit: int, context=None):
        self.name = name
        self.device_index = device_index
        self._function = function
        self._smem_optin = _DEFAULT_DYNAMIC_SMEM
        self._smem_limit = smem_limit
        # (grid, block, smem, cluster, stream) -> CUlaunchConfig; the same few shapes repeat
        # every step, so building the config (the slow, validated part) happens once each.
        self._configs: dict[tuple, object] = {}
        # The CUfunction as the pointer libcuda takes (None: a kernel built only for checks).
        self._handle = int(function) if function is not None else 0
        self._ctypes_configs: dict[tuple, ctypes_launch.CtypesLaunch] = {}
        self._context = context  # the device's primary context (None: a kernel built only for checks)

    def launch(self, grid: int | tuple, block: int, smem_bytes: int, args: tuple,
               arg_types: tuple, stream: int, cluster: int = 1) -> None:
        """Launch on `stream` (a raw handle, e.g. torch.cuda.current_stream().cuda_stream).
        `grid` is an int or a 1-3 tuple of blocks, `block` threads per block, `smem_bytes`
        dynamic shared memory, `cluster` blocks per cluster along x (must divide grid x).
        No host synchronisation. Pointer and scalar arguments are written into a parameter
        block kept per thread and argument signature, and launched as `launch_params` does;
        an argument list with a TMA descriptor (type None) goes through cuda-bindings."""
        if type(args) is not tuple or type(arg_types) is not tuple:
            raise TypeError("args, arg_types: expected two tuples")
        if len(args) != len(arg_types):
            raise ValueError(f"args: {len(args)} values but {len(arg_types)} arg_types")
        if None in arg_types:
            try:
                config = self._configs[(grid, block, smem_bytes, cluster, stream)]
            except (KeyError, TypeError):  # TypeError: an unhashable grid, rejected by the build
                config = self._build_config(grid, block, smem_bytes, cluster, stream)
            with self._device_current():
                _check(_drv.cuLaunchKernelEx(config, self._function, (args, arg_types), 0),
                       f"cuLaunchKernelEx({self.name})")
            return
        blocks = getattr(_THREAD, "arg_blocks", None)
        if blocks is None:
            blocks = _THREAD.arg_blocks = {}
        block_of_args = blocks.get(arg_types)
        if block_of_args is None:
            block_of_args = blocks[arg_types] = _ArgBlock(arg_types)
        block_of_args.fill(args)
        self.launch_params(grid, block, smem_bytes, block_of_args.address, stream, cluster)

    def launch_params(self, grid: int | tuple, block: int, smem_bytes: int, params_address: int,
                      stream: int, cluster: int = 1) -> None:
        """launch() for callers that keep their own parameter block: `params_address` is
        the address of a void* array, one pointer per kernel parameter. The driver copies
        the parameters before this returns, so the block may be rewritten right after."""
        if _use_ctypes():
            key = (grid, block, smem_bytes, cluster, stream)
            try:
                launch = self._ctypes_configs.get(key)
            except TypeError:  # an unhashable grid: the config build below rejects it
                launch = None
            if launch is None:
                config = self._build_config(grid, block, smem_bytes, cluster, stream)  # validates
                launch = self._ctypes_configs[key] = ctypes_launch.CtypesLaunch(
                    (config.gridDimX, config.gridDimY, config.gridDimZ), block, smem_bytes, cluster, stream)
            with self._device_current():
                err = launch.launch(self._handle, params_address)
            if err:
                _check((_drv.CUresult(err),), f"cuLaunchKernelEx({self.name}) through ctypes")
            return
        try:
            config = self._configs[(grid, block, smem_bytes, cluster, stream)]
        except (KeyError, TypeError):
            config = self._build_config(grid, block, smem_bytes, cluster, stream)
        with self._device_current():
            _check(_drv.cuLaunchKernelEx(config, self._function, params_address, 0),
                   f"cuLaunchKernelEx({self.name})")

    def _device_current(self):
        """Make the kernel's device current for a launch if it is not: the function lives in
        that device's primary context (one process driving several GPUs)."""
        if torch.cuda.current_device() == self.device_index:
            self._bind_thread()
            return contextlib.nullcontext()
        return torch.cuda.device(self.device_index)

    def _bind_thread(self) -> None:
        """A thread that has made no CUDA runtime call yet (autograd's backward thread, whose
        first GPU work may be our launch) has no current driver context: torch's current
        device reads 0 there without creating one. Make the primary context current, once
        per thread and device."""
        bound = getattr(_THREAD, "devices", None)
        if bound is None:
            bound = _THREAD.devices = set()
        if self.device_index in bound or self._context is None:
            return
        current = _check(_drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) == 0:
            _check(_drv.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        bound.add(self.device_index)

    def max_active_clusters(self, block: int, smem_bytes: int, cluster: int) -> int:
        """How many clusters of `cluster` CTAs (each `block` threads, `smem_bytes` of
        dynamic shared memory) the device runs at the same time."""
        key = ("clusters", block, smem_bytes, cluster)
        if key not in self._configs:
            config = self._build_config(cluster, block, smem_bytes, cluster, 0)  # sets the smem opt-in
            self._configs[key] = _check(_drv.cuOccupancyMaxActiveClusters(self._function, config),
                                        f"cuOccupancyMaxActiveClusters({self.name})")
        return self._configs[key]

    def _build_config(self, grid, block, smem_bytes, cluster, stream):
        dims = (grid,) if isinstance(grid, int) else grid
        if (not isinstance(dims, tuple) or not 1 <= len(dims) <= 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                           for d in dims)):
            raise ValueError(f"grid: expected a positive int or a tuple of 1-3, got {grid!r}")
        dims = dims + (1,) * (3 - len(dims))
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1024:
            raise ValueError(f"block: expected 1..1024 threads, got {block!r}")
        if (isinstance(smem_bytes, bool) or not isinstance(smem_bytes, int)
                or not 0 <= smem_bytes <= self._smem_limit):
            raise ValueError(f"smem_bytes: expected 0..{self._smem_limit}, got {smem_bytes!r}")
        if isinstance(cluster, bool) or not isinstance(cluster, int) or not (
                1 <= cluster <= _MAX_CLUSTER and dims[0] % cluster == 0):
            raise ValueError(f"cluster: expected 1..{_MAX_CLUSTER} dividing grid x "
                             f"{dims[0]}, got {cluster!r}")
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
            raise ValueError(f"stream: expected a raw stream handle (int), got {stream!r}")
        drv = _drv
        if smem_bytes > self._smem_optin:
            attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(drv.cuFuncSetAttribute(self._function, attr, smem_bytes),
                   f"cuFuncSetAttribute({self.name}, max dynamic smem {smem_bytes})")
            self._smem_optin = smem_bytes
        config = drv.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = dims
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = smem_bytes
        config.hStream = drv.CUstream(stream)
        if cluster > 1:
            attribute = drv.CUlaunchAttribute()
            attribute.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attribute.value.clusterDim.x = cluster
            attribute.value.clusterDim.y = 1
            attribute.value.clusterDim.z = 1
            config.attrs = [attribute]
            config.numAttrs = 1
        else:
            config.numAttrs = 0
        if len(self._configs) > 4096:  # bound memory if shapes never repeat
            self._configs.clear()
        self._configs[(grid, block, smem_bytes, cluster, stream)] = config
        return config


def raw_stream(device_index: int) -> int:
    """The current stream of a device as the raw handle a launch takes (no Stream object
    built per call, where torch offers that)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return get(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


_launcher = None  # FP8TRAIN_LAUNCHER, read at the first launch


def _use_ctypes() -> bool:
    """FP8TRAIN_LAUNCHER: `ctypes`, `bindings`, or `auto` (ctypes once verified on a GPU)."""
    global _launcher
    if _launcher is None:
        _launcher = _env.launcher()
    return _launcher == "ctypes" or (_launcher == "auto" and ctypes_launch.VERIFIED)


_KERNELS: dict[tuple[str, str, int], Kernel] = {}
_THREAD = threading.local()  # per thread: the devices whose context is known current


def load_kernel(compiled: CompiledKernel, kernel_name: str, device_index: int) -> Kernel:
    """Load `kernel_name` (declare it `extern "C"` so the name is not mangled) from the
    compiled cubin into device `device_index`'s primary context, the one torch uses.
    Cached per (cubin, kernel, device)."""
    if not isinstance(compiled, CompiledKernel):
        raise TypeError(f"compiled: expected CompiledKernel, got {type(compiled).__name__}")
    if not isinstance(kernel_name, str) or not kernel_name:
        raise ValueError(f"kernel_name: expected a non-empty str, got {kernel_name!r}")
    if isinstance(device_index, bool) or not isinstance(device_index, int) or device_index < 0:
        raise ValueError(f"device_index: expected a CUDA device index, got {device_index!r}")
    key = (str(compiled.cubin_path), kernel_name, device_index)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _load(Path(compiled.cubin_path), kernel_name, device_index)
    return kernel


def _load(cubin_path: Path, kernel_name: str, device_index: int) -> Kernel:
    if not torch.cuda.is_available() or device_index >= torch.cuda.device_count():
        raise ValueError(f"device_index: no CUDA device {device_index}")
    torch.cuda.init()
    drv = _driver()
    image = cubin_path.read_bytes()
    _check(drv.cuInit(0), "cuInit")
    device = _check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    # The primary context is the one the CUDA runtime (and so torch) uses on this device;
    # retaining it creates it if torch has not touched the device yet. Pushing it makes the
    # module load land there without changing the caller's current device.
    context = _check(drv.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
    _check(drv.cuCtxPushCurrent(context), "cuCtxPushCurrent")
    try:
        module = _check(drv.cuModuleLoadData(image), f"cuModuleLoadData({cubin_path})")
        function = _check(drv.cuModuleGetFunction(module, kernel_name.encode()),
                          f"cuModuleGetFunction({kernel_name!r} in {cubin_path})")
        optin = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        smem_limit = _check(drv.cuDeviceGetAttribute(optin, device), "cuDeviceGetAttribute")
    finally:
        _check(drv.cuCtxPopCurrent(), "cuCtxPopCurrent")
    return Kernel(kernel_name, device_index, function, smem_limit, context)


# ---- TMA descriptors -------------------------------------------------------------------

# dtype -> (CUtensorMapDataType member name, element bytes). FP8 travels as raw bytes.
_TMA_DTYPES = {
    torch.float8_e4m3fn: ("CU_TENSOR_MAP_DATA_TYPE_UINT8", 1),
    torch.uint8: ("CU_TENSOR_MAP_DATA_TYPE_UINT8", 1),
    torch.bfloat16: ("CU_TENSOR_MAP_DATA_TYPE_BFLOAT16", 2),
    torch.float32: ("CU_TENSOR_MAP_DATA_TYPE_FLOAT32", 4),
    torch.int32: ("CU_TENSOR_MAP_DATA_TYPE_INT32", 4),
}
_SWIZZLES = {0: "CU_TENSOR_MAP_SWIZZLE_NONE", 32: "CU_TENSOR_MAP_SWIZZLE_32B",
             64: "CU_TENSOR_MAP_SWIZZLE_64B", 128: "CU_TENSOR_MAP_SWIZZLE_128B"}
_TMA_ENUMS: dict = {}  # filled on first encode: the enum members, looked up once


def _positive_int(value, what: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{what}: expected an int in 1..{upper}, got {value!r}")
    return value


def _validate_tma(ptr, dtype, dims, strides, box, swizzle_bytes) -> int:
    """Check the cuTensorMapEncodeTiled rules up front, naming the argument; returns the
    element size. (The driver would only say CUDA_ERROR_INVALID_VALUE.)"""
    if dtype not in _TMA_DTYPES:
        raise TypeError(f"dtype: expected one of {list(_TMA_DTYPES)}, got {dtype!r}")
    elem = _TMA_DTYPES[dtype][1]
    if isinstance(ptr, bool) or not isinstance(ptr, int) or ptr <= 0 or ptr % 16:
        raise ValueError(f"ptr: expected a 16-byte aligned device address, got {ptr!r}")
    names = ("inner", "outer", "depth")
    for i, d in enumerate(dims):
        _positive_int(d, names[i], 1 << 32)
    previous = dims[0] * elem
    for i, s in enumerate(strides):
        what = "row_stride_bytes" if len(strides) == 1 else f"strides_bytes[{i}]"
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0 or s % 16 or s >= 1 << 40:
            raise ValueError(f"{what}: expected a positive multiple of 16 below 2^40, got {s!r}")
        if s < previous:
            raise ValueError(f"{what}: {s} bytes is less than the {previous} bytes it spans")
        previous = s * dims[i + 1]
    box_names = ("box_inner", "box_outer", "box_depth")
    for i, b in enumerate(box):
        _positive_int(b, box_names[i], 256)
    if (box[0] * elem) % 16:
        raise ValueError(f"box_inner: {box[0]} elements = {box[0] * elem} bytes, "
                         "must be a multiple of 16 bytes")
    if swizzle_bytes not in _SWIZZLES:
        raise ValueError(f"swizzle_bytes: expected one of {list(_SWIZZLES)}, got {swizzle_bytes!r}")
    if swizzle_bytes and box[0] * elem > swizzle_bytes:
        raise ValueError(f"box_inner: {box[0] * elem} bytes exceed the {swizzle_bytes}-byte "
                         "swizzle span")
    return elem


def _encode(ptr, dtype, dims, strides, box, swizzle_bytes):
    _validate_tma(ptr, dtype, dims, strides, box, swizzle_bytes)
    drv = _driver()
    if not _TMA_ENUMS:
        _TMA_ENUMS.update(
            {d: getattr(drv.CUtensorMapDataType, n) for d, (n, _) in _TMA_DTYPES.items()})
        _TMA_ENUMS.update({s: getattr(drv.CUtensorMapSwizzle, n) for s, n in _SWIZZLES.items()})
        _TMA_ENUMS["interleave"] = drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE
        _TMA_ENUMS["l2"] = drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B
        # OOB_FILL_NONE fills out-of-bounds elements with zeros (partial M/N tiles).
        _TMA_ENUMS["oob"] = drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
    u64, u32 = drv.cuuint64_t, drv.cuuint32_t
    return _check(drv.cuTensorMapEncodeTiled(
        _TMA_ENUMS[dtype], len(dims), ptr,
        [u64(d) for d in dims], [u64(s) for s in strides],
        [u32(b) for b in box], [u32(1)] * len(dims),
        _TMA_ENUMS["interleave"], _TMA_ENUMS[swizzle_bytes], _TMA_ENUMS["l2"],
        _TMA_ENUMS["oob"]), "cuTensorMapEncodeTiled")


def encode_tma_2d(ptr: int, dtype: torch.dtype, inner: int, outer: int, row_stride_bytes: int,
                  box_inner: int, box_outer: int, swizzle_bytes: int):
    """A `CUtensorMap` for a 2-D row-major tensor: `inner` contiguous elements per row,
    `outer` rows `row_stride_bytes` apart, loaded in boxes of box_inner x box_outer with
    0/32/64/128-byte swizzle, L2 promotion 256 B, out-of-bounds elements read as zero.
    Pass it to Kernel.launch with arg type None."""
    return _encode(ptr, dtype, (inner, outer), (row_stride_bytes,), (box_inner, box_outer),
                   swizzle_bytes)


def encode_tma_3d(ptr: int, dtype: torch.dtype, dims: tuple[int, int, int],
                  strides_bytes: tuple[int, int], box: tuple[int, int, int],
                  swizzle_bytes: int):
    """encode_tma_2d with a third (outermost) dimension, e.g. [groups, rows, inner]:
    dims innermost first, strides_bytes of dims 1 and 2, box innermost first."""
    for value, what, n in ((dims, "dims", 3), (strides_bytes, "strides_bytes", 2), (box, "box", 3)):
        if not isinstance(value, tuple) or len(value) != n:
            raise ValueError(f"{what}: expected a tuple of {n} ints, got {value!r}")
    return _encode(ptr, dtype, dims, strides_bytes, box, swizzle_bytes)

