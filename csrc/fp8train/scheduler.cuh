// Persistent tile scheduler: CTAs walk tiles blockIdx.x, +gridDim.x, ... in an order that
// keeps the tiles running at the same time close together in L2.
#pragma once

#include <cstdint>

namespace fp8train {

// Tiles are grouped by GROUP_N column blocks; inside a group, N varies fastest, then M.
// The ~132 tiles in flight then touch ~GROUP_N tiles of B and ~132/GROUP_N of A.
// With a cluster of CLUSTER CTAs, the scheduler hands out cluster tiles: CTA `rank` of the
// cluster takes column block n * CLUSTER + rank of the same row block (they share A). A
// column block past the end (odd count) still runs, on zero-filled B, and stores nothing.
template <uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t SHAPE_N, uint32_t GROUP_N, uint32_t CLUSTER = 1>
struct TileScheduler {
    static constexpr uint32_t kNumNBlocks = (SHAPE_N + BLOCK_N - 1) / BLOCK_N;
    static constexpr uint32_t kNumNClusterBlocks = (kNumNBlocks + CLUSTER - 1) / CLUSTER;
    static_assert(GROUP_N >= 1, "GROUP_N must be positive");

    uint32_t num_m_blocks;
    uint32_t num_tiles;  // cluster tiles

    __device__ __forceinline__ explicit TileScheduler(uint32_t shape_m)
        : num_m_blocks((shape_m + BLOCK_M - 1) / BLOCK_M), num_tiles(num_m_blocks * kNumNClusterBlocks) {}

    __device__ __forceinline__ void tile_coords(uint32_t tile, uint32_t rank, uint32_t& m_block,
                                                uint32_t& n_block) const {
        const uint32_t group_span = GROUP_N * num_m_blocks;
        const uint32_t group = tile / group_span;
        const uint32_t first_n = group * GROUP_N;
        const uint32_t n_in_group = min(GROUP_N, kNumNClusterBlocks - first_n);
        const uint32_t in_group = tile - group * group_span;
        m_block = in_group / n_in_group;
        n_block = (first_n + in_group % n_in_group) * CLUSTER + rank;
    }
};

}  // namespace fp8train
