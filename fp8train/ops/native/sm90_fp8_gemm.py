"""Host side of the dense sm_90a FP8 GEMM (csrc/fp8train/sm90_fp8_gemm.cuh): renders the
kernel for a config, compiles it through the JIT, and launches it.

The launch path is what every eager GEMM call pays on the host, so everything that depends
only on (shape, kind, device) is looked up once and cached; a call then encodes the two TMA
descriptors and launches.
"""
from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass, replace

import torch

from .gemm_config import GemmConfig, choose_config, shared_bytes
from .wgmma import render_wgmma_e4m3
from ..jit.device import get_num_sms
from ..jit.runtime import raw_stream as _raw_stream
from ..scale_layout import empty_scales, kblock_major_ld, tma_readable, unpack

KERNEL_NAME = "fp8train_gemm"

# How the operands are grouped (csrc/fp8train/scheduler.cuh, enum Grouping), and the kernel
# kind each grouping runs as: m-grouped GEMMs are fprop/dgrad (1D2D), k-grouped is wgrad.
GROUPINGS = {"none": ("kNone", None), "m_contiguous": ("kMContiguous", "1d2d"),
             "m_masked": ("kMMasked", "1d2d"), "k_contiguous": ("kKContiguous", "1d1d")}


def _check_grouping(config: GemmConfig, accumulate: bool, grouping: str, out_f32: bool = False) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping: expected one of {sorted(GROUPINGS)}, got {grouping!r}")
    if accumulate and config.kind != "1d1d":
        raise ValueError("accumulate: only the 1D1D (FP32 out) kernel accumulates")
    kind = GROUPINGS[grouping][1]
    if kind is not None and config.kind != kind:
        raise ValueError(f"grouping {grouping!r} runs the {kind} kernel, got config kind {config.kind!r}")
    if out_f32 and (config.kind != "1d2d" or grouping != "none" or config.split_k != 1):
        raise ValueError("out_f32: only the dense 1D2D kernel without split-K takes the FP32 "
                         f"output switch, got kind {config.kind!r}, grouping {grouping!r}, "
                         f"split_k={config.split_k}")
    if grouping != "none" and (config.cluster != 1 or config.split_k != 1):
        raise ValueError(f"grouping {grouping!r} runs without clusters or split-K, got "
                         f"cluster={config.cluster}, split_k={config.split_k}")


def render_source(config: GemmConfig, n: int, k: int, accumulate: bool, grouping: str = "none",
                  out_f32: bool = False) -> str:
    """The .cu text of one kernel instance: N, K and the tile choice are compile-time.
    grouping: "m_contiguous"/"m_masked" (B is [G, N, K], every tile of A belongs to one
    expert) or "k_contiguous" (wgrad over experts' token segments; K is then runtime and
    `k` is ignored). out_f32: a dense 1D2D kernel writing FP32 instead of BF16."""
    _check_grouping(config, accumulate, grouping, out_f32)
    if grouping == "k_contiguous":
        k = 0
    scale_b_1x128, acc, f32 = (str(v).lower() for v in (config.kind == "1d1d", accumulate, out_f32))
    smem = shared_bytes(config.block_m, config.block_n, config.num_stages, config.kind)
    # The comment names only what the kernel is compiled for (not the grid), so configs that
    # differ in num_ctas share one cached kernel.
    compiled_for = (f"{config.kind} BM={config.block_m} BN={config.block_n} stages={config.num_stages} "
                    f"group_n={config.group_n} cluster={config.cluster}{config.shares} split_k={config.split_k}")
    return f"""// Rendered by fp8train.ops.native.sm90_fp8_gemm: {compiled_for}, N={n}, K={k}, {grouping}
#include "fp8train/sm90_fp8_gemm.cuh"

namespace fp8train {{
{render_wgmma_e4m3(config.block_n)}
// The launch passes gemm_config.shared_bytes as the dynamic shared memory: it must hold the
// kernel's layout.
static_assert(Sm90Fp8Gemm<{config.block_m}, {config.block_n}, {config.num_stages}, {n}, {k}, {scale_b_1x128}, {acc},
                          {config.group_n}, {config.cluster}, {f32}>::kSharedBytes <= {smem},
              "gemm_config.shared_bytes plans less shared memory than the kernel lays out");
}}  // namespace fp8train

extern "C" __global__ void __launch_bounds__({config.num_threads}, 1)
{KERNEL_NAME}(uint32_t shape_m, const float* scale_b, float* out_f32,
              const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
              const __grid_constant__ CUtensorMap tmap_scale_a,
              const __grid_constant__ CUtensorMap tmap_scale_b,
              const __grid_constant__ CUtensorMap tmap_out,
              const int32_t* group_counts, uint32_t num_groups, float* split_partials,
              int32_t* split_counters) {{
    fp8train::sm90_fp8_gemm<{config.block_m}, {config.block_n}, {config.num_stages}, {n}, {k},
                            {scale_b_1x128}, {acc},
                            {config.group_n}, {config.cluster}, fp8train::Grouping::{GROUPINGS[grouping][0]},
                            {config.split_k}, fp8train::Wgmma_m64n{config.block_n}k32, {f32},
                            {str(config.shares == "b").lower()}>(
        shape_m, scale_b, out_f32, &tmap_a, &tmap_b, &tmap_scale_a, &tmap_scale_b, &tmap_out,
        group_counts, num_groups, split_partials, split_counters);
}}
"""


def kernel_name(config: GemmConfig, n: int, k: int, accumulate: bool, grouping: str = "none",
                out_f32: bool = False) -> str:
    acc = ("_acc" if accumulate else "") + ("" if grouping == "none" else "_" + grouping)
    acc += "_f32" if out_f32 else ""
    k_label = "var" if grouping == "k_contiguous" else k
    return (f"sm90_fp8_gemm_{config.kind}{acc}_n{n}_k{k_label}_bm{config.block_m}_bn{config.block_n}"
            f"_s{config.num_stages}_g{config.group_n}_c{config.cluster}{'b' if config.shares == 'b' else ''}"
            + (f"_sk{config.split_k}" if config.split_k > 1 else ""))


def swizzled_out(config: GemmConfig) -> bool:
    """Whether this config's kernel writes the swizzled output tile (mirrors kSwizzledOut)."""
    return config.kind == "1d2d" and config.block_n % 64 == 0


def compile_kernel(config: GemmConfig, n: int, k: int, accumulate: bool, grouping: str = "none",
                   out_f32: bool = False):
    """Compile (or find in the cache) one kernel instance; returns the JIT's CompiledKernel."""
    from ..jit.compiler import compile_cubin

    return compile_cubin(kernel_name(config, n, k, accumulate, grouping, out_f32),
                         render_source(config, n, k, accumulate, grouping, out_f32))


@dataclass(frozen=True, eq=False)  # identity hash: a cheap, exact key for cached parameter blocks
class _Launch:
    config: GemmConfig
    kernel: object
    smem: int
    grid: int  # CTAs: the config's, cut to the clusters that fit on the GPU at once


_launches: dict = {}


def _launch_for(m: int, n: int, k: int, kind: str, accumulate: bool, device: int, num_sms: int,
                config: GemmConfig | None = None, grouping: str = "none", out_f32: bool = False,
                segment_rows: int = 128) -> _Launch:
    key = (m, n, k, kind, accumulate, device, num_sms, config, grouping, out_f32, segment_rows)
    launch = _launches.get(key)
    if launch is None:
        from ..jit.runtime import load_kernel

        config = config or choose_config(m, n, k, num_sms, kind, grouped=grouping != "none",
                                         segment_rows=segment_rows)
        if out_f32 and config.split_k > 1:  # split-K reduces into the BF16 epilogue only
            config = replace(config, split_k=1, num_ctas=min(config.num_ctas, num_sms))
        compiled = compile_kernel(config, n, k, accumulate, grouping, out_f32)
        kernel = load_kernel(compiled, KERNEL_NAME, device)
        smem = shared_bytes(config.block_m, config.block_n, config.num_stages, kind)
        grid = config.num_ctas
        if config.cluster > 1:
            # A persistent grid must be resident all at once: clusters of big-smem CTAs need
            # SM pairs in one GPC, and a GPC with an odd SM count leaves one idle, so fewer
            # than SMs / 2 clusters may fit. A cluster that does not would run only after
            # the others finished all their tiles, doubling the time.
            fit = kernel.max_active_clusters(config.num_threads, smem, config.cluster)
            grid = max(config.cluster, min(grid, fit * config.cluster))
        launch = _Launch(config, kernel, smem, grid)
        _launches[key] = launch
    return launch


class _ParamBlock:
    """Kernel parameters in one block: SLOTS slots of 128 bytes (a CUtensorMap is 128
    bytes) and the void* array pointing at them. A launch hands the driver the array's
    address, and the driver copies the parameters before cuLaunchKernelEx returns; this
    skips cuda-bindings' per-call argument packing."""

    SLOTS = 12
    __slots__ = ("_raw", "_view", "_first", "slots", "_array", "address")

    def __init__(self):
        self._raw = (ctypes.c_uint8 * (128 * self.SLOTS + 64))()
        base = (ctypes.addressof(self._raw) + 63) & ~63
        self._view = memoryview(self._raw).cast("B")
        self._first = base - ctypes.addressof(self._raw)  # offset of slot 0 in the buffer
        self.slots = [base + 128 * i for i in range(self.SLOTS)]
        self._array = (ctypes.c_void_p * self.SLOTS)(*self.slots)
        self.address = ctypes.addressof(self._array)

    def set_u32(self, slot: int, value: int) -> None:
        _U32.pack_into(self._view, self._first + 128 * slot, value)

    def set_u64(self, slot: int, value: int) -> None:
        _U64.pack_into(self._view, self._first + 128 * slot, value)


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


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


_counters: dict = {}  # (device, stream) -> int32 arrival counters, zero between launches


def _split_counters(device: int, outputs: int) -> torch.Tensor:
    """Split-K arrival counters for the current stream: one per output tile, zeroed once;
    every launch leaves them zero again. One set per stream, so concurrent streams never
    share a counter."""
    if torch.cuda.is_current_stream_capturing():
        # A zero-fill made during capture exists only as a node of that graph: counters
        # cached from it would start from garbage outside the graph. The graph gets its own.
        return torch.zeros(outputs, dtype=torch.int32, device=torch.device("cuda", device))
    key = (device, _raw_stream(device))
    counters = _counters.get(key)
    if counters is None or counters.numel() < outputs:
        counters = _counters[key] = torch.zeros(max(outputs, 1024), dtype=torch.int32,
                                                device=torch.device("cuda", device))
    return counters


def fp8_gemm_nt_native(a, sa, b, sb, out: torch.Tensor, kind: str, accumulate: bool,
                       config: GemmConfig | None = None,
                       group_offsets: torch.Tensor | None = None, segment_rows: int = 128) -> None:
    """Launch D = A B^T on the current stream. Arguments were checked by the caller:
    a [M, K] / b [N, K] e4m3 K-major, sa [M, K/128], sb 128x128 row-major contiguous (1d2d)
    or 1x128 [N, K/128] (1d1d); out [M, N] contiguous bf16 (1d2d) or fp32 (1d1d).
    `config` overrides the heuristic (benchmarks and sweeps). With `group_offsets` (int32
    [G+1] on the device, multiples of `segment_rows`, 128 or 256) the GEMM is m-grouped
    contiguous: b [G, N, K], sb [G, ceil(N/128), K/128] contiguous; offsets are read by the
    kernel, never the host, so their alignment is the caller's promise: a tile taller than
    a segment's alignment could span two experts."""
    m, k = a.shape
    grouping = "none" if group_offsets is None else "m_contiguous"
    if grouping == "m_contiguous" and config is not None and config.block_m > segment_rows:
        raise ValueError(f"config: block_m = {config.block_m} rows over expert segments aligned to "
                         f"{segment_rows} rows could span two experts; pass segment_rows=256 for "
                         f"256-aligned offsets")
    out_f32 = kind == "1d2d" and out.dtype == torch.float32
    launch = _launch_for(m, b.shape[-2], k, kind, accumulate, a.device.index, get_num_sms(), config,
                         grouping, out_f32, segment_rows if grouping == "m_contiguous" else 128)
    _launch(launch, launch.grid, a, sa, b, sb, out, m, grouping, group_offsets)


def m_grouped_masked_native(a, sa, b, sb, masked_m: torch.Tensor, out: torch.Tensor, expected_m: int,
                            config: GemmConfig | None = None) -> None:
    """out[g, :masked_m[g]] = a[g, :masked_m[g]] b[g]^T on the current stream, no host sync.
    a [G, M_max, K], b [G, N, K], sb [G, ceil(N/128), K/128], out [G, M_max, N] bf16, all
    contiguous; sa [G, M_max, K/128] (K-block-major as the casts write it, else staged);
    masked_m int32 [G] on the device. The config is the one for G x expected_m rows; every
    SM runs, since the real tile count is on the device."""
    g, m_max, k = a.shape
    num_sms = get_num_sms()
    expected_m = max(1, expected_m)
    if config is None:
        config = choose_config(g * expected_m, b.shape[1], k, num_sms, "1d2d", rows_per_group=expected_m)
    launch = _launch_for(g * expected_m, b.shape[1], k, "1d2d", False, a.device.index, num_sms,
                         config, "m_masked")
    _launch(launch, num_sms, a.view(g * m_max, k), _masked_scales(sa), b, sb, out, m_max, "m_masked",
            masked_m)


def _masked_scales(sa: torch.Tensor) -> torch.Tensor:
    """A's scales [G, M_max, K/128] as the masked kernel reads them: [G * M_pad, K/128],
    expert g's rows from g * M_pad, M_pad = M_max rounded up to 4 so that each expert's TMA
    boxes start 16-byte aligned. With M_max a multiple of 4 that is the casts' own layout
    (a view); otherwise a padded copy."""
    g, m_max, kb = sa.shape
    m_pad = -(-m_max // 4) * 4
    if m_pad == m_max:
        return sa.reshape(g * m_max, kb)
    padded = empty_scales((g, m_pad), kb, sa.device)
    padded[:, :m_max].copy_(sa)
    return padded.view(g * m_pad, kb)


def k_grouped_native(a, sa, b, sb, group_offsets: torch.Tensor, out: torch.Tensor, accumulate: bool,
                     config: GemmConfig | None = None) -> None:
    """out[g] (+)= a[:, seg g] b[:, seg g]^T for every expert g (MoE wgrad), no host sync.
    a [M, T] and b [N, T] e4m3 with 1x128 scales along T ([M, T/128], [N, T/128]); out
    [G, M, N] fp32 contiguous; group_offsets int32 [G+1] on the device, multiples of 128.
    One kernel serves every token count: T is read at run time."""
    m, t = a.shape
    n = b.shape[0]
    g = group_offsets.shape[0] - 1
    num_sms = get_num_sms()
    # The tile problem is G stacked [M, N] outputs; K (tokens) only sets the config's depth.
    launch = _launch_for(g * m, n, 128, "1d1d", accumulate, a.device.index, num_sms, config,
                         "k_contiguous")
    cfg = launch.config
    tiles = g * -(-m // cfg.block_m) * -(-n // cfg.block_n)
    _launch(launch, max(1, min(num_sms, tiles)), a, sa, b, sb, out, m, "k_contiguous", group_offsets)


def _launch(launch: _Launch, grid: int, a, sa, b, sb, out, shape_m: int, grouping: str,
            counts: torch.Tensor | None) -> None:
    """Launch with the parameter block of these operands. Training repeats the same few
    (kernel, pointers, shapes) every step, so each thread keeps the filled blocks it has
    built and a repeated call skips the descriptor lookups and copies (~7 of the ~10 us of
    Python a launch costs); only split-K's scratch pointer changes per call."""
    cfg = launch.config
    device = a.device.index
    sa_ready, _, reusable_a = _scales_as_read(sa, device, True, "a")
    if cfg.kind == "1d1d":
        sb_ready, ldb, reusable_b = _scales_as_read(sb, device, False, "b")
    else:
        sb_ready, ldb, reusable_b = sb, 0, True
    reusable = reusable_a and reusable_b  # False: a copy made for this call only (its block is not kept)
    blocks = getattr(_local, "blocks", None)
    if blocks is None:
        blocks = _local.blocks = {}
    key = (launch, grid, shape_m, a.data_ptr(), a.shape, a.stride(0), sa_ready.data_ptr(), sa_ready.stride(),
           b.data_ptr(), b.shape, b.stride(-2), sb_ready.data_ptr(), sb_ready.stride(), out.data_ptr(), out.shape,
           None if counts is None else (counts.data_ptr(), counts.shape[0]))
    params = blocks.get(key)
    if params is None:
        params = _fill_params(cfg, a, sa_ready, b, sb_ready, ldb, out, shape_m, grouping, counts)
        if reusable:
            if len(blocks) >= _PARAM_CACHE_LIMIT:
                blocks.clear()
            blocks[key] = params
    if cfg.split_k > 1:
        n = b.shape[-2]
        outputs = -(-shape_m // cfg.block_m) * -(-n // cfg.block_n)
        # Partials: stream-ordered scratch from the caching allocator (free once the kernel
        # is done, as far as later work on this stream is concerned).
        partials = torch.empty(outputs * cfg.split_k * cfg.block_m * cfg.block_n, dtype=torch.float32,
                               device=a.device)
        params.set_u64(10, partials.data_ptr())
        params.set_u64(11, _split_counters(device, outputs).data_ptr())
    launch.kernel.launch_params(grid, cfg.num_threads, launch.smem, params.address,
                                _raw_stream(device), cfg.cluster)


_PARAM_CACHE_LIMIT = 1024  # parameter blocks per thread (1.6 KB each)


_STAGING_LIMIT = 64  # staged scale buffers per thread


def _scales_as_read(scale: torch.Tensor, device: int, kblock_major: bool, role: str):
    """1x128 scales as the kernel's TMA reads them: K-block-major, or row-major with a row
    stride of a multiple of 4 floats. Returns (scales, row stride in floats for a row-major
    read else 0, whether a cached parameter block may hold them). Scales already so are used
    in place (the casts write K-block-major); others are staged (`_staged`)."""
    if tma_readable(scale, kblock_major):
        ready, reusable = scale, True
    else:
        ready, reusable = _staged(scale, device, kblock_major, role)
    return ready, 0 if kblock_major else ready.stride(0), reusable


def _staged(scale: torch.Tensor, device: int, kblock_major: bool, role: str) -> tuple[torch.Tensor, bool]:
    """A copy of ``scale`` [rows, Kb] in the layout the kernel reads, in a buffer kept per
    (thread, device, stream, operand, shape, layout): every call on a stream rewrites it after
    the previous kernel on that stream has read it (stream order), so a repeated GEMM keeps
    one scale pointer and its cached parameter block, and skips an allocation. Per thread,
    since two threads enqueueing on one stream could interleave a copy between another's
    copy and launch; per operand, since A's and B's scales of one launch may share a shape.
    Under graph capture the copy gets its own buffer (the graph owns it). Returns the view
    and whether it may back a cached parameter block."""
    rows, kb = scale.shape
    capturing = torch.cuda.is_current_stream_capturing()
    staging = getattr(_local, "staging", None)
    if staging is None:
        staging = _local.staging = {}
    key = (device, _raw_stream(device), role, rows, kb, kblock_major)
    buffer = None if capturing else staging.get(key)
    if buffer is None:
        # K-block-major: the storage scale_layout.pack gives; row-major: rows 16-byte aligned.
        shape = (kb, kblock_major_ld(rows)) if kblock_major else (rows, -(-kb // 4) * 4)
        buffer = torch.empty(shape, dtype=torch.float32, device=scale.device)
        if not capturing:
            if len(staging) >= _STAGING_LIMIT:
                staging.clear()
            staging[key] = buffer
    view = unpack(buffer, rows) if kblock_major else buffer[:, :kb]
    view.copy_(scale)
    return view, not capturing


def _fill_params(cfg: GemmConfig, a, sa, b, sb, ldb: int, out, shape_m: int, grouping: str,
                 counts: torch.Tensor | None) -> _ParamBlock:
    """A new parameter block: TMA descriptors of 2D views (A [rows, K], B [rows, K], A's
    1x128 scales K-block-major, B's 1x128 scales with a row stride of ldb floats, BF16 out
    [rows, N]), pointers and sizes. `counts` is group_offsets or masked_m."""
    rows_a, k = a.shape
    n = b.shape[-2]
    b_rows = b.numel() // k  # experts' weights TMA'd as one [G*N, K]
    out_rows = out.numel() // n
    kb = -(-k // 128)
    params = _ParamBlock()
    f32 = torch.float32
    params.set_u32(0, shape_m)
    params.set_u64(1, sb.data_ptr() if cfg.kind == "1d2d" else 0)
    params.set_u64(2, out.data_ptr())
    slots, move = params.slots, ctypes.memmove
    # Each CTA of a cluster loads its share of the operand the cluster shares.
    box_a = cfg.block_m // (cfg.cluster if cfg.shares == "a" else 1)
    box_b = cfg.block_n // (cfg.cluster if cfg.shares == "b" else 1)
    move(slots[3], _tma_address(a.data_ptr(), a.dtype, k, rows_a, a.stride(0), 128, box_a, 128), 128)
    move(slots[4], _tma_address(b.data_ptr(), b.dtype, k, b_rows, b.stride(-2), 128, box_b, 128), 128)
    # sa stored [K/128, rows]: one BLOCK_M-float box per K block
    move(slots[5], _tma_address(sa.data_ptr(), f32, sa.shape[0], kb, 4 * sa.stride(1), cfg.block_m, 1, 0), 128)
    if cfg.kind == "1d1d":
        move(slots[6], _tma_address(sb.data_ptr(), f32, kb, b_rows, 4 * ldb, 4, cfg.block_n, 0), 128)
    elif out.dtype == torch.bfloat16:  # an FP32 1D2D output is stored from registers
        box_n, swizzle = (64, 128) if swizzled_out(cfg) else (cfg.block_n, 0)
        move(slots[7], _tma_address(out.data_ptr(), out.dtype, n, out_rows, 2 * n, box_n, cfg.block_m, swizzle),
             128)
    params.set_u64(8, counts.data_ptr() if counts is not None else 0)
    num_groups = 0
    if counts is not None:
        num_groups = counts.shape[0] - (0 if grouping == "m_masked" else 1)
    params.set_u32(9, num_groups)
    return params
