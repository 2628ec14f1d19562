"""The arithmetic of csrc/fp8train/div_rn.cuh, replayed with exact rationals on the CPU: the
Markstein quotient (one FMUL, two FMAs from a correctly rounded reciprocal) is the IEEE
float32 quotient, for the operand ranges the casts use. This checks the method, not the
CUDA (tests/test_cast_native.py does that on a GPU); MUFU.RCP's refinement is taken as
NVIDIA's rcp.rn fast path, i.e. the correctly rounded reciprocal."""
import random
from fractions import Fraction

import numpy as np
import torch


def rn32(x: Fraction) -> Fraction:
    """x rounded to the nearest float32, ties to even (subnormals included, no overflow)."""
    if x == 0:
        return Fraction(0)
    sign, x = (-1 if x < 0 else 1), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    e += 1 if Fraction(2) ** (e + 1) <= x else 0
    e -= 1 if Fraction(2) ** e > x else 0
    quantum = Fraction(2) ** (max(e, -126) - 23)
    units, rest = divmod(x / quantum, 1)
    units += 1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and units % 2) else 0
    return sign * units * quantum


def quotient(a: Fraction, b: Fraction, r: Fraction) -> Fraction:
    q0 = rn32(a * r)              # FMUL
    t = rn32(q0 * b - a)          # FFMA, exact
    return rn32(q0 - t * r)       # FFMA


def f32(x: float) -> Fraction:
    return Fraction(float(np.float32(x)))


def ieee(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(float(np.float32(float(a)) / np.float32(float(b))))


def test_markstein_quotient_is_the_ieee_quotient():
    rng = random.Random(0)
    for i in range(1500):
        s = f32(rng.uniform(1, 2) * 2.0 ** rng.randint(-60, 59))
        if i % 2:  # near an E4M3 rounding midpoint (m + 0.5) / 8 * 2^e, where a wrong ulp shows
            v = f32((rng.randint(8, 15) + 0.5) / 8 * 2.0 ** rng.randint(-9, 8) * float(s)
                    * (1 + rng.uniform(-1e-6, 1e-6)))
        else:
            v = f32(rng.uniform(-448, 448) * float(s) * 2.0 ** -rng.randint(0, 30))
        assert quotient(v, s, rn32(1 / s)) == ieee(v, s), (v, s)


def test_operands_scaled_by_powers_of_two_keep_the_e4m3_result():
    """Scales outside [2^-60, 2^60]: both operands times 2^100 or 2^-100 (cast_common.cuh)."""
    rng = random.Random(1)
    got, want = [], []
    for _ in range(800):
        s = f32(rng.uniform(1, 2) * 2.0 ** rng.choice([rng.randint(-126, -61), rng.randint(61, 118)]))
        pre = Fraction(2) ** (100 if s < Fraction(2) ** -60 else -100)
        v = f32(rng.uniform(-448, 448) * float(s) * 2.0 ** -rng.randint(0, 40))
        b, a = rn32(s * pre), rn32(v * pre)
        got.append(float(quotient(a, b, rn32(1 / b))))
        want.append(float(ieee(v, s)))
    as_e4m3 = lambda xs: torch.tensor(xs).to(torch.float8_e4m3fn).view(torch.uint8)  # noqa: E731
    assert torch.equal(as_e4m3(got), as_e4m3(want))


def test_amax_over_448_with_the_tiny_range_rescaled():
    rng = random.Random(2)
    r448 = rn32(Fraction(1, 448))
    assert np.float32(float(r448)).view(np.uint32) == 0x3B124925
    for _ in range(1500):
        exponent = rng.randint(-149, 127)
        amax = f32(rng.uniform(1, 2) * 2.0 ** exponent) if exponent >= -126 else \
            Fraction(rng.randint(1, 2 ** (exponent + 149))) * Fraction(2) ** -149
        tiny = amax < Fraction(2) ** -90
        q = quotient(amax * 2 ** 64 if tiny else amax, Fraction(448), r448)
        q = rn32(q * Fraction(2) ** -64) if tiny else q
        want = ieee(amax, Fraction(448))
        floor = Fraction(2) ** -126  # MIN_SCALE clamps both
        assert max(q, floor) == max(want, floor), amax


def test_silu_quotients_from_one_reciprocal_are_the_ieee_quotients():
    """sm90_fp8_cast_swiglu.cuh: g / b and 1 / b with b = RN(1 + exp(-g)) from r = RN(1/b),
    over the gates |g| in [2^-64, 64] that take that path (ends and mid-range alike)."""
    rng = random.Random(3)
    for i in range(1500):
        magnitude = 2.0 ** rng.uniform(-64, 6) if i % 3 else rng.choice([2.0 ** -64, 64.0, 1.0, 2.0 ** -63])
        g = f32(magnitude * rng.choice([-1, 1]))
        assert Fraction(2) ** -64 <= abs(g) <= 64
        b = f32(1 + float(np.exp(np.float32(-float(g)))))
        r = rn32(1 / b)
        assert r == ieee(Fraction(1), b)
        assert quotient(g, b, r) == ieee(g, b), (g, b)
