// SwiGLU's backward fused into the dual casts of its two gradients: from da (the gradient of
// a = silu(gate) * up), gate and up [T, I] -> the row-wise 1x128 casts along I and the
// column-wise casts along T (zero-padded to qt_cols) of d(gate) and d(up), which are never
// written in high precision: the dgrad and wgrad operands of the gate and up projections.
// Bit-identical to casting autograd's gradients of F.silu(gate) * up on the GPU:
//   d(up)   = da * silu(gate), silu rounded to T first (as the forward's F.silu);
//   d(gate) = silu_backward(da * up, gate): the product rounded to T, then ATen's CUDA
//             formula in float, t * s * (1 + g * (1 - s)) with s = 1 / (1 + exp(-g)), whose
//             inner multiply-add nvcc contracts into one fma; each result rounded to T.
//
// One 128 x 128 tile per block of THREADS threads: gate's, up's and da's tiles are staged by
// cp.async (3 x 32 KB for bf16/fp16, 2 blocks per SM); each thread turns the units it staged
// into d(gate) (in gate's tile) and d(up) (in up's tile), and after one barrier the dual
// cast's row and column passes run over both tiles. The work is bound by instruction issue
// and latency, not bytes, and only two blocks fit: blocks of 512 threads (32 warps an SM)
// ran it at 88-93% of a copy where 256 threads ran 23-36% (H100, docs/quant.md). Needs
// I % 16 == 0 and 16-byte aligned rows (the host runs the unfused ops otherwise).
#pragma once

#include "fp8train/sm90_fp8_cast_swiglu.cuh"

namespace fp8train {
namespace cast {

// g / b and 1 / b for b = 1 + exp(-g) (rounded to float, as torch forms it), each the bits of
// IEEE division, from one reciprocal (div_rn.cuh), where nvcc's divisions compute the
// reciprocal twice, each behind a range check and a slow-path call. The shared reciprocal
// needs b, 1/b, g and g/b normal with room for the residual: |g| in [2^-64, 64] keeps
// 1 <= b < 2^93 and |g / b| > 2^-87 (tests/test_div_rn_math.py); other gates (zero, tiny,
// huge, Inf, NaN) take the plain divisions.
struct SiluQuotients {
    float silu, sigmoid;
};
__device__ __forceinline__ SiluQuotients silu_quotients(float g) {
    const float b = 1.0f + expf(-g);
    const float magnitude = fabsf(g);
    if (magnitude >= 0x1p-64f && magnitude <= 64.0f) {
        const float r = div_rn::reciprocal_normal(b);
        return {div_rn::quotient(g, b, r), r};
    }
    return {g / b, 1.0f / b};
}

// d(gate) and d(up) of one element, rounded to T as autograd's ops round.
template <typename T>
__device__ __forceinline__ void swiglu_grad_raw(uint32_t g_bits, uint32_t u_bits, uint32_t d_bits,
                                                uint32_t& dgate, uint32_t& dup) {
    const float g = raw_to_float<T>(g_bits), u = raw_to_float<T>(u_bits), d = raw_to_float<T>(d_bits);
    const SiluQuotients q = silu_quotients(g);
    const float silu = raw_to_float<T>(float_to_raw<T>(q.silu));
    dup = float_to_raw<T>(d * silu);
    const float t = raw_to_float<T>(float_to_raw<T>(d * u));
    const float s = q.sigmoid;
    dgate = float_to_raw<T>(t * s * __fmaf_rn(g, 1.0f - s, 1.0f));
}

// 16-byte units of gate, up and da -> the units of d(gate) (into gate) and d(up) (into up).
template <typename T>
__device__ __forceinline__ void swiglu_grad_unit(uint4& gate, uint4& up, uint4 grad) {
    uint32_t g[4] = {gate.x, gate.y, gate.z, gate.w}, u[4] = {up.x, up.y, up.z, up.w};
    const uint32_t d[4] = {grad.x, grad.y, grad.z, grad.w};
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
        uint32_t dg, du;
        if constexpr (sizeof(T) == 4) {
            swiglu_grad_raw<T>(g[i], u[i], d[i], dg, du);
        } else {  // two 16-bit elements per word
            uint32_t dg_hi, du_hi;
            swiglu_grad_raw<T>(g[i] & 0xFFFFu, u[i] & 0xFFFFu, d[i] & 0xFFFFu, dg, du);
            swiglu_grad_raw<T>(g[i] >> 16, u[i] >> 16, d[i] >> 16, dg_hi, du_hi);
            dg |= dg_hi << 16;
            du |= du_hi << 16;
        }
        g[i] = dg;
        u[i] = du;
    }
    gate = make_uint4(g[0], g[1], g[2], g[3]);
    up = make_uint4(u[0], u[1], u[2], u[3]);
}

}  // namespace cast

template <typename T, bool POW2, uint32_t THREADS>
__device__ __forceinline__ void swiglu_backward_dual_cast_tile(const T* __restrict__ gate, const T* __restrict__ up,
                                                               uint64_t ld, const T* __restrict__ grad,
                                                               uint64_t grad_ld, uint32_t rows, uint32_t cols,
                                                               const DualCastOut& out_gate,
                                                               const DualCastOut& out_up) {
    using namespace cast;
    using Tile = StagedTile<T>;
    using Own = OwnUnits<T, THREADS>;
    extern __shared__ __align__(128) uint8_t tile[];  // gate's, up's and da's tiles: 3 x Tile::BYTES
    uint8_t* up_tile = tile + Tile::BYTES;
    const uint8_t* grad_tile = tile + 2 * Tile::BYTES;
    const uint32_t t0 = blockIdx.y * GROUP, k0 = blockIdx.x * GROUP;
    // Rows past T and columns past I stage as zeros: their gradients are zero, no amax moves.
    const T* const sources[3] = {gate, up, grad};
    const uint64_t strides[3] = {ld, ld, grad_ld};
    stage_own_units<T, 3, THREADS>(tile, sources, strides, t0, k0, rows, cols);
#pragma unroll
    for (uint32_t j = 0; j < Own::COUNT; ++j) {
        const uint32_t offset = Own::offset(j);
        swiglu_grad_unit<T>(*reinterpret_cast<uint4*>(tile + offset), *reinterpret_cast<uint4*>(up_tile + offset),
                            *reinterpret_cast<const uint4*>(grad_tile + offset));
    }
    __syncthreads();
    cast_staged_tile<T, POW2, THREADS>(tile, t0, k0, rows, cols, out_gate);
    cast_staged_tile<T, POW2, THREADS>(up_tile, t0, k0, rows, cols, out_up);
}

}  // namespace fp8train
