"""Hypothesis strategies shared by the numerical tests: tensors with wide magnitudes."""
import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Per-dtype magnitude range: 1e-30..1e4 where the dtype can hold it.
MAGNITUDES = {
    torch.float32: (-30, 4),
    torch.bfloat16: (-30, 4),
    torch.float16: (-4, 4),  # fp16 underflows below ~6e-8 and overflows past 65504
}


@st.composite
def tensors(draw, shape, dtypes=DTYPES):
    """A random tensor of `shape` at one magnitude drawn from 1e-30..1e4, sometimes with an
    all-zero row, a zero block, one outlier at +-1e4 (6e4 in fp16), or one huge outlier in
    every 128-wide group of the last dim (1e4 times the tensor's magnitude, as far as the
    dtype holds)."""
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    lo, hi = MAGNITUDES[dtype]
    exponent = draw(st.integers(lo, hi))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * (10.0 ** exponent)
    if draw(st.booleans()) and x.numel():
        flat = x.view(-1)
        kind = draw(st.sampled_from(["zero_row", "outlier", "group_outliers", "zeros_block"]))
        if kind == "zero_row" and x.dim() >= 1:
            x.view(-1, shape[-1])[0].zero_()
        elif kind == "outlier":
            idx = draw(st.integers(0, flat.numel() - 1))
            flat[idx] = flat[idx].sign().clamp_min(0) * 2 - 1  # +-1
            flat[idx] *= 1e4 if dtype != torch.float16 else 6e4
        elif kind == "group_outliers":
            groups = x.view(-1, shape[-1])
            cols = torch.arange(0, shape[-1], 128)
            cols = cols + torch.randint(0, 128, cols.shape, generator=gen)
            cols = cols.clamp_max(shape[-1] - 1)
            huge = 10.0 ** (exponent + 4)
            if dtype == torch.float16:
                huge = min(huge, 6e4)
            groups[:, cols] = torch.where(groups[:, cols] < 0, -huge, huge)
        else:
            flat[: min(flat.numel(), 200)] = 0
    return x.to(dtype)
