"""Argument checks shared by the public functions: every error names the argument,
what was expected and what was given."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FP8_DTYPE = torch.float8_e4m3fn


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndims: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless `value` is a tensor of one of `dtypes` and `ndims`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if ndims is not None and value.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name}: expected a {want}-D tensor, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors on one device; the error lists where each one is."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"expected all tensors on one device, got {where}")


def check_bool(name: str, value) -> None:
    """A flag must be a real bool: "no" or 0 would otherwise read as a choice."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
