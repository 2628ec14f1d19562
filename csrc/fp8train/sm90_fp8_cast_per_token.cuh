// Per-token (1x128 along K) cast of x [R, K] (any leading dims flattened into R), bit-identical
// to fp8train.quant.reference.per_token_cast_ref: q [R, K], scale [R, ceil(K/128)].
//
// No shared memory: a 128-group is 8 lanes x 16 elements, each lane one chunk (16-byte loads
// in, one 16-byte e4m3 store out), the amax a 3-step shuffle. One chunk per thread keeps
// 2048 threads x 32 bytes (bf16) in flight per SM, well above what hides DRAM latency.
//
// Gather (MoE permutation fused in): with src_rows != nullptr, output row r reads input row
// src_rows[r]; src_rows[r] >= src_count is a zero row (MoELayout.src_tokens' padding).
#pragma once

#include "fp8train/cast_common.cuh"

namespace fp8train {

constexpr uint32_t PER_TOKEN_CAST_THREADS = 256;

// Scale (r, block) lives at block * scale_ld + r (K-block-major, the GEMMs' layout for A's
// scales; a single row passes scale_ld = 1, which is also row-major).
template <typename T, bool POW2>
__device__ __forceinline__ void per_token_cast_chunk(const T* __restrict__ x, const int64_t* __restrict__ src_rows,
                                                     uint32_t src_count, uint32_t rows, uint32_t cols,
                                                     bool vec_in, uint8_t* __restrict__ q,
                                                     float* __restrict__ scale, uint32_t scale_ld) {
    using namespace cast;
    const uint32_t col_blocks = (cols + GROUP - 1) / GROUP;
    const uint32_t chunks_per_row = col_blocks * LANES_PER_GROUP;
    // A whole block shares its row range check; the chunk index fits 32 bits (host checks).
    const uint32_t chunk = blockIdx.x * PER_TOKEN_CAST_THREADS + threadIdx.x;
    const uint32_t r = chunk / chunks_per_row, in_row = chunk % chunks_per_row;
    const uint32_t k = CHUNK * in_row;
    // Octets never straddle rows (chunks_per_row is a multiple of 8), so a row past the end
    // leaves a whole octet idle; it still joins the shuffle with zeros.
    const T* row = nullptr;
    if (r < rows) {
        const uint64_t src = src_rows != nullptr ? static_cast<uint64_t>(src_rows[r]) : r;
        if (src < src_count) row = x + src * cols;
    }
    const Chunk<T> c = load_chunk(row, k, cols, vec_in);
    float v[CHUNK];
#pragma unroll
    for (uint32_t j = 0; j < CHUNK; ++j) v[j] = element(c, j);
    const float s = scale_from_amax(octet_amax(chunk_amax(v)), POW2);
    if (r >= rows) return;
    if (k < cols)
        store_e4m3(q + static_cast<uint64_t>(r) * cols + k, v, Quantizer(s, POW2), cols - k, cols % CHUNK == 0);
    if (in_row % LANES_PER_GROUP == 0) {
        const uint64_t block = in_row / LANES_PER_GROUP;
        scale[block * scale_ld + r] = s;
    }
}

}  // namespace fp8train
