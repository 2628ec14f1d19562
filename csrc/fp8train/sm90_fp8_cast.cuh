// FP8 casts at memory speed, bit-identical to fp8train.quant.reference:
//   scale = max(amax / 448, 2^-126) (optionally rounded up to a power of two on its bits),
//   q = e4m3(x / scale), round to nearest even; NaN propagates through amax and the scale.
//
// dual_cast: one 128 x 128 tile of x [T, K] per block, read once into shared memory, written
// twice: row-wise (1x128 along K: q [T, K], scale [T, K/128]) and column-wise, transposed
// (1x128 along T: qt [K, Tp], scale_t [K, Tp/128], Tp = T rounded up to 128, the padding
// rows counting as zeros), both in the layouts the GEMMs read.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace fp8train {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// max(|a|, b) that propagates NaN like torch's amax (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) {
    return (a != a || a > b) ? a : b;
}

__device__ __forceinline__ float scale_from_amax(float amax, bool pow2) {
    float scale = amax / 448.0f;  // IEEE division, as torch computes it
    if (!(scale != scale)) scale = fmaxf(scale, 1.17549435e-38f);  // 2^-126; NaN stays NaN
    if (pow2) {
        const uint32_t bits = __float_as_uint(scale);
        if ((bits & 0x7F800000u) != 0x7F800000u)  // finite: bump a non-zero mantissa
            return __uint_as_float((bits & 0x7F800000u) + ((bits & 0x7FFFFFu) ? 0x800000u : 0u));
    }
    return scale;
}

__device__ __forceinline__ uint8_t to_e4m3(float v, float scale) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(v, scale), __NV_NOSAT, __NV_E4M3));
}

// The scale of one 128-group spread over a warp (4 values per lane).
__device__ __forceinline__ float warp_group_scale(const float (&v)[4], bool pow2) {
    float amax = 0.0f;
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) amax = nan_max(fabsf(v[j]), amax);
#pragma unroll
    for (uint32_t offset = 16; offset > 0; offset /= 2)
        amax = nan_max(__shfl_xor_sync(0xffffffffu, amax, offset), amax);
    return scale_from_amax(amax, pow2);
}

template <typename T, bool POW2>
__device__ __forceinline__ void dual_cast_tile(const T* __restrict__ x, uint32_t rows, uint32_t cols,
                                               uint32_t padded_rows, uint8_t* __restrict__ q,
                                               float* __restrict__ scale, uint8_t* __restrict__ qt,
                                               float* __restrict__ scale_t, bool rowwise, bool colwise) {
    constexpr uint32_t TILE = 128, THREADS = 256, PAD = 1;  // +1 float per row: no bank conflicts
    static_assert(TILE / 32 == 4, "warp_group_scale takes 4 values per lane");
    extern __shared__ float tile[];                          // [TILE][TILE + PAD]
    const uint32_t t0 = blockIdx.y * TILE, k0 = blockIdx.x * TILE;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t col_blocks = (cols + TILE - 1) / TILE;

    // Load: each warp reads whole rows (coalesced); out-of-range elements are zeros.
    for (uint32_t r = warp; r < TILE; r += THREADS / 32) {
#pragma unroll
        for (uint32_t j = 0; j < TILE / 32; ++j) {
            const uint32_t c = j * 32 + lane, t = t0 + r, k = k0 + c;
            tile[r * (TILE + PAD) + c] = (t < rows && k < cols) ? to_float(x[static_cast<uint64_t>(t) * cols + k]) : 0.0f;
        }
    }
    __syncthreads();

    if (rowwise) {  // one 128-group per row: warp w owns rows w, w + 8, ...
        for (uint32_t r = warp; r < TILE && t0 + r < rows; r += THREADS / 32) {
            float v[TILE / 32];
#pragma unroll
            for (uint32_t j = 0; j < TILE / 32; ++j) v[j] = tile[r * (TILE + PAD) + j * 32 + lane];
            const float s = warp_group_scale(v, POW2);
            const uint64_t t = t0 + r;
#pragma unroll
            for (uint32_t j = 0; j < TILE / 32; ++j) {
                const uint32_t k = k0 + j * 32 + lane;
                if (k < cols) q[t * cols + k] = to_e4m3(v[j], s);
            }
            if (lane == 0) scale[t * col_blocks + blockIdx.x] = s;
        }
    }
    if (colwise) {  // one 128-group per column (over the tile's 128 tokens)
        for (uint32_t c = warp; c < TILE && k0 + c < cols; c += THREADS / 32) {
            float v[TILE / 32];
#pragma unroll
            for (uint32_t j = 0; j < TILE / 32; ++j) v[j] = tile[(j * 32 + lane) * (TILE + PAD) + c];
            const float s = warp_group_scale(v, POW2);
            const uint64_t k = k0 + c;
#pragma unroll
            for (uint32_t j = 0; j < TILE / 32; ++j)
                qt[k * padded_rows + t0 + j * 32 + lane] = to_e4m3(v[j], s);
            if (lane == 0) scale_t[k * (padded_rows / TILE) + blockIdx.y] = s;
        }
    }
}

}  // namespace fp8train
