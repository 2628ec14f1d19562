"""Renders the inline-PTX wrapper of one ``wgmma`` e4m3 shape.

The instruction names its N in the opcode and takes N/2 accumulator registers as separate
operands, so each BLOCK_N needs its own asm statement; the JIT renders only the one a
kernel uses instead of shipping all 32 of them in a header.
"""
from __future__ import annotations


def render_wgmma_e4m3(n: int) -> str:
    """C++ struct ``Wgmma_m64n{n}k32`` with ``mma(desc_a, desc_b, float (&d)[n/2], scale_d)``:
    D (+)= A (64x32, smem) * B^T (n x 32, smem), e4m3 in, FP32 accumulate."""
    if not isinstance(n, int) or n % 8 or not 8 <= n <= 256:
        raise ValueError(f"n: expected a multiple of 8 in [8, 256], got {n!r}")
    regs = n // 2
    dst = ", ".join(f"%{i}" for i in range(regs))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f"""
struct Wgmma_m64n{n}k32 {{
    __device__ __forceinline__ static void mma(uint64_t desc_a, uint64_t desc_b, float (&d)[{regs}], bool scale_d) {{
        asm volatile(
            "{{\\n"
            ".reg .pred p;\\n"
            "setp.ne.b32 p, %{regs + 2}, 0;\\n"
            "wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3 "
            "{{{dst}}}, %{regs}, %{regs + 1}, p, 1, 1;\\n"
            "}}\\n"
            : {outs}
            : "l"(desc_a), "l"(desc_b), "r"(int(scale_d)));
    }}
}};
"""
