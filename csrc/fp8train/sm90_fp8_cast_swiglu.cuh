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

// silu(g) * u for one element pair, each op rounded to T as torch's two kernels round. (The
// backward's shared reciprocal, silu_quotients, ran this cast at 73-77% of a copy against
// 81-86% with nvcc's division: H100, docs/quant.md.)
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

// The units a thread of a THREADS-thread block stages of a 128 x 128 tile, and later owns:
// unit unit() of rows row(j), j < COUNT (thread i: unit i % UNITS of rows i / UNITS +
// j * (THREADS / UNITS)).
template <typename T, uint32_t THREADS = DUAL_ASYNC_THREADS>
struct OwnUnits {
    using Tile = StagedTile<T>;
    static constexpr uint32_t COUNT = GROUP * Tile::UNITS / THREADS;
    static_assert(THREADS % Tile::UNITS == 0, "a thread's units share one column");
    __device__ static __forceinline__ uint32_t unit() { return threadIdx.x % Tile::UNITS; }
    __device__ static __forceinline__ uint32_t row(uint32_t j) {
        return threadIdx.x / Tile::UNITS + j * (THREADS / Tile::UNITS);
    }
    __device__ static __forceinline__ uint32_t offset(uint32_t j) { return Tile::unit_offset(row(j), unit()); }
};

// Stage this thread's units of the tiles at (t0, k0) of N [rows, cols] tensors (row strides
// ld[n]) into N consecutive staged tiles by cp.async, zeros past the rows and columns, and
// wait for them: the thread may then rewrite its own units without a barrier.
template <typename T, uint32_t N, uint32_t THREADS = DUAL_ASYNC_THREADS>
__device__ __forceinline__ void stage_own_units(uint8_t* tile, const T* const (&src)[N], const uint64_t (&ld)[N],
                                                uint32_t t0, uint32_t k0, uint32_t rows, uint32_t cols) {
    using Own = OwnUnits<T, THREADS>;
    using Tile = StagedTile<T>;
    const uint32_t k_unit = k0 + Own::unit() * Tile::PER_UNIT;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
#pragma unroll
    for (uint32_t j = 0; j < Own::COUNT; ++j) {
        const uint32_t t = t0 + Own::row(j);
        const bool inside = t < rows && k_unit < cols;
#pragma unroll
        for (uint32_t n = 0; n < N; ++n)
            cp_async_16(base + n * Tile::BYTES + Own::offset(j), src[n] + (inside ? t * ld[n] + k_unit : 0),
                        inside ? 16 : 0);
    }
    cp_async_wait_all();
}

}  // namespace cast

template <typename T, bool POW2>
__device__ __forceinline__ void swiglu_dual_cast_tile(const T* __restrict__ gate, const T* __restrict__ up,
                                                      uint64_t ld, uint32_t rows, uint32_t cols,
                                                      const DualCastOut& out) {
    using namespace cast;
    using Tile = StagedTile<T>;
    extern __shared__ __align__(128) uint8_t tile[];  // gate's tile, then up's: 2 x Tile::BYTES
    const uint8_t* up_tile = tile + Tile::BYTES;
    const uint32_t t0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;
    // Rows past T and columns past I stage as zeros: silu(0) * 0 = 0 changes no amax.
    const T* const sources[2] = {gate, up};
    const uint64_t strides[2] = {ld, ld};
    stage_own_units<T, 2>(tile, sources, strides, t0, k0, rows, cols);
#pragma unroll
    for (uint32_t j = 0; j < OwnUnits<T>::COUNT; ++j) {
        uint4* a = reinterpret_cast<uint4*>(tile + OwnUnits<T>::offset(j));
        *a = swiglu_unit<T>(*a, *reinterpret_cast<const uint4*>(up_tile + OwnUnits<T>::offset(j)));
    }
    __syncthreads();
    cast_staged_tile<T, POW2>(tile, t0, k0, rows, cols, out);
}

}  // namespace fp8train
