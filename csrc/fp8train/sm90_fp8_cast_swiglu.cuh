// SwiGLU fused into the dual cast: gate and up [T, I] (rows ld elements apart in both: two
// tensors, or the halves of one [T, 2I] as h.chunk(2, -1) splits it) -> the row-wise 1x128
// cast of a = silu(gate) * up along I and the column-wise cast of a.T along T (zero-padded
// to qt_cols), a itself never written. Bit-identical to casting torch's F.silu(gate) * up
// on the GPU: silu computed in float as g / (1 + exp(-g)) (ATen's CUDA kernel, no fast
// math) and rounded to T, then the product in float rounded to T; the casts are the dual
// cast's (sm90_fp8_cast_dual_async.cuh).
//
// One 128 x 128 tile of a per block: gate's and up's tiles are staged by cp.async (2 x 32 KB
// for bf16/fp16, 3 blocks per SM), each thread then turns the units it staged into a's in
// place in gate's tile (its own copies are complete after its wait: no barrier), and after
// one barrier the dual cast's row and column passes read a's tile. Needs I % 16 == 0 and
// 16-byte aligned rows (the host falls back to the unfused ops otherwise).
#pragma once

#include "fp8train/sm90_fp8_cast_dual_async.cuh"

namespace fp8train {
namespace cast {

// A float rounded to T's precision, as T's raw bits (the inverse of raw_to_float).
template <typename T> __device__ __forceinline__ uint32_t float_to_raw(float v);
template <> __device__ __forceinline__ uint32_t float_to_raw<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint32_t float_to_raw<__nv_bfloat16>(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint32_t float_to_raw<__half>(float v) {
    return __half_as_ushort(__float2half_rn(v));
}

// silu(g) * u for one element pair, each op rounded to T as torch's two kernels round.
template <typename T>
__device__ __forceinline__ uint32_t swiglu_raw(uint32_t g_bits, uint32_t u_bits) {
    const float g = raw_to_float<T>(g_bits);
    const float silu = raw_to_float<T>(float_to_raw<T>(g / (1.0f + expf(-g))));
    return float_to_raw<T>(silu * raw_to_float<T>(u_bits));
}

// A 16-byte unit of gate and the matching unit of up -> the unit of a, element by element.
template <typename T>
__device__ __forceinline__ uint4 swiglu_unit(uint4 gate, uint4 up) {
    const uint32_t g[4] = {gate.x, gate.y, gate.z, gate.w}, u[4] = {up.x, up.y, up.z, up.w};
    uint32_t a[4];
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
        if constexpr (sizeof(T) == 4) {
            a[i] = swiglu_raw<T>(g[i], u[i]);
        } else {  // two 16-bit elements per word
            a[i] = swiglu_raw<T>(g[i] & 0xFFFFu, u[i] & 0xFFFFu) | (swiglu_raw<T>(g[i] >> 16, u[i] >> 16) << 16);
        }
    }
    return make_uint4(a[0], a[1], a[2], a[3]);
}

}  // namespace cast

template <typename T, bool POW2>
__device__ __forceinline__ void swiglu_dual_cast_tile(const T* __restrict__ gate, const T* __restrict__ up,
                                                      uint64_t ld, uint32_t rows, uint32_t cols,
                                                      const DualCastOut& out) {
    using namespace cast;
    using Tile = StagedTile<T>;
    constexpr uint32_t UNITS_PER_THREAD = GROUP * Tile::UNITS / DUAL_ASYNC_THREADS;
    static_assert(DUAL_ASYNC_THREADS % Tile::UNITS == 0, "a thread's units share one column");
    extern __shared__ __align__(128) uint8_t tile[];  // gate's tile, then up's: 2 x Tile::BYTES
    uint8_t* up_tile = tile + Tile::BYTES;
    const uint32_t t0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;

    // Stage: thread i copies unit i % UNITS of rows i / UNITS + j * (THREADS / UNITS) of gate
    // and up; rows past T and columns past I are zero (silu(0) * 0 = 0 changes no amax).
    const uint32_t u = threadIdx.x % Tile::UNITS;
    const uint32_t k_unit = k0 + u * Tile::PER_UNIT;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
#pragma unroll
    for (uint32_t j = 0; j < UNITS_PER_THREAD; ++j) {
        const uint32_t r = threadIdx.x / Tile::UNITS + j * (DUAL_ASYNC_THREADS / Tile::UNITS), t = t0 + r;
        const bool inside = t < rows && k_unit < cols;
        const uint64_t at = inside ? t * ld + k_unit : 0;
        cp_async_16(base + Tile::unit_offset(r, u), gate + at, inside ? 16 : 0);
        cp_async_16(base + Tile::BYTES + Tile::unit_offset(r, u), up + at, inside ? 16 : 0);
    }
    cp_async_wait_all();
#pragma unroll
    for (uint32_t j = 0; j < UNITS_PER_THREAD; ++j) {
        const uint32_t r = threadIdx.x / Tile::UNITS + j * (DUAL_ASYNC_THREADS / Tile::UNITS);
        uint4* a = reinterpret_cast<uint4*>(tile + Tile::unit_offset(r, u));
        *a = swiglu_unit<T>(*a, *reinterpret_cast<const uint4*>(up_tile + Tile::unit_offset(r, u)));
    }
    __syncthreads();
    cast_staged_tile<T, POW2>(tile, t0, k0, rows, cols, out);
}

}  // namespace fp8train
