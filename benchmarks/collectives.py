"""Counting what FSDP2 puts on the wire: the bytes each rank contributes to its all-gathers."""
from __future__ import annotations

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def count_all_gather_bytes(record: list):
    """Append the input bytes of every ``dist.all_gather_single`` made inside the block (what
    this rank puts on the wire; FSDP2 gathers parameters through it) to ``record``."""
    if not isinstance(record, list):
        raise TypeError(f"record: expected a list, got {type(record).__name__}")
    original = dist.all_gather_single

    def counting(output_tensor, input_tensor, *args, **kwargs):
        record.append(input_tensor.numel() * input_tensor.element_size())
        return original(output_tensor, input_tensor, *args, **kwargs)

    dist.all_gather_single = counting
    try:
        yield
    finally:
        dist.all_gather_single = original
