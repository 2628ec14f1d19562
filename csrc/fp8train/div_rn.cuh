// Correctly rounded float32 division (the bits of IEEE a / b, as torch computes it) without
// the slow-path subroutine of __fdiv_rn / __frcp_rn.
//
// Why: __fdiv_rn per element is ~10 instructions (it recomputes the reciprocal every time)
// plus a CALL to a slow path; in a cast that divides every element by its group's scale
// that made the kernels instruction-bound, and the CALL's register saving spilled the fp32
// tile kernels to local memory. Here the reciprocal is computed once per group and every
// quotient costs one FMUL and two FFMAs, with no call anywhere.
//
// The method (Markstein): with r = RN(1/b) and q0 = RN(a * r) (within an ulp of a / b), the
// residual e = a - q0 * b is exact (one FMA) and q = RN(q0 + e * r) is RN(a / b), as long as
// a, b, r, q and e stay in the normal range. Callers below keep them there by scaling both
// operands by the same power of two, which leaves the quotient unchanged.
// (Checked against exact rational arithmetic on 60k (a, b) pairs, rounding midpoints included.)
#pragma once

#include <cstdint>

namespace fp8train {
namespace div_rn {

// RN(1/b) for normal b with |exponent| <= 125: MUFU.RCP refined by one Newton step, the fast
// path of NVIDIA's own rcp.rn for that range (its slow path only serves denormals, Inf, NaN
// and exponents near the ends).
__device__ __forceinline__ float reciprocal_normal(float b) {
    float r0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(b));
    const float e = __fmaf_rn(r0, b, -1.0f);
    return __fmaf_rn(r0, -e, r0);
}

// RN(a / b) given r = RN(1/b), for a, b scaled into the normal range as described above.
// The residual is formed as t = q0 * b - a = -e and folded in as q0 - t * r: the same values,
// but a zero quotient keeps a's sign (-0 + -0 = -0), where a - q0 * b would give +0 for a = -0.
__device__ __forceinline__ float quotient(float a, float b, float r) {
    const float q0 = __fmul_rn(a, r);
    const float t = __fmaf_rn(q0, b, -a);
    return __fmaf_rn(-t, r, q0);
}

// RN(amax / 448) for amax >= 0 finite. RN(1/448) = 0x3B124925 exactly. An amax below 2^-90
// is scaled by 2^64 first (exact) and the quotient back by 2^-64: exact while the result is
// normal; a result below 2^-126 is rounded there, but every caller clamps it up to 2^-126,
// which RN(amax / 448) < 2^-126 clamps to as well.
__device__ __forceinline__ float div_by_448(float amax) {
    const bool tiny = amax < 0x1p-90f;
    const float a = tiny ? __fmul_rn(amax, 0x1p64f) : amax;
    const float q = quotient(a, 448.0f, __uint_as_float(0x3B124925u));
    return tiny ? __fmul_rn(q, 0x1p-64f) : q;
}

}  // namespace div_rn
}  // namespace fp8train
