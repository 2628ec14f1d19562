"""How 1x128 scales lie in memory: K-block-major, the one layout every layer follows.

A 1x128 scale tensor of logical shape ``[rows, K/128]`` (a row-wise cast's, or a column-wise
cast's, whose rows are those of x.T) is stored K-block-major: a ``[K/128, ld]`` buffer with
the row index contiguous and ``ld`` the row count rounded up to 4, so that each K block's
scales are a 16-byte multiple. The GEMM kernels read A's scales so (one TMA box per K
block) and cuBLAS reads A's and B's 1x128 scales so; values and logical shapes are those
of the plain row-major tensor, only the strides differ.

Across a custom-op boundary the scales travel as their contiguous storage (``pack`` /
``unpack``): Inductor assumes that an op's outputs are contiguous.
"""
from __future__ import annotations

import torch


def kblock_major_ld(rows: int) -> int:
    """The block stride of K-block-major scales of ``rows`` rows: the row count rounded up
    to 4 (TMA wants 16-byte strides), at least 4."""
    return max(4, -(-rows // 4) * 4)


def empty_scales(lead: tuple, blocks: int, device) -> torch.Tensor:
    """float32 scales of logical shape ``[*lead, blocks]``, K-block-major underneath (2-D and
    up): the flattened row index contiguous, a block stride of the row count rounded up to
    4. A 1-D tensor (one row of scales) is plain."""
    if len(lead) == 0:
        return torch.empty(blocks, dtype=torch.float32, device=device)
    rows = 1
    strides = []
    for size in reversed(lead):  # the lead dims row-major over the flattened row index
        strides.append(rows)
        rows *= size
    ld = kblock_major_ld(rows)
    shape, stride = (*lead, blocks), (*reversed(strides), ld)
    if rows == ld:  # the strided allocation spans exactly [blocks, ld]: one op
        return torch.empty_strided(shape, stride, dtype=torch.float32, device=device)
    # The padding past the last block's rows must be allocated too (TMA reads whole boxes).
    storage = torch.empty(blocks * ld, dtype=torch.float32, device=device)
    return storage.as_strided(shape, stride)


def as_kblock_major(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` in the layout ``empty_scales`` gives (a copy only when it differs): what the
    reference casts return, so every implementation agrees on strides."""
    if scale.dim() < 2:
        return scale
    out = empty_scales(tuple(scale.shape[:-1]), scale.shape[-1], scale.device)
    if out.stride() == scale.stride():
        return scale
    return out.copy_(scale)


def is_kblock_major(scale: torch.Tensor, ld: int | None = None) -> bool:
    """Whether 2-D scales ``[rows, blocks]`` lie K-block-major with block stride ``ld``
    (default: ``kblock_major_ld(rows)``, exactly as ``empty_scales`` puts them)."""
    rows, blocks = scale.shape
    ld = kblock_major_ld(rows) if ld is None else ld
    return (rows == 1 or scale.stride(0) == 1) and (blocks == 1 or scale.stride(1) == ld)


def tma_readable(scale: torch.Tensor, kblock_major: bool) -> bool:
    """Whether a TMA descriptor can read 2-D scales ``[rows, blocks]`` in place: K-block-major
    or row-major, with 16-byte aligned base and strides."""
    if scale.data_ptr() % 16:
        return False
    if kblock_major:
        return scale.stride(0) == 1 and scale.stride(1) % 4 == 0
    return scale.stride(1) == 1 and scale.stride(0) % 4 == 0


def pack(scale: torch.Tensor) -> torch.Tensor:
    """K-block-major scales ``[rows, blocks]`` as their contiguous storage ``[blocks, ld]``."""
    rows, blocks = scale.shape
    ld = kblock_major_ld(rows)  # the storage's, since size-1 dims' strides say nothing
    if not is_kblock_major(scale) or scale.storage_offset():
        raise RuntimeError(f"1x128 scales: expected K-block-major storage [{blocks}, {ld}], got "
                           f"strides {scale.stride()} at offset {scale.storage_offset()}")
    return scale.as_strided((blocks, ld), (ld, 1))


def unpack(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``[rows, blocks]`` view of ``pack``'s storage."""
    return packed[:, :rows].t()
