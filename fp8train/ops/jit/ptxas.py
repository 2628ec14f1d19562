"""Parse the resource report that `nvcc -Xptxas -v` prints for each kernel in a cubin."""
from __future__ import annotations

import re
from dataclasses import dataclass

# ptxas prints, per entry function (nvcc 12.x-13.x):
#   ptxas info    : Function properties for <name>
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 30 registers, used 1 barriers, 2304 bytes smem
_REGISTERS = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame")
_SPILL_STORES = re.compile(r"(\d+) bytes spill stores")
_SPILL_LOADS = re.compile(r"(\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass(frozen=True)
class PtxasReport:
    # The report lines as printed (kept verbatim for the cache's meta.json and debugging).
    text: str
    # Largest register count over the cubin's kernels (what limits occupancy).
    registers: int
    # Spill stores + spill loads in bytes, summed over kernels; nonzero means local memory.
    spill_bytes: int
    # Largest stack frame in bytes.
    stack_bytes: int
    # Largest static shared memory in bytes.
    smem_bytes: int


def parse_ptxas_report(output: str) -> PtxasReport:
    """Extract the ptxas lines from nvcc's combined output and summarise them.
    Raises RuntimeError if no register count is present (the report was not produced)."""
    if not isinstance(output, str):
        raise TypeError(f"output: expected str, got {type(output).__name__}")
    lines = [
        line.rstrip()
        for line in output.splitlines()
        if line.startswith("ptxas") or "bytes stack frame" in line
    ]
    text = "\n".join(lines)
    registers = [int(v) for v in _REGISTERS.findall(text)]
    if not registers:
        raise RuntimeError("nvcc output has no ptxas register report (is -Xptxas -v passed?):\n"
                           + output[-2000:])
    spills = sum(int(v) for v in _SPILL_STORES.findall(text) + _SPILL_LOADS.findall(text))
    stack = max((int(v) for v in _STACK.findall(text)), default=0)
    smem = max((int(v) for v in _SMEM.findall(text)), default=0)
    return PtxasReport(text, max(registers), spills, stack, smem)
