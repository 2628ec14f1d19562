// Fused dual cast, input staged in shared memory by cp.async: same outputs, bit for bit, as
// sm90_fp8_cast.cuh (fp8train.quant.reference.dual_cast_ref), same parameters.
//
// Why a second design: the register version holds a thread's four 16-element chunks in
// registers while they load (73 registers) and transposes through a 64 KB float tile, so an
// SM runs 3 blocks and has no loads in flight while its blocks transpose (77% of a copy's
// bandwidth on the H100). Here the tile lands in shared memory in the input's own dtype
// (32 KB for bf16/fp16) through asynchronous 16-byte copies that hold no registers, so more
// blocks fit per SM and their loads overlap the other blocks' arithmetic.
//
// Persistent blocks walk the 128 x 128 tiles; for each tile three phases:
//   load     every thread issues cp.async for 8 (2-byte types) or 16 (fp32) 16-byte units;
//            rows past the end, gathered zero rows and columns past K are zero-filled;
//   row      an octet owns a row's 128-group (16 elements per lane, read from shared memory)
//            and writes q and its scale, as the register version does;
//   column   an octet owns a column's 128 tokens (16 consecutive rows per lane) and writes
//            16 contiguous bytes of qt's row and the column's scale.
// With two stages the next tile's copies are in flight while this one is cast.
// Rows whose length is not a multiple of 16 or with an unaligned base (vec_in false) are
// staged with element-wise loads instead (correct, slower).
#pragma once

#include "fp8train/cast_common.cuh"

namespace fp8train {

constexpr uint32_t DUAL_ASYNC_THREADS = 256;

namespace cast {

// The staged tile: 128 rows of 128 elements of T in 16-byte units, unit u of row r stored
// at unit u ^ ((u >> 3) & (UNITS / 8 - 1)) ^ ((r >> 4) & 7) of that row. The XOR stays
// inside u's aligned group of 8 units (128 bytes, all 32 banks):
//   load    8 lanes write 8 consecutive units of one row: a permutation of one 8-group;
//   row     lane l of an octet reads units l * UPC + i (UPC units per 16-element chunk): the
//           (u >> 3) term spreads the 8 lanes over distinct bank groups for every i;
//   column  lanes read rows 16a + j (a = 0..7) of one column: (r >> 4) & 7 = a spreads them.
template <typename T>
struct StagedTile {
    static constexpr uint32_t UNITS = GROUP * sizeof(T) / 16;  // per row: 16 or 32
    static constexpr uint32_t PER_UNIT = 16 / sizeof(T);       // elements per unit: 8 or 4
    static constexpr uint32_t BYTES = GROUP * UNITS * 16;      // 32 KB or 64 KB
    static_assert(UNITS % 8 == 0, "the swizzle permutes aligned groups of 8 units");

    __device__ static __forceinline__ uint32_t unit_offset(uint32_t r, uint32_t u) {
        return (r * UNITS + (u ^ ((u >> 3) & (UNITS / 8 - 1)) ^ ((r >> 4) & 7))) * 16;
    }
    __device__ static __forceinline__ uint32_t element_offset(uint32_t r, uint32_t c) {
        return unit_offset(r, c / PER_UNIT) + (c % PER_UNIT) * sizeof(T);
    }
};

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
    // src_bytes 0 writes 16 zero bytes and reads nothing.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

template <typename T> __device__ __forceinline__ float raw_to_float(uint32_t bits);
template <> __device__ __forceinline__ float raw_to_float<float>(uint32_t bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float raw_to_float<__nv_bfloat16>(uint32_t bits) {
    return __uint_as_float(bits << 16);
}
template <> __device__ __forceinline__ float raw_to_float<__half>(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

template <typename T>
__device__ __forceinline__ uint32_t load_shared_element(const uint8_t* tile, uint32_t offset) {
    if constexpr (sizeof(T) == 4) return *reinterpret_cast<const uint32_t*>(tile + offset);
    else return *reinterpret_cast<const uint16_t*>(tile + offset);
}

}  // namespace cast

// The tile at (tb, kb) of x into `tile` (asynchronously where vec_in: commit and wait
// before reading it). Rows past the end, gathered zero rows and columns past K are zeros.
template <typename T>
__device__ __forceinline__ void stage_tile(uint8_t* tile, const T* __restrict__ x, const int64_t* __restrict__ src_rows,
                                           uint32_t src_count, uint32_t rows, uint32_t cols, bool vec_in,
                                           uint32_t t0, uint32_t k0) {
    using namespace cast;
    using Tile = StagedTile<T>;
    constexpr uint32_t UNITS_PER_THREAD = GROUP * Tile::UNITS / DUAL_ASYNC_THREADS;
    static_assert(DUAL_ASYNC_THREADS % Tile::UNITS == 0, "a thread's units share one column");
    // Thread i stages unit i % UNITS of rows i / UNITS + j * (THREADS / UNITS).
    const uint32_t u = threadIdx.x % Tile::UNITS;
    const uint32_t k_unit = k0 + u * Tile::PER_UNIT;
#pragma unroll
    for (uint32_t j = 0; j < UNITS_PER_THREAD; ++j) {
        const uint32_t r = threadIdx.x / Tile::UNITS + j * (DUAL_ASYNC_THREADS / Tile::UNITS), t = t0 + r;
        const T* row = nullptr;
        if (t < rows) {
            const uint64_t src = src_rows != nullptr ? static_cast<uint64_t>(src_rows[t]) : t;
            if (src < src_count) row = x + src * cols;
        }
        if (vec_in) {  // cols % 16 == 0: a unit lies wholly inside or past the row
            const bool inside = row != nullptr && k_unit < cols;
            cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + Tile::unit_offset(r, u),
                        inside ? row + k_unit : x, inside ? 16 : 0);
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
            constexpr uint32_t PER_WORD = 4 / sizeof(T);
            using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
            const Bits* bits = reinterpret_cast<const Bits*>(row);
#pragma unroll
            for (uint32_t e = 0; e < Tile::PER_UNIT; ++e) {
                const uint32_t kk = k_unit + e;
                if (row != nullptr && kk < cols)
                    w[e / PER_WORD] |= static_cast<uint32_t>(bits[kk]) << (16 * (e % PER_WORD));
            }
            *reinterpret_cast<uint4*>(tile + Tile::unit_offset(r, u)) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

// Both passes over one staged tile (see the top of the file).
template <typename T, bool POW2, bool KMAJOR>
__device__ __forceinline__ void cast_staged_tile(const uint8_t* tile, uint32_t rows, uint32_t cols,
                                                 uint32_t t0, uint32_t k0, uint32_t kb, uint32_t tb,
                                                 uint32_t col_blocks, uint32_t row_blocks,
                                                 uint8_t* __restrict__ q, float* __restrict__ scale,
                                                 uint32_t scale_ld, uint8_t* __restrict__ qt, uint32_t qt_cols,
                                                 float* __restrict__ scale_t, bool rowwise, bool colwise) {
    using namespace cast;
    using Tile = StagedTile<T>;
    constexpr uint32_t WARPS = DUAL_ASYNC_THREADS / 32;
    constexpr uint32_t ROWS_PER_STEP = 32 / LANES_PER_GROUP;           // 4 rows per warp step
    constexpr uint32_t STEPS = GROUP / (WARPS * ROWS_PER_STEP);        // 4 steps per tile
    constexpr uint32_t UNITS_PER_CHUNK = CHUNK / Tile::PER_UNIT;       // 2 or 4
    static_assert(STEPS * WARPS * ROWS_PER_STEP == GROUP, "the warps must cover the tile");
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t octet = lane / LANES_PER_GROUP, sub = lane % LANES_PER_GROUP;

    if (rowwise) {
        const bool vec_out = cols % CHUNK == 0;  // q rows (and so their chunks) 16-byte aligned
#pragma unroll
        for (uint32_t s = 0; s < STEPS; ++s) {
            const uint32_t r = (s * WARPS + warp) * ROWS_PER_STEP + octet, t = t0 + r;
            const uint32_t k = k0 + CHUNK * sub;
            Chunk<T> chunk;
#pragma unroll
            for (uint32_t i = 0; i < UNITS_PER_CHUNK; ++i) {
                const uint4 v4 = *reinterpret_cast<const uint4*>(tile + Tile::unit_offset(r, sub * UNITS_PER_CHUNK + i));
                chunk.w[4 * i] = v4.x, chunk.w[4 * i + 1] = v4.y, chunk.w[4 * i + 2] = v4.z, chunk.w[4 * i + 3] = v4.w;
            }
            float v[CHUNK];
#pragma unroll
            for (uint32_t j = 0; j < CHUNK; ++j) v[j] = element(chunk, j);
            const float s_row = scale_from_amax(octet_amax(chunk_amax(v)), POW2);
            if (t < rows) {
                if (k < cols)
                    store_e4m3(q + static_cast<uint64_t>(t) * cols + k, v, Quantizer(s_row, POW2), cols - k, vec_out);
                if (sub == 0)
                    scale[KMAJOR ? static_cast<uint64_t>(kb) * scale_ld + t
                                 : static_cast<uint64_t>(t) * col_blocks + kb] = s_row;
            }
        }
    }
    if (!colwise) return;

    const bool vec_t = qt_cols % CHUNK == 0;
#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t c = (s * WARPS + warp) * ROWS_PER_STEP + octet, k = k0 + c;
        float v[CHUNK];
#pragma unroll
        for (uint32_t j = 0; j < CHUNK; ++j)
            v[j] = raw_to_float<T>(load_shared_element<T>(tile, Tile::element_offset(CHUNK * sub + j, c)));
        const float s_col = scale_from_amax(octet_amax(chunk_amax(v)), POW2);
        const uint32_t t = t0 + CHUNK * sub;
        if (k < cols) {
            if (t < qt_cols)
                store_e4m3(qt + static_cast<uint64_t>(k) * qt_cols + t, v, Quantizer(s_col, POW2), qt_cols - t, vec_t);
            if (sub == 0) scale_t[static_cast<uint64_t>(k) * row_blocks + tb] = s_col;
        }
    }
}

// Persistent: block b casts tiles b, b + gridDim.x, ... (row-major over the
// row_blocks x col_blocks tile grid), with STAGES staged tiles: while one is cast, the next
// one's copies are in flight. STAGES = 2 for 2-byte types (2 x 32 KB, 3 blocks per SM),
// 1 for fp32 (64 KB).
template <typename T, bool POW2, bool KMAJOR, uint32_t STAGES>
__device__ __forceinline__ void dual_cast_tiles_async(const T* __restrict__ x, const int64_t* __restrict__ src_rows,
                                                      uint32_t src_count, uint32_t rows, uint32_t cols,
                                                      bool vec_in, uint8_t* __restrict__ q,
                                                      float* __restrict__ scale, uint32_t scale_ld,
                                                      uint8_t* __restrict__ qt, uint32_t qt_cols,
                                                      float* __restrict__ scale_t, bool rowwise, bool colwise) {
    using namespace cast;
    static_assert(STAGES == 1 || STAGES == 2, "one or two staged tiles");
    extern __shared__ __align__(128) uint8_t smem[];                   // STAGES tiles, swizzled
    const uint32_t col_blocks = (cols + GROUP - 1) / GROUP, row_blocks = (rows + GROUP - 1) / GROUP;
    const uint32_t tiles = col_blocks * row_blocks;
    auto stage = [&](uint32_t tile_index, uint32_t slot) {
        stage_tile<T>(smem + slot * StagedTile<T>::BYTES, x, src_rows, src_count, rows, cols, vec_in,
                      tile_index / col_blocks * GROUP, tile_index % col_blocks * GROUP);
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    uint32_t slot = 0;
    if (blockIdx.x < tiles) stage(blockIdx.x, 0);
    for (uint32_t tile_index = blockIdx.x; tile_index < tiles; tile_index += gridDim.x) {
        const uint32_t next = tile_index + gridDim.x;
        if (STAGES == 2 && next < tiles) {
            // The other slot was last read in the previous iteration, which ended in a barrier.
            stage(next, slot ^ 1);
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        const uint32_t tb = tile_index / col_blocks, kb = tile_index % col_blocks;
        cast_staged_tile<T, POW2, KMAJOR>(smem + slot * StagedTile<T>::BYTES, rows, cols, tb * GROUP, kb * GROUP,
                                          kb, tb, col_blocks, row_blocks, q, scale, scale_ld, qt, qt_cols,
                                          scale_t, rowwise, colwise);
        __syncthreads();  // the slot is free for the copies of tile_index + STAGES * gridDim.x
        if (STAGES == 1 && next < tiles) stage(next, 0);
        if (STAGES == 2) slot ^= 1;
    }
}

}  // namespace fp8train
