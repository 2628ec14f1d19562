// Fused dual cast of an activation or output gradient x [T, K], bit-identical to
// fp8train.quant.reference.dual_cast_ref (the scale rule is in cast_common.cuh): one read of
// x, two outputs, the row-wise 1x128 cast along K (q, scale) and the column-wise 1x128 cast of
// x.T along T (qt [K, qt_cols], scale_t K-block-major with block stride scale_t_ld), qt_cols
// being T or T rounded up to 128 (the wgrad operand; padding rows are zeros, which change no
// amax). With src_rows, output row t reads input row src_rows[t] (>= src_count: a zero row):
// the MoE permutation fused in.
//
// The input tile is staged in shared memory in its own dtype (32 KB for bf16/fp16) by
// asynchronous 16-byte copies that hold no registers, so 6 blocks fit per SM and their loads
// overlap the other blocks' arithmetic. (A variant holding the chunks in registers and
// transposing through a 64 KB float tile ran 3 blocks per SM at 75-78% of a copy's bandwidth
// on the H100, against 80-84% here; it was removed.)
//
// One 128 x 128 tile per block, three phases:
//   load     every thread issues cp.async for 8 (2-byte types) or 16 (fp32) 16-byte units;
//            rows past the end, gathered zero rows and columns past K are zero-filled;
//   row      an octet owns a row's 128-group (16 elements per lane, read from shared memory)
//            and writes q and its scale, as the register version does;
//   column   an octet owns a column's 128 tokens (16 consecutive rows per lane) and writes
//            16 contiguous bytes of qt's row and the column's scale.
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

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}

template <typename T>
__device__ __forceinline__ uint32_t load_shared_element(const uint8_t* tile, uint32_t offset) {
    if constexpr (sizeof(T) == 4) return *reinterpret_cast<const uint32_t*>(tile + offset);
    else return *reinterpret_cast<const uint16_t*>(tile + offset);
}

}  // namespace cast

// Where a dual cast writes: the row-wise cast (q [rows, cols], scale K-block-major with block
// stride scale_ld) and the column-wise one (qt [cols, qt_cols], scale_t with block stride
// scale_t_ld), each only when asked for.
struct DualCastOut {
    uint8_t* q;
    float* scale;
    uint32_t scale_ld;
    uint8_t* qt;
    uint32_t qt_cols;
    float* scale_t;
    uint32_t scale_t_ld;
    bool rowwise, colwise;
};

// The row and column passes over a staged 128 x 128 tile (rows t0.., columns k0..): an octet
// owns a row's 128-group or a column's 128 tokens (16 elements per lane, read from shared
// memory) and writes q and its scale, or 16 contiguous bytes of qt's row and the column's
// scale. Called by all THREADS threads of the block after the tile is complete (a
// __syncthreads behind the staging).
template <typename T, bool POW2, uint32_t THREADS = DUAL_ASYNC_THREADS>
__device__ __forceinline__ void cast_staged_tile(const uint8_t* __restrict__ tile, uint32_t t0, uint32_t k0,
                                                 uint32_t rows, uint32_t cols, const DualCastOut& out) {
    using namespace cast;
    using Tile = StagedTile<T>;
    constexpr uint32_t WARPS = THREADS / 32;
    constexpr uint32_t ROWS_PER_STEP = 32 / LANES_PER_GROUP;           // 4 rows per warp step
    constexpr uint32_t STEPS = GROUP / (WARPS * ROWS_PER_STEP);        // 4 steps per tile at 256 threads
    constexpr uint32_t UNITS_PER_CHUNK = CHUNK / Tile::PER_UNIT;       // 2 or 4
    static_assert(STEPS * WARPS * ROWS_PER_STEP == GROUP, "the warps must cover the tile");
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t octet = lane / LANES_PER_GROUP, sub = lane % LANES_PER_GROUP;
    if (out.rowwise) {
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
            write_row_group<POW2>(v, t, k, sub, rows, cols, blockIdx.x, out.q, out.scale, out.scale_ld);
        }
    }
    if (!out.colwise) return;

#pragma unroll
    for (uint32_t s = 0; s < STEPS; ++s) {
        const uint32_t c = (s * WARPS + warp) * ROWS_PER_STEP + octet;
        float v[CHUNK];
#pragma unroll
        for (uint32_t j = 0; j < CHUNK; ++j)
            v[j] = raw_to_float<T>(load_shared_element<T>(tile, Tile::element_offset(CHUNK * sub + j, c)));
        write_column_group<POW2>(v, k0 + c, t0, sub, cols, blockIdx.y, out.qt, out.qt_cols, out.scale_t,
                                 out.scale_t_ld);
    }
}

template <typename T, bool POW2>
__device__ __forceinline__ void dual_cast_tile_async(const T* __restrict__ x, const int64_t* __restrict__ src_rows,
                                                     uint32_t src_count, uint32_t rows, uint32_t cols,
                                                     bool vec_in, const DualCastOut& out) {
    using namespace cast;
    using Tile = StagedTile<T>;
    constexpr uint32_t UNITS_PER_THREAD = GROUP * Tile::UNITS / DUAL_ASYNC_THREADS;
    static_assert(DUAL_ASYNC_THREADS % Tile::UNITS == 0, "a thread's units share one column");
    extern __shared__ __align__(128) uint8_t tile[];                    // Tile::BYTES, swizzled
    const uint32_t t0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;

    // Load: thread i stages unit i % UNITS of rows i / UNITS + j * (THREADS / UNITS).
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
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + Tile::unit_offset(r, u);
        if (vec_in) {  // cols % 16 == 0: a unit lies wholly inside or past the row
            const bool inside = row != nullptr && k_unit < cols;
            cp_async_16(dst, inside ? row + k_unit : x, inside ? 16 : 0);
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
            constexpr uint32_t PER_WORD = 4 / sizeof(T);
            using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
            const Bits* bits = reinterpret_cast<const Bits*>(row);
#pragma unroll
            for (uint32_t e = 0; e < Tile::PER_UNIT; ++e) {
                const uint32_t kk = k_unit + e;
                if (row != nullptr && kk < cols) w[e / PER_WORD] |= static_cast<uint32_t>(bits[kk]) << (16 * (e % PER_WORD));
            }
            *reinterpret_cast<uint4*>(tile + Tile::unit_offset(r, u)) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
    cp_async_wait_all();
    __syncthreads();
    cast_staged_tile<T, POW2>(tile, t0, k0, rows, cols, out);
}

}  // namespace fp8train
