// Shared pieces of the FP8 casts (sm90_fp8_cast*.cuh): the scale rule, the E4M3 conversion,
// 16-element chunks moved with 16-byte loads and stores, and the swizzled shared tile.
//
// Bit-identical to fp8train.quant.formats / reference:
//   scale = max(amax / 448, 2^-126) (optionally rounded up to a power of two on its bits),
//   q = e4m3(x / scale), both IEEE float32 divisions (computed as div_rn.cuh says), then
//   round to nearest even.
// NaN propagates through amax and the scale (the whole group becomes NaN on purpose).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fp8train/div_rn.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fp8train {
namespace cast {

constexpr uint32_t GROUP = 128;   // elements per scale (1x128 groups, 128x128 blocks)
constexpr uint32_t CHUNK = 16;    // elements per thread per step: one 16-byte e4m3 store
constexpr uint32_t LANES_PER_GROUP = GROUP / CHUNK;  // 8 lanes share one 128-group
static_assert(LANES_PER_GROUP == 8, "group reductions below shuffle over 8 lanes");

// max(a, b) that propagates NaN like torch's amax (fmaxf would drop it): max.NaN is one
// FMNMX.NAN, where a compare-and-select costs three instructions per element.
__device__ __forceinline__ float nan_max(float a, float b) {
    float out;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(a), "f"(b));
    return out;
}

__device__ __forceinline__ float scale_from_amax(float amax, bool pow2) {
    // amax >= 0; Inf / 448 = Inf and NaN stays NaN, so those pass through unchanged.
    float scale = amax;
    if (amax <= 3.40282347e38f) scale = fmaxf(div_rn::div_by_448(amax), 0x1p-126f);  // MIN_SCALE
    if (pow2) {
        const uint32_t bits = __float_as_uint(scale);
        if ((bits & 0x7F800000u) != 0x7F800000u)  // finite: bump a non-zero mantissa
            return __uint_as_float((bits & 0x7F800000u) + ((bits & 0x7FFFFFu) ? 0x800000u : 0u));
    }
    return scale;
}

// x / scale for the elements of one group, bit-identical to IEEE division (div_rn.cuh).
//   pow2 scale:     1/scale is exact (bits 254 - exponent: scales lie in [2^-126, 2^119]), so
//                   x * (1/scale) is the correctly rounded quotient: one FMUL.
//   Inf/NaN scale:  x * rcp(scale) (0 or NaN) gives x / scale's IEEE results (+-0, NaN).
//   otherwise:      both operands times `pre` (2^100 below 2^-60, 2^-100 above 2^60, else 1)
//                   keep the Markstein division in the normal range. Scaling x down can
//                   make tiny elements subnormal, but those quotients are below 2^-86 and
//                   round to +-0 in E4M3 either way.
struct Quantizer {
    float scale, inverse, pre;
    bool multiply;  // the quotient is x * inverse (pow2 or non-finite scale)
    __device__ __forceinline__ Quantizer(float s, bool pow2) {
        const bool finite = s <= 3.40282347e38f;  // s > 0; false for Inf and NaN
        multiply = pow2 || !finite;
        pre = multiply || (s >= 0x1p-60f && s <= 0x1p60f) ? 1.0f : (s < 0x1p-60f ? 0x1p100f : 0x1p-100f);
        scale = __fmul_rn(s, pre);
        if (!finite) {
            asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inverse) : "f"(s));  // 0 or NaN
        } else if (pow2) {
            inverse = __uint_as_float((254u << 23) - (__float_as_uint(s) & 0x7F800000u));
        } else {
            inverse = div_rn::reciprocal_normal(scale);
        }
    }
    template <uint32_t N>
    __device__ __forceinline__ void apply(float (&q)[N], const float (&v)[N]) const {
        if (multiply) {
#pragma unroll
            for (uint32_t j = 0; j < N; ++j) q[j] = __fmul_rn(v[j], inverse);
        } else if (pre == 1.0f) {  // the usual case: no operand scaling, one FMUL less
#pragma unroll
            for (uint32_t j = 0; j < N; ++j) q[j] = div_rn::quotient(v[j], scale, inverse);
        } else {
#pragma unroll
            for (uint32_t j = 0; j < N; ++j) q[j] = div_rn::quotient(__fmul_rn(v[j], pre), scale, inverse);
        }
    }
};

// Two floats -> two e4m3 bytes (lo in the low byte), round to nearest even. satfinite only
// differs from torch's non-saturating conversion above 464, and |x / scale| <= 448 * (1 + 2^-23)
// by construction; NaN stays NaN (0x7F, as torch writes a positive NaN).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
    uint16_t out;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(out) : "f"(hi), "f"(lo));
    return out;
}

// ---- 16-element chunks -------------------------------------------------------------------
// A chunk is 16 consecutive elements of one row kept as raw bits (bf16/fp16: 8 words, fp32:
// 16 words): raw bits hold half the registers of floats while the loads are in flight.
template <typename T>
struct Chunk {
    static constexpr uint32_t WORDS = CHUNK * sizeof(T) / 4;
    uint32_t w[WORDS];
};

// One element's raw bits (low 16 bits for bf16/fp16) as a float.
template <typename T> __device__ __forceinline__ float raw_to_float(uint32_t bits);
template <> __device__ __forceinline__ float raw_to_float<float>(uint32_t bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float raw_to_float<__nv_bfloat16>(uint32_t bits) {
    return __uint_as_float(bits << 16);  // bf16 = top half of a float
}
template <> __device__ __forceinline__ float raw_to_float<__half>(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// Element j of a chunk as a float.
template <typename T>
__device__ __forceinline__ float element(const Chunk<T>& c, uint32_t j) {
    if constexpr (sizeof(T) == 4) return raw_to_float<T>(c.w[j]);
    else return raw_to_float<T>(j % 2 ? c.w[j / 2] >> 16 : c.w[j / 2]);
}

// Elements [k, k + 16) of `row` (nullptr: a zero row). `vec` says the row's 16-element
// chunks are 16-byte aligned (row length a multiple of 16, aligned base); a chunk that is
// not whole (the row's tail) is read element by element, out-of-range elements are zero.
template <typename T>
__device__ __forceinline__ Chunk<T> load_chunk(const T* __restrict__ row, uint32_t k, uint32_t cols, bool vec) {
    Chunk<T> c;
    if (row != nullptr && vec && k + CHUNK <= cols) {
        const uint4* src = reinterpret_cast<const uint4*>(row + k);
#pragma unroll
        for (uint32_t i = 0; i < Chunk<T>::WORDS / 4; ++i) {
            const uint4 u = __ldg(src + i);
            c.w[4 * i] = u.x, c.w[4 * i + 1] = u.y, c.w[4 * i + 2] = u.z, c.w[4 * i + 3] = u.w;
        }
        return c;
    }
    constexpr uint32_t PER_WORD = 4 / sizeof(T);  // elements per 32-bit word
    using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
    const Bits* bits = reinterpret_cast<const Bits*>(row);
#pragma unroll
    for (uint32_t i = 0; i < Chunk<T>::WORDS; ++i) {
        uint32_t word = 0;
#pragma unroll
        for (uint32_t h = 0; h < PER_WORD; ++h) {
            const uint32_t kk = k + i * PER_WORD + h;
            if (row != nullptr && kk < cols) word |= static_cast<uint32_t>(bits[kk]) << (16 * h);
        }
        c.w[i] = word;
    }
    return c;
}

// 16 values -> 16 e4m3 bytes at out[0, 16), only the first `valid` of them when fewer fit
// (then byte stores). `vec`: out is 16-byte aligned.
__device__ __forceinline__ void store_e4m3(uint8_t* __restrict__ out, const float (&v)[CHUNK],
                                           const Quantizer& d, uint32_t valid, bool vec) {
    float q[CHUNK];
    d.apply(q, v);
    uint32_t w[4];
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i)
        w[i] = e4m3x2(q[4 * i], q[4 * i + 1]) | (e4m3x2(q[4 * i + 2], q[4 * i + 3]) << 16);
    if (vec && valid >= CHUNK) {
        *reinterpret_cast<uint4*>(out) = make_uint4(w[0], w[1], w[2], w[3]);
        return;
    }
#pragma unroll
    for (uint32_t j = 0; j < CHUNK; ++j)
        if (j < valid) out[j] = static_cast<uint8_t>(w[j / 4] >> (8 * (j % 4)));
}

__device__ __forceinline__ float chunk_amax(const float (&v)[CHUNK]) {
    float amax = 0.0f;
#pragma unroll
    for (uint32_t j = 0; j < CHUNK; ++j) amax = nan_max(fabsf(v[j]), amax);
    return amax;
}

// amax over the 8 lanes (aligned octet of the warp) that share one 128-group.
__device__ __forceinline__ float octet_amax(float amax) {
#pragma unroll
    for (uint32_t offset = LANES_PER_GROUP / 2; offset > 0; offset /= 2)
        amax = nan_max(__shfl_xor_sync(0xffffffffu, amax, offset), amax);
    return amax;
}

// The end of a row pass (dual casts): one row's 128-group held 16 values per lane by the 8
// lanes of an octet (`sub` = which 16) -> its e4m3 bytes at q[t, k..] and, from lane 0, its
// scale, at block * scale_ld + t (K-block-major, the GEMMs' layout for A's scales).
template <bool POW2>
__device__ __forceinline__ void write_row_group(const float (&v)[CHUNK], uint32_t t, uint32_t k, uint32_t sub,
                                                uint32_t rows, uint32_t cols, uint32_t block,
                                                uint8_t* __restrict__ q, float* __restrict__ scale,
                                                uint32_t scale_ld) {
    const float s_row = scale_from_amax(octet_amax(chunk_amax(v)), POW2);
    if (t < rows) {
        if (k < cols)
            store_e4m3(q + static_cast<uint64_t>(t) * cols + k, v, Quantizer(s_row, POW2), cols - k,
                       cols % CHUNK == 0);
        if (sub == 0)
            scale[static_cast<uint64_t>(block) * scale_ld + t] = s_row;
    }
}

// The end of a column pass (dual casts): column k's 128 tokens from t0 (16 per lane, `sub`
// = which 16) -> 16 e4m3 bytes of qt's row k at t0 + 16 sub and, from lane 0, the scale of
// scale_t[k, row_block], stored K-block-major like every 1x128 scale (qt's rows are the rows
// of these scales): at row_block * scale_t_ld + k.
template <bool POW2>
__device__ __forceinline__ void write_column_group(const float (&v)[CHUNK], uint32_t k, uint32_t t0, uint32_t sub,
                                                   uint32_t cols, uint32_t row_block,
                                                   uint8_t* __restrict__ qt, uint32_t qt_cols,
                                                   float* __restrict__ scale_t, uint32_t scale_t_ld) {
    const float s_col = scale_from_amax(octet_amax(chunk_amax(v)), POW2);
    const uint32_t t = t0 + CHUNK * sub;
    if (k < cols) {
        if (t < qt_cols)
            store_e4m3(qt + static_cast<uint64_t>(k) * qt_cols + t, v, Quantizer(s_col, POW2), qt_cols - t,
                       qt_cols % CHUNK == 0);
        if (sub == 0) scale_t[static_cast<uint64_t>(row_block) * scale_t_ld + k] = s_col;
    }
}

// ---- the shared 128 x 128 float tile -----------------------------------------------------
// Row r, column c lives at r * 128 + c with its 4-float quad index u = c / 4 XOR-swizzled:
//   u ^ (((u >> 3) & 3) ^ ((r >> 4) & 7)).
// Row pass: 8 lanes write one row's 8 chunks with 16-byte stores; (u >> 3) & 3 spreads the
// octet over all 32 banks. Column pass: lanes read rows 16a + j (a = 0..7) of 4 columns;
// (r >> 4) & 7 = a spreads those over all 32 banks. Both passes are conflict-free.
constexpr uint32_t TILE_FLOATS = GROUP * GROUP;

__device__ __forceinline__ uint32_t tile_index(uint32_t r, uint32_t c) {
    const uint32_t u = c / 4;
    return r * GROUP + 4 * (u ^ (((u >> 3) & 3) ^ ((r >> 4) & 7))) + c % 4;
}

// Chunk `ch` (columns 16ch..16ch+15) of row r into the tile: four 16-byte stores.
__device__ __forceinline__ void tile_store_chunk(float* tile, uint32_t r, uint32_t ch, const float (&v)[CHUNK]) {
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i)
        *reinterpret_cast<float4*>(tile + tile_index(r, CHUNK * ch + 4 * i)) =
            make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

// Rows 16a..16a+15 of column c.
__device__ __forceinline__ void tile_load_column(const float* tile, uint32_t a, uint32_t c, float (&v)[CHUNK]) {
#pragma unroll
    for (uint32_t j = 0; j < CHUNK; ++j) v[j] = tile[tile_index(CHUNK * a + j, c)];
}

}  // namespace cast
}  // namespace fp8train
