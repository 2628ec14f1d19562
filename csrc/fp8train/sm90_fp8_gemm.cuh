// Dense FP8 GEMM D = A * B^T for sm_90a with DeepSeek-V3 fine-grained scaling.
//
// A [M, K] e4m3 with 1x128 scales; B [N, K] e4m3 with either 128x128 scales
// ([ceil(N/128), K/128] row-major, "1D2D": fprop/dgrad, BF16 out) or 1x128 scales ("1D1D":
// wgrad, FP32 out, optionally accumulated into D). A's 1x128 scales are read K-block-major
// ([K/128, rows] with rows contiguous, the row count padded to 4: one contiguous box of
// BLOCK_M floats per stage); B's 1x128 scales (1D1D) row-major: [rows, K/128] with a row
// stride that is a multiple of 4 floats, one TMA box of 4 K blocks x BLOCK_N rows per stage
// (TMA moves at least 16 bytes a row), the math threads picking their K block's column out
// of it. Reading A's K-block-major was 10% (4096x4096x7168) to 36% (4096x7168x2048) faster
// on the H100 than row-major; B's measured 3-7% slower and stays row-major.
//
// Persistent and warp-specialised: one thread of the last warpgroup issues TMA for A, B and
// their 1x128 scales into a ring of stages; one (BLOCK_M = 64) or two math warpgroups
// consume. Each K block's wgmma partial sum (FP32, reset per block) is promoted on CUDA
// cores: scaled by scale_a * scale_b and added into a second FP32 accumulator, after the
// stage has been released so the producer refills it meanwhile (a 1D1D 256-row tile reads
// B's scales from the stage as it promotes, and releases it after). A 256-row tile is walked by
// the two warpgroups in two waves of 128 rows: one promoted accumulator per wave, one
// partial shared by both, so a K block of 48 KB feeds twice the MMAs of a 128-row tile's
// 32 KB. 1D2D tiles leave through shared memory and a TMA store that overlaps the next
// tile's main loop.
#pragma once

#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>

#include "fp8train/ptx.cuh"
#include "fp8train/scheduler.cuh"

namespace fp8train {

// OUT_F32: a 1D2D kernel writing FP32 (an FP32 model without autocast), stored from registers
// like 1D1D.
template <uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t NUM_STAGES, uint32_t SHAPE_N,
          uint32_t SHAPE_K, bool SCALE_B_1X128, bool ACCUMULATE, uint32_t GROUP_N, uint32_t CLUSTER,
          bool OUT_F32>
struct Sm90Fp8Gemm {
    static constexpr uint32_t BLOCK_K = 128;
    static constexpr uint32_t kNumKBlocks = SHAPE_K / BLOCK_K;
    static constexpr uint32_t kNumMathGroups = BLOCK_M == 64 ? 1 : 2;
    static constexpr uint32_t kWaveRows = kNumMathGroups * 64;  // rows the warpgroups cover at once
    static constexpr uint32_t kNumWaves = BLOCK_M / kWaveRows;
    static constexpr uint32_t kNumMathThreads = kNumMathGroups * 128;
    static constexpr uint32_t kNumThreads = kNumMathThreads + 128;
    static constexpr uint32_t kNumNScaleBlocks = (SHAPE_N + 127) / 128;
    static constexpr uint32_t kTileABytes = BLOCK_M * BLOCK_K;
    static constexpr uint32_t kTileBBytes = BLOCK_N * BLOCK_K;
    static constexpr uint32_t kScaleCols = 4;  // K blocks per scale box (16 bytes a row)
    static constexpr uint32_t kScaleABytes = BLOCK_M * 4;
    static constexpr uint32_t kScaleBBytes = SCALE_B_1X128 ? BLOCK_N * kScaleCols * 4 : 0;
    // What one stage's TMA copies deliver (the barrier's transaction count).
    static constexpr uint32_t kStageBytes = kTileABytes + kTileBBytes + kScaleABytes + kScaleBBytes;
    // TMA writes shared memory at 128-byte aligned addresses: scale slots are padded to that.
    static constexpr uint32_t kScaleASlot = (kScaleABytes + 127) / 128 * 128;
    static constexpr uint32_t kScaleBSlot = (kScaleBBytes + 127) / 128 * 128;
    // FP32 output leaves from registers; BF16 through a shared tile and a TMA store.
    static constexpr bool kOutF32 = SCALE_B_1X128 || OUT_F32;
    static constexpr uint32_t kOutTileBytes = kOutF32 ? 0 : BLOCK_M * BLOCK_N * 2;
    // The BF16 output tile in 64-column parts with the TMA 128-byte swizzle (bank-conflict
    // free writes) where BLOCK_N allows; the host's output descriptor must agree.
    static constexpr bool kSwizzledOut = !kOutF32 && BLOCK_N % 64 == 0;
    static constexpr uint32_t kAccum = BLOCK_N / 2;  // FP32 accumulator registers per thread
    // With 128x128 B scales a tile spans at most two scale blocks: its start offset inside a
    // block is at most 128 - gcd(BLOCK_N, 128).
    static constexpr uint32_t kGcdN128 = (BLOCK_N & -BLOCK_N) < 128 ? (BLOCK_N & -BLOCK_N) : 128;
    static constexpr bool kMayStraddle = !SCALE_B_1X128 && (128 % BLOCK_N != 0);

    static_assert(SHAPE_K % BLOCK_K == 0, "K must be a multiple of 128");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 256, "BLOCK_M must be 64, 128 or 256");
    // Two waves hold two promoted accumulators beside the partial: 1.5 x BLOCK_N registers.
    static_assert(kNumWaves == 1 || BLOCK_N <= 128, "256-row tiles have BLOCK_N <= 128");
    static_assert(BLOCK_N % 8 == 0 && BLOCK_N >= 8 && BLOCK_N <= 256, "BLOCK_N: multiple of 8 in [8, 256]");
    static_assert(SCALE_B_1X128 || BLOCK_N <= 128 + kGcdN128,
                  "1D2D: a BLOCK_N tile must never span three 128x128 scale blocks");
    static_assert(SHAPE_N % 8 == 0, "N must be a multiple of 8");
    static_assert(CLUSTER == 1 || CLUSTER == 2, "clusters of 1 or 2 CTAs");
    // Each CTA of a cluster loads its share of the shared operand (A's BLOCK_M / CLUSTER
    // rows, or B's BLOCK_N / CLUSTER) and multicasts it to both.
    static constexpr uint32_t kRowsAPerCta = BLOCK_M / CLUSTER;
    static constexpr uint32_t kRowsBPerCta = BLOCK_N / CLUSTER;
    // setmaxnreg budgets. setmaxnreg.inc blocks until the registers are free, so the split
    // keeps the 1024 spare registers of the launch allocation (168 x 384) rather than using
    // all 64K: 40 x 128 + 232 x 256 = 64512. The multicast producer needs 56 (no spills).
    static constexpr uint32_t kProducerRegisters = CLUSTER > 1 ? 56 : 40;
    static constexpr uint32_t kMathRegisters = kNumMathGroups == 1 ? 248 : (CLUSTER > 1 ? 224 : 232);
    static_assert(kNumMathGroups == 1 || kProducerRegisters * 128 + kMathRegisters * 256 <= 64512,
                  "setmaxnreg budgets exceed the launch allocation");
    static_assert(kTileABytes % 1024 == 0 && kTileBBytes % 1024 == 0, "tiles must keep 1024-byte swizzle alignment");

    struct SharedStorage {
        // Offsets inside the dynamic shared memory, from a 1024-byte aligned base.
        static constexpr uint32_t kA = 0;
        static constexpr uint32_t kB = kA + NUM_STAGES * kTileABytes;
        static constexpr uint32_t kScaleA = kB + NUM_STAGES * kTileBBytes;
        static constexpr uint32_t kScaleB = kScaleA + NUM_STAGES * kScaleASlot;
        static constexpr uint32_t kOut = (kScaleB + NUM_STAGES * kScaleBSlot + 1023) / 1024 * 1024;
        static constexpr uint32_t kFull = kOut + kOutTileBytes;
        static constexpr uint32_t kEmpty = kFull + NUM_STAGES * 8;
        static constexpr uint32_t kBytes = kEmpty + NUM_STAGES * 8;
    };
    // The launcher allocates this much: the layout plus slack to align the base to 1024.
    static constexpr uint32_t kSharedBytes = SharedStorage::kBytes + 1024;
};

// The next slot of a ring of NUM_STAGES, flipping the barrier phase at each wrap.
template <uint32_t NUM_STAGES>
__device__ __forceinline__ void advance_stage(uint32_t& stage, uint32_t& phase) {
    if (++stage == NUM_STAGES) {
        stage = 0;
        phase ^= 1;
    }
}

// Hands a thread's accumulator pairs to `store(row * SHAPE_N + col, v0, v1)` straight from
// registers (the wgmma m64 layout: rows `row` and `row + 8`, column pairs `col + 8j`),
// skipping rows at or past `rows` and columns past N.
template <uint32_t kAccum, uint32_t SHAPE_N, typename Store>
__device__ __forceinline__ void store_from_registers(const float (&accum)[kAccum], uint32_t row,
                                                     uint32_t col, uint32_t rows, Store store) {
#pragma unroll
    for (uint32_t half = 0; half < 2; ++half) {
        if (row + half * 8 >= rows) continue;
#pragma unroll
        for (uint32_t j = 0; j < kAccum / 4; ++j) {
            if (col + j * 8 < SHAPE_N)
                store(static_cast<uint64_t>(row + half * 8) * SHAPE_N + col + j * 8,
                      accum[j * 4 + half * 2], accum[j * 4 + half * 2 + 1]);
        }
    }
}

// Split-K meeting point, called by every math thread of a CTA that computed one slice of an
// output tile: leaves the slice's FP32 partial in its slot of `partials` [SPLIT_K][tile],
// then counts arrivals on `counter`. The last slice to arrive gets true, with `accum` now
// the sum of all slices in slice order; the others get false and are done with the tile.
// Slots are laid out [register][thread] so each store and load is 16 coalesced bytes.
template <uint32_t kAccum, uint32_t kThreads, uint32_t SPLIT_K>
__device__ __forceinline__ bool reduce_split_k(float (&accum)[kAccum], float* __restrict__ partials,
                                               uint32_t split, int32_t* counter) {
    static_assert(kAccum % 4 == 0, "accumulators travel as float4");
    constexpr uint32_t kSlot = kAccum * kThreads;  // floats per slice
    float4* mine = reinterpret_cast<float4*>(partials + split * kSlot);
#pragma unroll
    for (uint32_t i = 0; i < kAccum / 4; ++i)
        __stcg(mine + i * kThreads + threadIdx.x,
               make_float4(accum[4 * i], accum[4 * i + 1], accum[4 * i + 2], accum[4 * i + 3]));
    // The barrier orders every thread's partial before thread 0's release-add (release is
    // cumulative); the last arrival's acquire-add, then the barrier, orders the other
    // slices' partials before every thread's loads.
    bool last = false;
    named_barrier_sync(1, kThreads);
    if (threadIdx.x == 0) {
        last = atomic_add_acq_rel_gpu(counter, 1) == static_cast<int32_t>(SPLIT_K - 1);
        if (last) *counter = 0;  // every slice has counted: ready for the next launch
    }
    if (!named_barrier_or(1, kThreads, last)) return false;
#pragma unroll
    for (uint32_t i = 0; i < kAccum / 4; ++i) {
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (uint32_t s = 0; s < SPLIT_K; ++s) {
            const float4 v = s == split ? make_float4(accum[4 * i], accum[4 * i + 1], accum[4 * i + 2], accum[4 * i + 3])
                                        : __ldcg(reinterpret_cast<const float4*>(partials + s * kSlot) +
                                                 i * kThreads + threadIdx.x);
            sum.x += v.x;
            sum.y += v.y;
            sum.z += v.z;
            sum.w += v.w;
        }
        accum[4 * i] = sum.x;
        accum[4 * i + 1] = sum.y;
        accum[4 * i + 2] = sum.z;
        accum[4 * i + 3] = sum.w;
    }
    return true;
}

template <uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t NUM_STAGES, uint32_t SHAPE_N,
          uint32_t SHAPE_K, bool SCALE_B_1X128, bool ACCUMULATE, uint32_t GROUP_N, uint32_t CLUSTER,
          Grouping GROUPING, uint32_t SPLIT_K, typename Wgmma, bool OUT_F32, bool SHARE_B>
__device__ __forceinline__ void sm90_fp8_gemm(uint32_t shape_m, const float* __restrict__ scale_b,
                                              float* __restrict__ out_f32,
                                              const CUtensorMap* tmap_a, const CUtensorMap* tmap_b,
                                              const CUtensorMap* tmap_scale_a,
                                              const CUtensorMap* tmap_scale_b,
                                              const CUtensorMap* tmap_out,
                                              const int32_t* __restrict__ group_counts,
                                              uint32_t num_groups, float* __restrict__ split_partials,
                                              int32_t* __restrict__ split_counters) {
    using G = Sm90Fp8Gemm<BLOCK_M, BLOCK_N, NUM_STAGES, SHAPE_N, SHAPE_K, SCALE_B_1X128, ACCUMULATE, GROUP_N, CLUSTER,
                          OUT_F32>;
    using S = typename G::SharedStorage;
    constexpr uint32_t kNumKBlocks = G::kNumKBlocks;
    static_assert(!ACCUMULATE || SCALE_B_1X128, "only the FP32 (1D1D) output accumulates");
    // SHARE_B: the two CTAs of a cluster take neighbouring row blocks of one column block and
    // multicast B between them (else neighbouring column blocks sharing A).
    static_assert(!SHARE_B || (CLUSTER == 2 && GROUPING == Grouping::kNone && G::kRowsBPerCta * 128 % 1024 == 0),
                  "sharing B: dense, a cluster of two, BLOCK_N / 2 a multiple of 8 (swizzle alignment)");
    // m-grouped: B is [G, N, K] (TMA'd as G*N rows) with 128x128 scales [G, N/128, K/128];
    // each M tile multiplies its expert's B. Columns past N of a tile read the next
    // expert's rows; they are never stored. Contiguous segments are multiples of 128 rows, or
    // of 256 where the host was promised so (only then may a tile have 256 rows). Masked: A is [G, M_max, K] (TMA'd as G*M_max
    // rows, shape_m = M_max), D likewise; only the first masked_m[g] rows of D[g] are written.
    // k-grouped (wgrad): A [shape_m, T], B [N, T], both 1x128 along T; D [G, shape_m, N] FP32;
    // expert g reduces over its tokens only, so K is runtime and SHAPE_K is not used.
    constexpr bool kMGrouped = GROUPING == Grouping::kMContiguous || GROUPING == Grouping::kMMasked;
    constexpr bool kKGrouped = GROUPING == Grouping::kKContiguous;
    static_assert(!kMGrouped || !SCALE_B_1X128, "m-grouped GEMMs are 1D2D (fprop/dgrad)");
    static_assert(!kKGrouped || SCALE_B_1X128, "the k-grouped GEMM is 1D1D (wgrad)");
    static_assert(kKGrouped || SHAPE_K > 0, "K must be positive");
    // Split-K (small M: more CTAs stream B, each over a slice of K): the slices of an output
    // tile leave FP32 partials in `split_partials` [outputs, SPLIT_K, tile]; the slice that
    // arrives last on the tile's counter (self-resetting, zero between launches) adds them in
    // slice order, so the result does not depend on arrival order, and stores BF16.
    static_assert(SPLIT_K >= 1 && (SPLIT_K == 1 || (!G::kOutF32 && GROUPING == Grouping::kNone && G::kNumWaves == 1)),
                  "split-K is for the dense 1D2D GEMM with BF16 output and tiles of one wave");
    static_assert(SCALE_B_1X128 || !G::kOutF32 || GROUPING == Grouping::kNone,
                  "m-grouped GEMMs write BF16");

    // Align by pointer arithmetic on the __shared__ array (not through an integer cast), so
    // the compiler keeps the shared address space and emits LDS/STS, not generic LD/ST.
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::kFull);
    uint64_t* empty = reinterpret_cast<uint64_t*>(smem + S::kEmpty);

    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t rank = CLUSTER > 1 ? cluster_ctarank() : 0;

    if (threadIdx.x == G::kNumMathThreads) {
        prefetch_tma_descriptor(tmap_a);
        prefetch_tma_descriptor(tmap_b);
        prefetch_tma_descriptor(tmap_scale_a);
        if constexpr (SCALE_B_1X128) prefetch_tma_descriptor(tmap_scale_b);
        if constexpr (!G::kOutF32) prefetch_tma_descriptor(tmap_out);
        for (uint32_t s = 0; s < NUM_STAGES; ++s) {
            mbar_init(&full[s], 1);                          // the producer's arrive + TMA bytes
            // One arrival per math warp of every CTA that reads what this CTA multicasts.
            mbar_init(&empty[s], CLUSTER * G::kNumMathThreads / 32);
        }
        fence_barrier_init();
    }
    __syncthreads();
    if constexpr (CLUSTER > 1) cluster_sync();  // the peer's barriers exist before any multicast

    using Walker = TileWalker<GROUPING, BLOCK_M, BLOCK_N, SHAPE_N, GROUP_N, CLUSTER, SPLIT_K, SHARE_B>;
    const uint32_t first_tile = blockIdx.x / CLUSTER, tile_stride = gridDim.x / CLUSTER;
    // Where a tile's operands live: its rows of A, of A's scales, of B, and its K blocks.
    // Masked: expert g's scales start at row g * M_max rounded up to 4, so that every box
    // starts 16-byte aligned (the host pads them so when M_max is not a multiple of 4): TMA
    // raises an illegal instruction on an innermost coordinate that is not.
    struct Operands {
        uint32_t a_row, scale_a_row, b_row, kb_begin, kb_end;
    };
    auto operands_of = [&](const Tile& t) {
        Operands op;
        op.a_row = (GROUPING == Grouping::kMMasked ? t.group * shape_m : 0) + t.m_block * BLOCK_M;
        op.scale_a_row = GROUPING == Grouping::kMMasked ? t.group * ((shape_m + 3) & ~3u) + t.m_block * BLOCK_M
                                                        : op.a_row;
        op.b_row = (kMGrouped ? t.group * SHAPE_N : 0) + t.n_block * BLOCK_N;
        op.kb_begin = 0;
        op.kb_end = kNumKBlocks;
        if constexpr (GROUPING == Grouping::kMContiguous) {
            if (t.group >= num_groups) op.kb_end = 0;  // no expert: the tile is stored as zeros
        }
        if constexpr (SPLIT_K > 1) {
            op.kb_begin = t.split * kNumKBlocks / SPLIT_K;
            op.kb_end = (t.split + 1) * kNumKBlocks / SPLIT_K;
        }
        if constexpr (kKGrouped) {
            op.kb_begin = static_cast<uint32_t>(__ldg(group_counts + t.group)) / G::BLOCK_K;
            op.kb_end = max(op.kb_begin, static_cast<uint32_t>(__ldg(group_counts + t.group + 1)) / G::BLOCK_K);
        }
        return op;
    };

    if (threadIdx.x >= G::kNumMathThreads) {
        release_registers<G::kProducerRegisters>();
        // One thread issues every copy; the others wait at the end (cluster barrier).
        uint32_t stage = 0, phase = 0;  // the ring's position, carried across tiles
        Walker walker(group_counts, num_groups, shape_m, rank, first_tile, tile_stride);
        Tile t;
        while (threadIdx.x == G::kNumMathThreads && walker.next(t)) {
            const Operands op = operands_of(t);
            const int32_t n0 = t.n_block * BLOCK_N;
            for (uint32_t kb = op.kb_begin; kb < op.kb_end; ++kb, advance_stage<NUM_STAGES>(stage, phase)) {
                if constexpr (CLUSTER > 1) mbar_wait_cluster(&empty[stage], phase ^ 1);
                else mbar_wait(&empty[stage], phase ^ 1);
                uint64_t* bar = &full[stage];
                mbar_arrive_expect_tx(bar, G::kStageBytes);
                if constexpr (CLUSTER > 1 && !SHARE_B) {
                    const uint32_t rows = rank * G::kRowsAPerCta;
                    tma_load_2d_multicast(tmap_a, bar, smem + S::kA + stage * G::kTileABytes + rows * 128,
                                          kb * 128, op.a_row + rows, (1 << CLUSTER) - 1);
                } else {
                    tma_load_2d(tmap_a, bar, smem + S::kA + stage * G::kTileABytes, kb * 128, op.a_row);
                }
                if constexpr (SHARE_B) {
                    const uint32_t rows = rank * G::kRowsBPerCta;
                    tma_load_2d_multicast(tmap_b, bar, smem + S::kB + stage * G::kTileBBytes + rows * 128,
                                          kb * 128, op.b_row + rows, (1 << CLUSTER) - 1);
                } else {
                    tma_load_2d(tmap_b, bar, smem + S::kB + stage * G::kTileBBytes, kb * 128, op.b_row);
                }
                tma_load_2d(tmap_scale_a, bar, smem + S::kScaleA + stage * G::kScaleASlot, op.scale_a_row, kb);
                if constexpr (SCALE_B_1X128)
                    tma_load_2d(tmap_scale_b, bar, smem + S::kScaleB + stage * G::kScaleBSlot,
                                kb & ~(G::kScaleCols - 1), n0);
            }
        }
        if constexpr (CLUSTER > 1) {
            __syncwarp();   // the issuing lane rejoins its warp for the aligned cluster barrier
            cluster_sync();  // the peer may still arrive on our barriers
        }
        return;
    }

    // ---- math warpgroups ----
    claim_registers<G::kMathRegisters>();
    constexpr uint32_t kWaves = G::kNumWaves;
    // The warpgroup index read through a shuffle: the compiler then knows it is warp-uniform
    // and keeps the wgmma descriptors built from it in uniform registers (no per-K-block moves).
    const uint32_t group = __shfl_sync(0xffffffff, threadIdx.x / 128, 0), warp_in_group = warp % 4;
    // This thread's rows in wave 0 are row_in_wave and row_in_wave + 8; wave w adds w * kWaveRows.
    const uint32_t row_in_wave = group * 64 + warp_in_group * 16 + lane / 4;
    float accum[kWaves][G::kAccum], partial[G::kAccum];
    uint32_t stage = 0, phase = 0;  // the ring's position, carried across tiles
    // wgmma descriptors of stage 0 (B, and this warpgroup's 64 rows of wave 0 of A): a stage
    // or a wave moves only their start address (16-byte units), computed once here rather
    // than per K block. Shared addresses stay below 2^18, so that 14-bit field never carries.
    const uint64_t desc_a0 = smem_desc_k_major_sw128(smem + S::kA + group * 64 * 128);
    const uint64_t desc_b0 = smem_desc_k_major_sw128(smem + S::kB);
    // A stage is free once every CTA that reads it is done: our warps and the peer's.
    auto release_stage = [&](uint32_t stage) {
        if constexpr (CLUSTER > 1) {
#pragma unroll
            for (uint32_t r = 0; r < CLUSTER; ++r) mbar_arrive_cluster(&empty[stage], r);
        } else {
            mbar_arrive(&empty[stage]);
        }
    };

    Walker walker(group_counts, num_groups, shape_m, rank, first_tile, tile_stride);
    Tile t;
    while (walker.next(t)) {
        const Operands op = operands_of(t);
        const uint32_t m0 = t.m_block * BLOCK_M, n0 = t.n_block * BLOCK_N;
        // 1D2D: columns at or past `split` (tile-relative) use the next 128x128 scale block.
        const uint32_t split = G::kMayStraddle ? (n0 / 128 + 1) * 128 - n0 : BLOCK_N;
        const float* scale_b_group = scale_b;
        if constexpr (kMGrouped) scale_b_group += t.group * G::kNumNScaleBlocks * kNumKBlocks;
        const float* scale_b_lo = scale_b_group + min(n0 / 128, G::kNumNScaleBlocks - 1) * kNumKBlocks;
        const float* scale_b_hi = scale_b_group + min(n0 / 128 + 1, G::kNumNScaleBlocks - 1) * kNumKBlocks;

#pragma unroll
        for (uint32_t w = 0; w < kWaves; ++w) {
#pragma unroll
            for (uint32_t i = 0; i < G::kAccum; ++i) accum[w][i] = 0.0f;
        }

        // 128x128 B scales are two floats per K block, the same for every thread, read
        // through L1 one K block ahead: a miss to L2 then has a whole block of MMAs to land
        // in (ptxas sinks a same-iteration load below the barrier wait, next to its use).
        float sb_lo_next = 0.0f, sb_hi_next = 0.0f;
        if constexpr (!SCALE_B_1X128) {
            if (op.kb_begin < op.kb_end) {
                sb_lo_next = __ldg(scale_b_lo + op.kb_begin);
                sb_hi_next = G::kMayStraddle ? __ldg(scale_b_hi + op.kb_begin) : sb_lo_next;
            }
        }
        for (uint32_t kb = op.kb_begin; kb < op.kb_end; ++kb, advance_stage<NUM_STAGES>(stage, phase)) {
            const float sb_lo = sb_lo_next, sb_hi = sb_hi_next;
            if constexpr (!SCALE_B_1X128) {
                if (kb + 1 < op.kb_end) {
                    sb_lo_next = __ldg(scale_b_lo + kb + 1);
                    sb_hi_next = G::kMayStraddle ? __ldg(scale_b_hi + kb + 1) : sb_lo_next;
                }
            }
            mbar_wait(&full[stage], phase);
            // This stage's A scales, read now so their latency hides behind the wgmmas.
            const float* scale_a_smem = reinterpret_cast<const float*>(smem + S::kScaleA + stage * G::kScaleASlot);
            float sa[kWaves][2];
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
#pragma unroll
                for (uint32_t half = 0; half < 2; ++half) {
                    const uint32_t row = w * G::kWaveRows + row_in_wave + half * 8;
                    sa[w][half] = scale_a_smem[row];
                }
            }

            const uint64_t desc_b = desc_b0 + stage * (G::kTileBBytes >> 4);
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
                const uint64_t desc_a = desc_a0 + ((stage * G::kTileABytes + w * G::kWaveRows * 128) >> 4);
#pragma unroll
                for (uint32_t i = 0; i < G::kAccum; ++i) fence_operand(partial[i]);
                wgmma_fence();
#pragma unroll
                for (uint32_t k = 0; k < 4; ++k) {
                    // 32 bytes of K per instruction: advance the start address by 2 x 16 bytes.
                    Wgmma::mma(desc_a + 2 * k, desc_b + 2 * k, partial, k > 0);
                }
                wgmma_commit();
#pragma unroll
                for (uint32_t i = 0; i < G::kAccum; ++i) fence_operand(partial[i]);
                wgmma_wait<0>();

                // After the last wave's MMAs, read the rest of this stage's scales, then hand
                // the stage back before promoting (1D1D with two waves: after promoting).
                const float sa0 = sa[w][0], sa1 = sa[w][1];
                float* acc = accum[w];
                if constexpr (SCALE_B_1X128) {
                    const float* scale_b_smem = reinterpret_cast<const float*>(smem + S::kScaleB + stage * G::kScaleBSlot);
                    const uint32_t kb_col = kb % G::kScaleCols;  // this K block's column of the 4-block box
                    auto scale_b_pair = [&](uint32_t j) {
                        const uint32_t col = j * 8 + (lane % 4) * 2;
                        return make_float2(scale_b_smem[col * G::kScaleCols + kb_col],
                                           scale_b_smem[(col + 1) * G::kScaleCols + kb_col]);
                    };
                    auto promote = [&](uint32_t j, float2 sb) {
                        acc[j * 4 + 0] = fmaf(partial[j * 4 + 0], sa0 * sb.x, acc[j * 4 + 0]);
                        acc[j * 4 + 1] = fmaf(partial[j * 4 + 1], sa0 * sb.y, acc[j * 4 + 1]);
                        acc[j * 4 + 2] = fmaf(partial[j * 4 + 2], sa1 * sb.x, acc[j * 4 + 2]);
                        acc[j * 4 + 3] = fmaf(partial[j * 4 + 3], sa1 * sb.y, acc[j * 4 + 3]);
                    };
                    if constexpr (kWaves == 1) {
                        // The scales into registers, the stage handed back, then the promotion.
                        float2 sb[G::kAccum / 4];
#pragma unroll
                        for (uint32_t j = 0; j < G::kAccum / 4; ++j) sb[j] = scale_b_pair(j);
                        __syncwarp();
                        if (lane == 0) release_stage(stage);
#pragma unroll
                        for (uint32_t j = 0; j < G::kAccum / 4; ++j) promote(j, sb[j]);
                    } else {
                        // Beside two promoted accumulators there is no room for a register copy of
                        // the scales: each wave reads them from the stage as it promotes, and the
                        // stage goes back after the last wave's promotion.
#pragma unroll
                        for (uint32_t j = 0; j < G::kAccum / 4; ++j) promote(j, scale_b_pair(j));
                        if (w + 1 == kWaves) {
                            __syncwarp();
                            if (lane == 0) release_stage(stage);
                        }
                    }
                } else {
                    if (w + 1 == kWaves) {
                        __syncwarp();
                        if (lane == 0) release_stage(stage);
                    }
                    const float lo0 = sa0 * sb_lo, lo1 = sa1 * sb_lo;
                    const float hi0 = sa0 * sb_hi, hi1 = sa1 * sb_hi;
#pragma unroll
                    for (uint32_t j = 0; j < G::kAccum / 4; ++j) {
                        const bool hi = G::kMayStraddle && j * 8 >= split;
                        const float s0 = hi ? hi0 : lo0, s1 = hi ? hi1 : lo1;
                        acc[j * 4 + 0] = fmaf(partial[j * 4 + 0], s0, acc[j * 4 + 0]);
                        acc[j * 4 + 1] = fmaf(partial[j * 4 + 1], s0, acc[j * 4 + 1]);
                        acc[j * 4 + 2] = fmaf(partial[j * 4 + 2], s1, acc[j * 4 + 2]);
                        acc[j * 4 + 3] = fmaf(partial[j * 4 + 3], s1, acc[j * 4 + 3]);
                    }
                }
            }
        }

        // Epilogue: in each wave a thread owns rows r and r + 8, and column pairs 8j + 2 (lane % 4).
        const uint64_t out_group = (kKGrouped || GROUPING == Grouping::kMMasked)
                                       ? static_cast<uint64_t>(t.group) * shape_m * SHAPE_N : 0;
        if constexpr (G::kOutF32) {
            // An expert without tokens has a zero gradient: written as zeros, or, when
            // accumulating, nothing to add.
            if (ACCUMULATE && kKGrouped && op.kb_begin == op.kb_end) continue;
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
                store_from_registers<G::kAccum, SHAPE_N>(accum[w], m0 + w * G::kWaveRows + row_in_wave,
                                                         n0 + (lane % 4) * 2, t.rows,
                                                         [&](uint64_t index, float v0, float v1) {
                    float2* dst = reinterpret_cast<float2*>(out_f32 + out_group + index);
                    if constexpr (ACCUMULATE) {
                        const float2 old = *dst;
                        v0 += old.x;
                        v1 += old.y;
                    }
                    *dst = make_float2(v0, v1);
                });
            }
        } else if (GROUPING == Grouping::kMMasked && m0 + BLOCK_M > t.rows) {
            // The expert's last, partial tile: rows past masked_m[g] must stay untouched, and
            // TMA would clip only at M_max. Stored from registers with a row guard instead.
            __nv_bfloat16* out_bf16 = reinterpret_cast<__nv_bfloat16*>(out_f32) + out_group;
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
                store_from_registers<G::kAccum, SHAPE_N>(accum[w], m0 + w * G::kWaveRows + row_in_wave,
                                                         n0 + (lane % 4) * 2, t.rows,
                                                         [&](uint64_t index, float v0, float v1) {
                    *reinterpret_cast<__nv_bfloat162*>(out_bf16 + index) = __floats2bfloat162_rn(v0, v1);
                });
            }
        } else {
            if constexpr (SPLIT_K > 1) {
                if (!reduce_split_k<G::kAccum, G::kNumMathThreads, SPLIT_K>(
                        accum[0], split_partials + static_cast<uint64_t>(t.output) * SPLIT_K * BLOCK_M * BLOCK_N,
                        t.split, split_counters + t.output))
                    continue;  // another slice of K finishes this tile
            }
            // BF16 tile -> shared memory -> TMA store (it clips rows/columns past M, N).
            // Thread 0 waits until the previous tile's store has read the buffer.
            __nv_bfloat16* tile_out = reinterpret_cast<__nv_bfloat16*>(smem + S::kOut);
            if (threadIdx.x == 0) tma_store_wait_read();
            named_barrier_sync(1, G::kNumMathThreads);
#pragma unroll
            for (uint32_t w = 0; w < kWaves; ++w) {
#pragma unroll
                for (uint32_t half = 0; half < 2; ++half) {
                    const uint32_t row = w * G::kWaveRows + row_in_wave + half * 8;
#pragma unroll
                    for (uint32_t j = 0; j < G::kAccum / 4; ++j) {
                        // A warp writes 8 rows x 16 bytes per j: row-major, those 8 rows share
                        // banks (8-way conflicts); the 128-byte swizzle moves each row's 16
                        // bytes to chunk (j % 8) ^ (row % 8), spreading them over all banks.
                        __nv_bfloat16* dst = G::kSwizzledOut
                            ? tile_out + (j / 8) * BLOCK_M * 64 + row * 64 + (((j % 8) ^ (row % 8)) * 8) + (lane % 4) * 2
                            : tile_out + row * BLOCK_N + j * 8 + (lane % 4) * 2;
                        *reinterpret_cast<__nv_bfloat162*>(dst) =
                            __floats2bfloat162_rn(accum[w][j * 4 + half * 2], accum[w][j * 4 + half * 2 + 1]);
                    }
                }
            }
            fence_async_shared();
            named_barrier_sync(1, G::kNumMathThreads);
            if (threadIdx.x == 0) {
                if constexpr (G::kSwizzledOut) {  // one store per 64 columns (128-byte rows)
#pragma unroll
                    for (uint32_t part = 0; part < BLOCK_N / 64; ++part)
                        tma_store_2d(tmap_out, tile_out + part * BLOCK_M * 64, n0 + part * 64, op.a_row);
                } else {
                    tma_store_2d(tmap_out, tile_out, n0, op.a_row);
                }
                tma_store_commit();
            }
        }
    }
    if constexpr (!G::kOutF32) {
        if (threadIdx.x == 0) tma_store_wait_all();  // shared memory must outlive the store
    }
    if constexpr (CLUSTER > 1) {
        __syncwarp();
        cluster_sync();  // the peer may still multicast into us
    }
}

}  // namespace fp8train
