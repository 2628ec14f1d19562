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


def render_source(config: GemmConfig, n: int, k: int, accumulate: bool) -> str:
    """The .cu text of one kernel instance: N, K and the tile choice are compile-time."""
    if accumulate and config.kind != "1d1d":
        raise ValueError("accumulate: only the 1D1D (FP32 out) kernel accumulates")
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
              const __grid_constant__ CUtensorMap tmap_out) {{
    fp8train::sm90_fp8_gemm<{config.block_m}, {config.block_n}, {config.num_stages}, {n}, {k},
                            {str(config.kind == "1d1d").lower()}, {str(accumulate).lower()},
                            {config.group_n}, fp8train::Wgmma_m64n{config.block_n}k32>(
        shape_m, scale_b, out_f32, &tmap_a, &tmap_b, &tmap_scale_a, &tmap_scale_b, &tmap_out);
}}
"""


def kernel_name(config: GemmConfig, n: int, k: int, accumulate: bool) -> str:
    acc = "_acc" if accumulate else ""
    return (f"sm90_fp8_gemm_{config.kind}{acc}_n{n}_k{k}_bm{config.block_m}_bn{config.block_n}"
            f"_s{config.num_stages}_g{config.group_n}")


def compile_kernel(config: GemmConfig, n: int, k: int, accumulate: bool):
    """Compile (or find in the cache) one kernel instance; returns the JIT's CompiledKernel."""
    from ..jit.compiler import compile_cubin

    return compile_cubin(kernel_name(config, n, k, accumulate), render_source(config, n, k, accumulate))


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
        compiled = compile_kernel(config, n, k, accumulate)
        launch = _Launch(config, load_kernel(compiled, KERNEL_NAME, device),
                         shared_bytes(config.block_m, config.block_n, config.num_stages, kind))
        _launches[key] = launch
    return launch


def mn_major_scales(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """1x128 scales ``[R, Kb]`` as the kernel reads them: element (r, kb) at ``kb * ld + r``
    with ``ld`` a multiple of 4 (TMA's 16-byte stride rule). A tensor already laid out so
    (a transposed view of ``[Kb, ld]``) is used as is; a row-major one is copied once."""
    rows, kb = scale.shape
    if scale.stride(0) == 1 and scale.stride(1) % 4 == 0 and (kb == 1 or scale.stride(1) >= rows):
        return scale, max(scale.stride(1), -(-rows // 4) * 4)
    ld = -(-rows // 4) * 4
    buffer = torch.empty(kb, ld, dtype=torch.float32, device=scale.device)
    buffer[:, :rows].copy_(scale.t())
    return buffer, ld


def fp8_gemm_nt_native(a, sa, b, sb, out: torch.Tensor, kind: str, accumulate: bool) -> None:
    """Launch D = A B^T on the current stream. Arguments were checked by the caller:
    a [M, K] / b [N, K] e4m3 K-major, sa [M, K/128] (any strides), sb 128x128 row-major
    contiguous (1d2d) or 1x128 [N, K/128] (1d1d); out [M, N] contiguous bf16 (1d2d) or fp32."""
    from ..jit.device import get_num_sms
    from ..jit.runtime import encode_tma_2d

    m, k = a.shape
    n = b.shape[0]
    kb = k // 128
    launch = _launch_for(m, n, k, kind, accumulate, a.device.index, get_num_sms())
    cfg = launch.config
    f32 = torch.float32
    sa_mn, lda = mn_major_scales(sa)
    tmap_a = encode_tma_2d(a.data_ptr(), a.dtype, k, m, a.stride(0), 128, cfg.block_m, 128)
    tmap_b = encode_tma_2d(b.data_ptr(), b.dtype, k, n, b.stride(0), 128, cfg.block_n, 128)
    tmap_sa = encode_tma_2d(sa_mn.data_ptr(), f32, m, kb, 4 * lda, cfg.block_m, 1, 0)
    if kind == "1d1d":
        sb_mn, ldb = mn_major_scales(sb)
        tmap_sb = encode_tma_2d(sb_mn.data_ptr(), f32, n, kb, 4 * ldb, cfg.block_n, 1, 0)
        tmap_out, scale_b_ptr = tmap_a, 0  # unused by the 1D1D kernel
    else:
        tmap_sb, scale_b_ptr = tmap_a, sb.data_ptr()
        tmap_out = encode_tma_2d(out.data_ptr(), out.dtype, n, m, 2 * n, cfg.block_n, cfg.block_m, 0)
    launch.kernel.launch(
        cfg.num_ctas, cfg.num_threads, launch.smem,
        (m, scale_b_ptr, out.data_ptr(), tmap_a, tmap_b, tmap_sa, tmap_sb, tmap_out),
        (_U32, _PTR, _PTR, None, None, None, None, None),
        torch.cuda.current_stream(a.device).cuda_stream,
    )
