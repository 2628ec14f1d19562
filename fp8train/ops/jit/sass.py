"""Inspect a cubin's SASS: is the FP8 tensor-core path (QGMMA) used, is local memory touched.

CI has no GPU, so this is how a kernel that silently fell off `wgmma` e4m3 (no QGMMA) or
spills to local memory (LDL/STL) is caught at compile time.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .toolkit import find_cuda_tool

_QGMMA = re.compile(r"\bQGMMA\.")
# Local-memory loads/stores, with or without modifiers (LDL.64, STL.128, ...).
_LOCAL = re.compile(r"\b(?:LDL|STL)(?=[\s.])")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
# Instruction lines look like `/*0b70*/  QGMMA.64x8x32... ;`.
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+\S")


@dataclass(frozen=True)
class SassReport:
    # Kernels (entry functions) found in the cubin.
    functions: tuple[str, ...]
    # Number of SASS instructions over all kernels.
    instructions: int
    # Number of QGMMA (FP8 warpgroup MMA) instructions; 0 means no FP8 tensor-core path.
    qgmma_count: int
    # Number of LDL/STL instructions (local memory: spills or dynamically indexed arrays).
    local_memory_ops: int

    @property
    def has_qgmma(self) -> bool:
        return self.qgmma_count > 0


def _tool_env(cuobjdump: str) -> dict[str, str]:
    # `cuobjdump -sass` runs nvdisasm from PATH; put the one we found first.
    env = dict(os.environ)
    nvdisasm = find_cuda_tool("nvdisasm")
    dirs = [str(Path(cuobjdump).parent)]
    if nvdisasm is not None:
        dirs.insert(0, str(Path(nvdisasm).parent))
    env["PATH"] = os.pathsep.join(dirs + [env.get("PATH", "")])
    return env


def disassemble(cubin_path: str | os.PathLike) -> str:
    """The SASS of every kernel in the cubin, as printed by `cuobjdump -sass`.
    Raises RuntimeError if cuobjdump is not installed (pip install nvidia-cuda-cuobjdump
    nvidia-cuda-nvdisasm) or fails."""
    if not isinstance(cubin_path, (str, os.PathLike)):
        raise TypeError(f"cubin_path: expected a path, got {type(cubin_path).__name__}")
    path = Path(cubin_path)
    if not path.is_file():
        raise ValueError(f"cubin_path: no such file {path}")
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (PATH, $CUDA_HOME/bin, nvcc's directory, pip "
                           "wheels); pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    proc = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True,
                          env=_tool_env(cuobjdump), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr}")
    return proc.stdout


def summarize_sass(sass: str) -> SassReport:
    """Count what check_sass reports in SASS text from disassemble()."""
    if not isinstance(sass, str):
        raise TypeError(f"sass: expected str, got {type(sass).__name__}")
    return SassReport(
        functions=tuple(_FUNCTION.findall(sass)),
        instructions=len(_INSTRUCTION.findall(sass)),
        qgmma_count=len(_QGMMA.findall(sass)),
        local_memory_ops=len(_LOCAL.findall(sass)),
    )


def check_sass(cubin_path: str | os.PathLike) -> SassReport:
    """Disassemble the cubin and report QGMMA use and local-memory instructions."""
    report = summarize_sass(disassemble(cubin_path))
    if not report.functions or report.instructions == 0:
        raise RuntimeError(f"cuobjdump printed no kernel for {cubin_path}")
    return report
