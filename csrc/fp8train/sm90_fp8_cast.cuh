// Fused dual cast of an activation or output gradient x [T, K] (bit-identical to
// fp8train.quant.reference.dual_cast_ref; the scale rule is in cast_common.cuh).
//
// One 128 x 128 tile of x per block, read once with 16-byte loads, written twice:
//   row-wise     1x128 along K: q [T, K], scale [T, ceil(K/128)], straight from registers;
//   column-wise  1x128 along T of x.T: qt [K, qt_cols], scale_t [K, ceil(qt_cols/128)],
//                through a swizzled float tile in shared memory. qt_cols is T (the plain
//                transposed cast) or T rounded up to 128 (the wgrad operand; padding rows
//                are zeros, which change no amax).
// Every thread moves 16-element chunks: two (bf16/fp16) or four (fp32) 16-byte loads in,
// one 16-byte e4m3 store out. Rows whose length is not a multiple of 16 fall back to
// element-wise loads and byte stores (correct, slower).
//
// Gather (the MoE permutation fused in): with src_rows != nullptr, output row t reads input
// row src_rows[t], and src_rows[t] >= src_count means a zero row (MoELayout.src_tokens).
#pragma once

#include "fp8train/cast_common.cuh"

namespace fp8train {

constexpr uint32_t DUAL_CAST_THREADS = 256;
constexpr uint32_t DUAL_CAST_SMEM_BYTES = cast::TILE_FLOATS * sizeof(float);

// KMAJOR: row-wise scales K-block-major (cast_common.cuh: write_row_group).
template <typename T, bool POW2, bool KMAJOR>
__device__ __forceinline__ void dual_cast_tile(const T* __restrict__ x, const int64_t* __restrict__ src_rows,
                                               uint32_t src_count, uint32_t rows, uint32_t cols, bool vec_in,
                                               uint8_t* __restrict__ q, float* __restrict__ scale,
                                               uint32_t scale_ld, uint8_t* __restrict__ qt, uint32_t qt_cols,
                                               float* __restrict__ scale_t, bool rowwise, bool colwise) {
    using namespace cast;
    constexpr uint32_t WARPS = DUAL_CAST_THREADS / 32;
    constexpr uint32_t ROWS_PER_STEP = 32 / LANES_PER_GROUP;            // 4 rows per warp step
    constexpr uint32_t STEPS = GROUP / (WARPS * ROWS_PER_STEP);         // 4 steps per tile
    static_assert(STEPS * WARPS * ROWS_PER_STEP == GROUP, "the warps must cover the tile");
    extern __shared__ __align__(16) float tile[];                       // TILE_FLOATS, swizzled
    const uint32_t t0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t octet = lane / LANES_PER_GROUP, sub = lane % LANES_PER_GROUP;
    const uint32_t col_blocks = gridDim.x;

    // Issue every load of this thread first (STEPS chunks in flight), then use them.
    Chunk<T> chunks[STEPS];
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t t = t0 + (s * WARPS + warp) * ROWS_PER_STEP + octet;
        const T* row = nullptr;
        if (t < rows) {
            const uint64_t src = src_rows != nullptr ? static_cast<uint64_t>(src_rows[t]) : t;
            if (src < src_count) row = x + src * cols;
        }
        chunks[s] = load_chunk(row, k0 + CHUNK * sub, cols, vec_in);
    }

#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t r = (s * WARPS + warp) * ROWS_PER_STEP + octet, t = t0 + r;
        const uint32_t k = k0 + CHUNK * sub;
        float v[CHUNK];
#pragma unroll
        for (uint32_t j = 0; j < CHUNK; ++j) v[j] = element(chunks[s], j);
        if (colwise) tile_store_chunk(tile, r, sub, v);
        if (rowwise)  // the 8 lanes of an octet hold one row's 128-group
            write_row_group<POW2, KMAJOR>(v, t, k, sub, rows, cols, blockIdx.x, col_blocks, q, scale, scale_ld);
    }
    if (!colwise) return;
    __syncthreads();

    // Column pass: an octet owns one column's 128 tokens, 16 consecutive per lane, so each
    // lane writes 16 contiguous bytes of qt's row.
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t c = (s * WARPS + warp) * ROWS_PER_STEP + octet;
        float v[CHUNK];
        tile_load_column(tile, sub, c, v);
        write_column_group<POW2>(v, k0 + c, t0, sub, cols, blockIdx.y, gridDim.y, qt, qt_cols, scale_t);
    }
}

}  // namespace fp8train
