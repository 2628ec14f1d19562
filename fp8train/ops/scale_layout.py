"""How 1x128 scales lie in memory for the kernels (the rule every layer above follows).

Row-wise 1x128 scales of logical shape ``[rows, K/128]`` are stored K-block-major: a
``[K/128, ld]`` buffer with the row index contiguous, ``ld`` the row count rounded up to 4 so
that each K block's row of scales is a 16-byte multiple (what TMA and cuBLAS read).
"""
from __future__ import annotations


def kblock_major_ld(rows: int) -> int:
    """The block stride of K-block-major 1x128 scales of ``rows`` rows: the row count rounded
    up to 4 (TMA wants 16-byte strides), at least 4."""
    return max(4, -(-rows // 4) * 4)
