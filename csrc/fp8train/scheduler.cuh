// Persistent tile scheduler: CTAs walk tiles blockIdx.x, +gridDim.x, ... in an order that
// keeps the tiles running at the same time close together in L2, and, for the grouped
// (MoE) GEMMs, resolve which expert each tile belongs to from device-side counts, so the
// host never syncs.
#pragma once

#include <cstdint>

namespace fp8train {

// How the GEMM's operands are grouped (MoE). The numbers are part of the rendered source.
enum class Grouping : uint32_t {
    kNone = 0,         // dense D = A B^T
    kMContiguous = 1,  // A rows sorted by expert, segments multiples of BLOCK_M; B [G, N, K]
    kMMasked = 2,      // A [G, M_max, K], valid rows per expert in masked_m[G]; B [G, N, K]
    kKContiguous = 3,  // wgrad: A [M, T], B [N, T], expert g's K is tokens [off[g], off[g+1])
};

// Tiles are grouped by GROUP_N column blocks; inside a group, N varies fastest, then M.
// The ~132 tiles in flight then touch ~GROUP_N tiles of B and ~132/GROUP_N of A.
// With a cluster of CLUSTER CTAs, the scheduler hands out cluster tiles: CTA `rank` of the
// cluster takes column block n * CLUSTER + rank of the same row block (they share A), or with
// SHARE_B row block m * CLUSTER + rank of the same column block (they share B). A block past
// the end (odd count) still runs, on zero-filled operands, and stores nothing.
template <uint32_t BLOCK_N, uint32_t SHAPE_N, uint32_t GROUP_N, uint32_t CLUSTER = 1, bool SHARE_B = false>
struct Rasterizer {
    static constexpr uint32_t kNumNBlocks = (SHAPE_N + BLOCK_N - 1) / BLOCK_N;
    // Column units the walk counts: cluster tiles of CLUSTER column blocks, or single ones.
    static constexpr uint32_t kNumNClusterBlocks = SHARE_B ? kNumNBlocks : (kNumNBlocks + CLUSTER - 1) / CLUSTER;
    static_assert(GROUP_N >= 1, "GROUP_N must be positive");

    // Tile `tile` (< num_m_units * kNumNClusterBlocks) of a grid of num_m_units row units
    // (row blocks, or with SHARE_B cluster tiles of CLUSTER row blocks).
    __device__ __forceinline__ static void coords(uint32_t tile, uint32_t num_m_units, uint32_t rank,
                                                  uint32_t& m_block, uint32_t& n_block) {
        const uint32_t group_span = GROUP_N * num_m_units;
        const uint32_t group = tile / group_span;
        const uint32_t first_n = group * GROUP_N;
        const uint32_t n_in_group = min(GROUP_N, kNumNClusterBlocks - first_n);
        const uint32_t in_group = tile - group * group_span;
        if constexpr (SHARE_B) {
            m_block = in_group / n_in_group * CLUSTER + rank;
            n_block = first_n + in_group % n_in_group;
        } else {
            m_block = in_group / n_in_group;
            n_block = (first_n + in_group % n_in_group) * CLUSTER + rank;
        }
    }
};

// The expert g whose rows [offsets[g], offsets[g+1]) hold row m (m-grouped contiguous
// layout; segments are multiples of BLOCK_M, so a tile never spans two experts). Empty
// experts have offsets[g] == offsets[g+1] and are skipped by the search.
__device__ __forceinline__ uint32_t group_of_row(const int32_t* __restrict__ offsets, uint32_t num_groups,
                                                 uint32_t m) {
    uint32_t lo = 0, hi = num_groups;  // invariant: offsets[lo] <= m < offsets[hi]
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (static_cast<uint32_t>(__ldg(offsets + mid)) <= m) lo = mid;
        else hi = mid;
    }
    return lo;
}

struct Tile {
    uint32_t group;    // expert (0 when dense)
    uint32_t m_block;  // row block inside the expert's rows (masked) or of the whole A
    uint32_t n_block;
    uint32_t output;   // split-K: the output tile this slice of K adds into
    uint32_t split;    // split-K: which slice of K
    uint32_t rows;     // valid rows of this tile's expert: M, M_max-clipped masked_m[g], or rows of A
};

// One CTA's walk over its tiles. Producer and math warpgroups each own a walker and call
// next() in lockstep, so both see the same tiles without talking. `counts` is
// group_offsets (m-contiguous, k-contiguous) or masked_m (m-masked). With SPLIT_K > 1 (dense
// only) every output tile is SPLIT_K consecutive work tiles, one per slice of K, so the
// slices of one output run at the same time and their partial sums meet in L2.
template <Grouping GROUPING, uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t SHAPE_N, uint32_t GROUP_N,
          uint32_t CLUSTER, uint32_t SPLIT_K = 1, bool SHARE_B = false>
struct TileWalker {
    using Raster = Rasterizer<BLOCK_N, SHAPE_N, GROUP_N, CLUSTER, SHARE_B>;
    static constexpr uint32_t kN = Raster::kNumNClusterBlocks;
    static_assert(GROUPING == Grouping::kNone || CLUSTER == 1, "grouped GEMMs run without clusters");
    static_assert(!SHARE_B || CLUSTER > 1, "sharing B takes a cluster");
    static_assert(SPLIT_K == 1 || (GROUPING == Grouping::kNone && CLUSTER == 1),
                  "split-K is for dense GEMMs without clusters");

    const int32_t* counts;
    uint32_t num_groups, shape_m, rank;
    uint32_t tile, stride;
    // m-masked: the expert the cursor is in, its first tile and its row blocks.
    uint32_t group = 0, group_first = 0, group_m_blocks = 0;

    __device__ __forceinline__ TileWalker(const int32_t* counts_, uint32_t num_groups_, uint32_t shape_m_,
                                          uint32_t rank_, uint32_t first_tile, uint32_t tile_stride)
        : counts(counts_), num_groups(num_groups_), shape_m(shape_m_), rank(rank_), tile(first_tile),
          stride(tile_stride) {
        if constexpr (GROUPING == Grouping::kMMasked) group_m_blocks = masked_blocks(0);
    }

    __device__ __forceinline__ uint32_t m_blocks() const { return (shape_m + BLOCK_M - 1) / BLOCK_M; }
    // Row units of the dense walk: row blocks, or with SHARE_B cluster tiles of row blocks.
    __device__ __forceinline__ uint32_t m_units() const {
        return SHARE_B ? (m_blocks() + CLUSTER - 1) / CLUSTER : m_blocks();
    }

    // Row blocks of masked expert g (its count clipped to [0, M_max]: a bad count never
    // makes the kernel write outside the expert's rows).
    __device__ __forceinline__ uint32_t masked_blocks(uint32_t g) const {
        if (g >= num_groups) return 0;
        const int32_t rows = __ldg(counts + g);
        return (min(static_cast<uint32_t>(max(rows, 0)), shape_m) + BLOCK_M - 1) / BLOCK_M;
    }

    __device__ __forceinline__ bool next(Tile& t) {
        if constexpr (GROUPING == Grouping::kMMasked) {
            // Tiles are numbered expert by expert; a CTA's tiles only increase, so the
            // cursor moves forward and the walk costs O(G + tiles) per CTA.
            while (group < num_groups && tile >= group_first + group_m_blocks * kN) {
                group_first += group_m_blocks * kN;
                group_m_blocks = masked_blocks(++group);
            }
            if (group >= num_groups) return false;
            t.group = group;
            t.rows = min(static_cast<uint32_t>(max(__ldg(counts + group), 0)), shape_m);
            Raster::coords(tile - group_first, group_m_blocks, rank, t.m_block, t.n_block);
        } else if constexpr (GROUPING == Grouping::kKContiguous) {
            const uint32_t per_group = m_blocks() * kN;
            if (tile >= num_groups * per_group) return false;
            t.group = tile / per_group;
            t.rows = shape_m;
            Raster::coords(tile - t.group * per_group, m_blocks(), rank, t.m_block, t.n_block);
        } else {
            if (tile >= m_units() * kN * SPLIT_K) return false;
            t.rows = shape_m;
            t.output = tile / SPLIT_K;
            t.split = tile - t.output * SPLIT_K;
            Raster::coords(t.output, m_units(), rank, t.m_block, t.n_block);
            t.group = 0;
            if constexpr (GROUPING == Grouping::kMContiguous) {
                // Rows past the last offset belong to no expert (a static-size buffer's
                // spare rows): group == num_groups, a tile with no K blocks.
                const uint32_t m0 = t.m_block * BLOCK_M;
                t.group = m0 >= static_cast<uint32_t>(__ldg(counts + num_groups))
                              ? num_groups : group_of_row(counts, num_groups, m0);
            }
        }
        tile += stride;
        return true;
    }
};

}  // namespace fp8train
