"""Host side of the dense sm_90a FP8 GEMM (csrc/fp8train/sm90_fp8_gemm.cuh): renders the
kernel for a config, compiles it through the JIT, and launches it.

The launch path is what every eager GEMM call pays on the host, so everything that depends
only on (shape, kind, device) is looked up once and cached; a call then encodes the two TMA
descriptors and launches.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from .gemm_config import GemmConfig, choose_config, shared_bytes
from .wgmma import render_wgmma_e4m3

KERNEL_NAME = "fp8train_gemm"


def render_source(config: GemmConfig, n: int, k: int, accumulate: bool, m_grouped: bool = False) -> str:
    """The .cu text of one kernel instance: N, K and the tile choice are compile-time.
    m_grouped: B is [G, N, K] and each 128-row tile of A belongs to one expert."""
    if accumulate and config.kind != "1d1d":
        raise ValueError("accumulate: only the 1D1D (FP32 out) kernel accumulates")
    if m_grouped and config.kind != "1d2d":
        raise ValueError("m_grouped: only the 1D2D kernel is m-grouped")
    return f"""// Rendered by fp8train.ops.native.sm90_fp8_gemm: {config}, N={n}, K={k}
#include "fp8train/sm90_fp8_gemm.cuh"

namespace fp8train {{
{render_wgmma_e4m3(config.block_n)}
}}  // namespace fp8train

extern "C" __global__ void __launch_bounds__({config.num_threads}, 1)
{KERNEL_NAME}(uint32_t shape_m, const float* scale_b, float* out_f32,
              const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
              const __grid_constant__ CUtensorMap tmap_scale_a,
              const __grid_constant__ CUtensorMap tmap_scale_b,
              const __grid_constant__ CUtensorMap tmap_out,
              const int32_t* group_offsets, uint32_t num_groups) {{
    fp8train::sm90_fp8_gemm<{config.block_m}, {config.block_n}, {config.num_stages}, {n}, {k},
                            {str(config.kind == "1d1d").lower()}, {str(accumulate).lower()},
                            {config.group_n}, {config.cluster}, {str(m_grouped).lower()},
                            fp8train::Wgmma_m64n{config.block_n}k32>(
        shape_m, scale_b, out_f32, &tmap_a, &tmap_b, &tmap_scale_a, &tmap_scale_b, &tmap_out,
        group_offsets, num_groups);
}}
"""


def kernel_name(config: GemmConfig, n: int, k: int, accumulate: bool, m_grouped: bool = False) -> str:
    acc = ("_acc" if accumulate else "") + ("_mgrouped" if m_grouped else "")
    return (f"sm90_fp8_gemm_{config.kind}{acc}_n{n}_k{k}_bm{config.block_m}_bn{config.block_n}"
            f"_s{config.num_stages}_g{config.group_n}_c{config.cluster}")


# Extra nvcc flags for experiments (e.g. -DFP8TRAIN_DEBUG_NO_LOADS); part of every cache key.
debug_flags: tuple = ()


def compile_kernel(config: GemmConfig, n: int, k: int, accumulate: bool, m_grouped: bool = False):
    """Compile (or find in the cache) one kernel instance; returns the JIT's CompiledKernel."""
    from ..jit.compiler import compile_cubin

    return compile_cubin(kernel_name(config, n, k, accumulate, m_grouped),
                         render_source(config, n, k, accumulate, m_grouped), flags=debug_flags)


@dataclass(frozen=True)
class _Launch:
    config: GemmConfig
    kernel: object
    smem: int


_launches: dict = {}


def _launch_for(m: int, n: int, k: int, kind: str, accumulate: bool, device: int, num_sms: int,
                config: GemmConfig | None = None, m_grouped: bool = False) -> _Launch:
    key = (m, n, k, kind, accumulate, device, num_sms, config, debug_flags, m_grouped)
    launch = _launches.get(key)
    if launch is None:
        from ..jit.runtime import load_kernel

        config = config or choose_config(m, n, k, num_sms, kind)
        compiled = compile_kernel(config, n, k, accumulate, m_grouped)
        launch = _Launch(config, load_kernel(compiled, KERNEL_NAME, device),
                         shared_bytes(config.block_m, config.block_n, config.num_stages, kind))
        _launches[key] = launch
    return launch


def tma_ready_scales(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """1x128 scales ``[R, Kb]`` as the kernel's TMA reads them: row-major with a row stride
    (returned, in floats) that is a multiple of 4, i.e. 16 bytes. Contiguous scales with
    Kb % 4 == 0 are used as they are; anything else is copied once into a padded buffer."""
    rows, kb = scale.shape
    if scale.stride(1) == 1 and scale.stride(0) % 4 == 0 and scale.data_ptr() % 16 == 0:
        return scale, scale.stride(0)
    ld = -(-kb // 4) * 4
    buffer = torch.empty(rows, ld, dtype=torch.float32, device=scale.device)
    buffer[:, :kb].copy_(scale)
    return buffer, ld


class _ParamBlock:
    """Kernel parameters in one persistent block: 8 slots of 128 bytes (a CUtensorMap is
    128 bytes) and the void* array pointing at them. A launch overwrites the slots and hands
    the driver the array's address, which it copies before cuLaunchKernelEx returns; this
    skips cuda-bindings' per-call argument packing. One block per thread."""

    SLOTS = 10

    def __init__(self):
        self._raw = (ctypes.c_uint8 * (128 * self.SLOTS + 64))()
        base = (ctypes.addressof(self._raw) + 63) & ~63
        self.slots = [base + 128 * i for i in range(self.SLOTS)]
        self._array = (ctypes.c_void_p * self.SLOTS)(*self.slots)
        self.address = ctypes.addressof(self._array)
        self.u32 = [ctypes.c_uint32.from_address(s) for s in self.slots]
        self.u64 = [ctypes.c_uint64.from_address(s) for s in self.slots]


_local = threading.local()
_tma_cache: dict = {}  # encode arguments -> (CUtensorMap, its address); pointers repeat in training
_TMA_CACHE_LIMIT = 8192


def _tma_address(ptr, dtype, inner, outer, stride, box_inner, box_outer, swizzle) -> int:
    key = (ptr, dtype, inner, outer, stride, box_inner, box_outer, swizzle)
    hit = _tma_cache.get(key)
    if hit is None:
        from ..jit.runtime import encode_tma_2d

        tmap = encode_tma_2d(ptr, dtype, inner, outer, stride, box_inner, box_outer, swizzle)
        if len(_tma_cache) >= _TMA_CACHE_LIMIT:
            _tma_cache.clear()
        hit = _tma_cache[key] = (tmap, tmap.getPtr())
    return hit[1]


def _raw_stream(device_index: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return get(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def fp8_gemm_nt_native(a, sa, b, sb, out: torch.Tensor, kind: str, accumulate: bool,
                       config: GemmConfig | None = None,
                       group_offsets: torch.Tensor | None = None) -> None:
    """Launch D = A B^T on the current stream. Arguments were checked by the caller:
    a [M, K] / b [N, K] e4m3 K-major, sa [M, K/128], sb 128x128 row-major contiguous (1d2d)
    or 1x128 [N, K/128] (1d1d); out [M, N] contiguous bf16 (1d2d) or fp32 (1d1d).
    `config` overrides the heuristic (benchmarks and sweeps). With `group_offsets` (int32
    [G+1] on the device, multiples of 128) the GEMM is m-grouped contiguous: b [G, N, K],
    sb [G, ceil(N/128), K/128] contiguous; offsets are read by the kernel, never the host."""
    from ..jit.device import get_num_sms

    m, k = a.shape
    m_grouped = group_offsets is not None
    n = b.shape[-2]
    b_rows = b.shape[0] * n if m_grouped else n  # experts' weights TMA'd as one [G*N, K]
    kb = k // 128
    device = a.device.index
    launch = _launch_for(m, n, k, kind, accumulate, device, get_num_sms(), config, m_grouped)
    cfg = launch.config
    params = getattr(_local, "params", None)
    if params is None:
        params = _local.params = _ParamBlock()
    f32 = torch.float32
    sa, lda = tma_ready_scales(sa)
    params.u32[0].value = m
    params.u64[1].value = sb.data_ptr() if kind == "1d2d" else 0
    params.u64[2].value = out.data_ptr()
    slots, move = params.slots, ctypes.memmove
    rows_a = cfg.block_m // cfg.cluster  # each CTA of a cluster loads its share of A
    move(slots[3], _tma_address(a.data_ptr(), a.dtype, k, m, a.stride(0), 128, rows_a, 128), 128)
    move(slots[4], _tma_address(b.data_ptr(), b.dtype, k, b_rows, b.stride(-2), 128, cfg.block_n, 128), 128)
    move(slots[5], _tma_address(sa.data_ptr(), f32, kb, m, 4 * lda, 4, cfg.block_m, 0), 128)
    if kind == "1d1d":
        sb, ldb = tma_ready_scales(sb)
        move(slots[6], _tma_address(sb.data_ptr(), f32, kb, n, 4 * ldb, 4, cfg.block_n, 0), 128)
    else:
        move(slots[7], _tma_address(out.data_ptr(), out.dtype, n, m, 2 * n, cfg.block_n, cfg.block_m, 0), 128)
    params.u64[8].value = group_offsets.data_ptr() if m_grouped else 0
    params.u32[9].value = group_offsets.shape[0] - 1 if m_grouped else 0
    launch.kernel.launch_params(cfg.num_ctas, cfg.num_threads, launch.smem, params.address,
                                _raw_stream(device), cfg.cluster)
