"""How many SMs the kernels may use: the device's count unless overridden (DeepGEMM-style)."""
from __future__ import annotations

import torch

_override: int | None = None
_device_sms: dict[int, int] = {}


def _device_sm_count() -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: call set_num_sms(n) to plan kernels without a GPU")
    index = torch.cuda.current_device()
    count = _device_sms.get(index)
    if count is None:
        count = _device_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def set_num_sms(n: int | None) -> None:
    """Limit the kernels to `n` SMs (1..the current device's count); None restores the
    default (all SMs of the current device). Without a GPU only n >= 1 is checked."""
    global _override
    if n is None:
        _override = None
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected >= 1 SMs, got {n}")
    if torch.cuda.is_available():
        limit = _device_sm_count()
        if n > limit:
            raise ValueError(f"n: the current device has {limit} SMs, got {n}")
    _override = n


def get_num_sms() -> int:
    """The SM count the kernels plan for: the set_num_sms value, else the current device's
    multiprocessor count. Raises RuntimeError without a GPU and without an override."""
    if _override is not None:
        return _override
    return _device_sm_count()
