// 128x128 block cast of a weight w [N, K] (or one expert of [G, N, K], blockIdx.z), bit-identical
// to fp8train.quant.reference.per_block_cast_dual_ref:
//   w_q  [N, K] with scale   [ceil(N/128), ceil(K/128)]   (fprop operand)
//   wt_q [K, N] with scale_t [ceil(K/128), ceil(N/128)]   (dgrad operand, W^T)
// in one read of w. A block's scale covers the same elements after transposing, so wt_q holds
// the same bytes as w_q transposed; writing it here saves the separate transpose pass.
// Either pair may be left out (a null wq or wtq): dgrad's re-cast wants only wt_q.
//
// One block per 128 x 128 tile: 16-byte loads into registers (and the swizzled shared tile
// when the transpose is wanted), one block-wide amax, then w_q from registers and wt_q from
// the tile, both with 16-byte e4m3 stores where the row lengths allow.
#pragma once

#include "fp8train/cast_common.cuh"

namespace fp8train {

constexpr uint32_t BLOCK_CAST_THREADS = 256;
constexpr uint32_t BLOCK_CAST_SMEM_BYTES = cast::TILE_FLOATS * sizeof(float);

template <typename T, bool POW2>
__device__ __forceinline__ void block_cast_tile(const T* __restrict__ w, uint32_t n_rows, uint32_t cols, bool vec_in,
                                                uint8_t* __restrict__ wq, float* __restrict__ scale,
                                                uint8_t* __restrict__ wtq, float* __restrict__ scale_t) {
    using namespace cast;
    constexpr uint32_t WARPS = BLOCK_CAST_THREADS / 32;
    constexpr uint32_t ROWS_PER_STEP = 32 / LANES_PER_GROUP;
    constexpr uint32_t STEPS = GROUP / (WARPS * ROWS_PER_STEP);
    static_assert(STEPS * WARPS * ROWS_PER_STEP == GROUP, "the warps must cover the tile");
    extern __shared__ __align__(16) float tile[];
    __shared__ float warp_amax[WARPS];
    const uint32_t n0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t octet = lane / LANES_PER_GROUP, sub = lane % LANES_PER_GROUP;
    const bool plain = wq != nullptr, transposed = wtq != nullptr;
    // Expert g's slices of every tensor (all [G, ...] contiguous).
    const uint64_t g = blockIdx.z, elems = static_cast<uint64_t>(n_rows) * cols;
    w += g * elems;
    if (plain) wq += g * elems, scale += g * gridDim.x * gridDim.y;
    if (transposed) wtq += g * elems, scale_t += g * gridDim.x * gridDim.y;

    Chunk<T> chunks[STEPS];
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t n = n0 + (s * WARPS + warp) * ROWS_PER_STEP + octet;
        chunks[s] = load_chunk(n < n_rows ? w + static_cast<uint64_t>(n) * cols : nullptr,
                               k0 + CHUNK * sub, cols, vec_in);
    }
    float amax = 0.0f;
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        float v[CHUNK];
#pragma unroll
        for (uint32_t j = 0; j < CHUNK; ++j) v[j] = element(chunks[s], j);
        amax = nan_max(chunk_amax(v), amax);
        if (transposed) tile_store_chunk(tile, (s * WARPS + warp) * ROWS_PER_STEP + octet, sub, v);
    }
#pragma unroll
    for (uint32_t offset = 16; offset > 0; offset /= 2)
        amax = nan_max(__shfl_xor_sync(0xffffffffu, amax, offset), amax);
    if (lane == 0) warp_amax[warp] = amax;
    __syncthreads();  // also publishes the tile
    amax = warp_amax[0];
#pragma unroll
    for (uint32_t i = 1; i < WARPS; ++i) amax = nan_max(warp_amax[i], amax);
    const float s_block = scale_from_amax(amax, POW2);
    const Quantizer d(s_block, POW2);
    if (threadIdx.x == 0) {
        if (plain) scale[blockIdx.y * gridDim.x + blockIdx.x] = s_block;
        if (transposed) scale_t[blockIdx.x * gridDim.y + blockIdx.y] = s_block;
    }

    // w_q from registers (the chunks are still there).
    const uint32_t k = k0 + CHUNK * sub;
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t n = n0 + (s * WARPS + warp) * ROWS_PER_STEP + octet;
        if (plain && n < n_rows && k < cols) {
            float v[CHUNK];
#pragma unroll
            for (uint32_t j = 0; j < CHUNK; ++j) v[j] = element(chunks[s], j);
            store_e4m3(wq + static_cast<uint64_t>(n) * cols + k, v, d, cols - k, cols % CHUNK == 0);
        }
    }
    if (!transposed) return;

    // wt_q from the tile: an octet owns one column of w (a row of wt_q), 16 rows per lane.
    const uint32_t n = n0 + CHUNK * sub;
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t c = (s * WARPS + warp) * ROWS_PER_STEP + octet;
        if (k0 + c < cols && n < n_rows) {
            float v[CHUNK];
            tile_load_column(tile, sub, c, v);
            store_e4m3(wtq + static_cast<uint64_t>(k0 + c) * n_rows + n, v, d, n_rows - n,
                       n_rows % CHUNK == 0);
        }
    }
}

}  // namespace fp8train
