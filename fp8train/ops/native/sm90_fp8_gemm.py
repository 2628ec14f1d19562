"""Host side of the dense sm_90a FP8 GEMM (csrc/fp8train/sm90_fp8_gemm.cuh): renders the
kernel for a config, compiles it through the JIT, and launches it.

The launch path is what every eager GEMM call pays on the host, so everything that depends
only on (shape, kind, device) is looked up once and cached; a call then encodes the two TMA
descriptors and launches.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .gemm_config import GemmConfig, choose_config, shared_bytes
from .wgmma import render_wgmma_e4m3

KERNEL_NAME = "fp8train_gemm"


def render_source(config: GemmConfig, n: int, k: int, kind: str, accumulate: bool) -> str:
    """The .cu text of one kernel instance: N, K and the tile choice are compile-time."""
    out_type = "float" if kind == "1d1d" else "__nv_bfloat16"
    if accumulate and kind != "1d1d":
        raise ValueError("accumulate: only the 1D1D (FP32 out) kernel accumulates")
    return f"""// Rendered by fp8train.ops.native.sm90_fp8_gemm: {config}, N={n}, K={k}, {kind}
#include "fp8train/sm90_fp8_gemm.cuh"

namespace fp8train {{
{render_wgmma_e4m3(config.block_n)}
}}  // namespace fp8train

extern "C" __global__ void __launch_bounds__({config.num_threads}, 1)
{KERNEL_NAME}(uint32_t shape_m, const float* scale_a, const float* scale_b, {out_type}* out,
              const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b) {{
    fp8train::sm90_fp8_gemm<{config.block_m}, {config.block_n}, {config.num_stages}, {n}, {k},
                            {str(kind == "1d1d").lower()}, {str(accumulate).lower()}, {config.group_n},
                            {out_type}, fp8train::Wgmma_m64n{config.block_n}k32>(
        shape_m, scale_a, scale_b, out, &tmap_a, &tmap_b);
}}
"""


def kernel_name(config: GemmConfig, n: int, k: int, kind: str, accumulate: bool) -> str:
    acc = "_acc" if accumulate else ""
    return (f"sm90_fp8_gemm_{kind}{acc}_n{n}_k{k}_bm{config.block_m}_bn{config.block_n}"
            f"_s{config.num_stages}_g{config.group_n}")


def compile_kernel(config: GemmConfig, n: int, k: int, kind: str, accumulate: bool):
    """Compile (or find in the cache) one kernel instance; returns the JIT's CompiledKernel."""
    from ..jit.compiler import compile_cubin

    return compile_cubin(kernel_name(config, n, k, kind, accumulate),
                         render_source(config, n, k, kind, accumulate))


@dataclass(frozen=True)
class _Launch:
    config: GemmConfig
    kernel: object
    smem: int


_launches: dict = {}
_U32 = ctypes.c_uint32
_PTR = ctypes.c_void_p


def _launch_for(m: int, n: int, k: int, kind: str, accumulate: bool, device: int, num_sms: int) -> _Launch:
    key = (m, n, k, kind, accumulate, device, num_sms)
    launch = _launches.get(key)
    if launch is None:
        from ..jit.runtime import load_kernel

        config = choose_config(m, n, k, num_sms, kind)
        compiled = compile_kernel(config, n, k, kind, accumulate)
        launch = _Launch(config, load_kernel(compiled, KERNEL_NAME, device),
                         shared_bytes(config.block_m, config.block_n, config.num_stages, kind))
        _launches[key] = launch
    return launch


def fp8_gemm_nt_native(a, sa, b, sb, out: torch.Tensor, kind: str, accumulate: bool) -> None:
    """Launch D = A B^T on the current stream. Arguments were checked by the caller:
    a [M, K] / b [N, K] e4m3 K-major, sa [M, K/128], sb 128x128 or 1x128 (per `kind`),
    all row-major contiguous; out [M, N] contiguous bf16 (1d2d) or fp32 (1d1d)."""
    from ..jit.device import get_num_sms
    from ..jit.runtime import encode_tma_2d

    m, k = a.shape
    n = b.shape[0]
    device = a.device.index
    launch = _launch_for(m, n, k, kind, accumulate, device, get_num_sms())
    cfg = launch.config
    tmap_a = encode_tma_2d(a.data_ptr(), a.dtype, k, m, a.stride(0), 128, cfg.block_m, 128)
    tmap_b = encode_tma_2d(b.data_ptr(), b.dtype, k, n, b.stride(0), 128, cfg.block_n, 128)
    launch.kernel.launch(
        cfg.num_ctas, cfg.num_threads, launch.smem,
        (m, sa.data_ptr(), sb.data_ptr(), out.data_ptr(), tmap_a, tmap_b),
        (_U32, _PTR, _PTR, _PTR, None, None),
        torch.cuda.current_stream(a.device).cuda_stream,
    )
