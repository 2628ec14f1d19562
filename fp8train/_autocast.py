"""Autocast switched off for a block of FP8 work.

The FP8 paths fix every dtype themselves (operands in E4M3, results in the dtype asked
for), and the reference emulation multiplies FP32 blocks that autocast would quietly make
BF16. ``torch.autocast(enabled=False)`` costs about 5 us to enter and leave, paid several
times per layer step; flipping the thread's flag costs a tenth of that. Under
``torch.compile`` the real context manager is used, which Dynamo knows how to trace.
"""
from __future__ import annotations

import torch


class _FlagOff:
    __slots__ = ("device_type", "was_on")

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.was_on = False

    def __enter__(self):
        self.was_on = torch.is_autocast_enabled(self.device_type)
        if self.was_on:
            torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc_info):
        if self.was_on:
            torch.set_autocast_enabled(self.device_type, True)
        return False


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` ("cuda", "cpu")."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type=device_type, enabled=False)
    return _FlagOff(device_type)
