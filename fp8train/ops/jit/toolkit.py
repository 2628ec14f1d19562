"""Where the CUDA command-line tools are: nvcc for compiling, cuobjdump/nvdisasm for SASS."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from ... import _env

_DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def _cuda_home() -> Path | None:
    # CUDA_HOME is the toolkit's own convention, not an fp8train setting, so it is not in the
    # README table; it is read here and nowhere else in the JIT.
    value = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return Path(value) if value else None


# Resolved nvcc per (FP8TRAIN_NVCC, CUDA_HOME, CUDA_PATH, PATH): searching PATH costs ~40 us
# and compile_cubin's in-process cache hit asks for nvcc every call.
_RESOLVED: dict[tuple, str] = {}


def nvcc_path() -> str:
    """The nvcc to run: FP8TRAIN_NVCC, else $CUDA_HOME/bin/nvcc, else nvcc on PATH, else
    /usr/local/cuda/bin/nvcc. Raises RuntimeError naming every place tried if none exists."""
    override = _env.nvcc()
    key = (override, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
           os.environ.get("PATH"))
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve_nvcc(override)
    return found


def _resolve_nvcc(override: str | None) -> str:
    tried = []
    if override is not None:
        # An explicit choice is never silently replaced by another nvcc.
        found = shutil.which(override)
        if found is None:
            raise RuntimeError(f"FP8TRAIN_NVCC={override!r} is not an executable file")
        return found
    tried.append("FP8TRAIN_NVCC (unset)")
    home = _cuda_home()
    if home is not None:
        candidate = home / "bin" / "nvcc"
        if os.access(candidate, os.X_OK):
            return str(candidate)
        tried.append(str(candidate))
    else:
        tried.append("$CUDA_HOME/bin/nvcc (CUDA_HOME unset)")
    found = shutil.which("nvcc")
    if found is not None:
        return found
    tried.append("nvcc on PATH")
    candidate = _DEFAULT_CUDA_HOME / "bin" / "nvcc"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    tried.append(str(candidate))
    raise RuntimeError("no nvcc found; tried: " + ", ".join(tried) + ". Set FP8TRAIN_NVCC.")


def _pip_tool_dirs() -> list[Path]:
    # The nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels put their binaries under
    # site-packages/nvidia/<pkg>/bin (12.x: cuda_cuobjdump, cuda_nvdisasm; 13.x: cu13).
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs.extend(sorted(p for p in Path(root).glob("*/bin") if p.is_dir()))
    return dirs


def find_cuda_tool(name: str) -> str | None:
    """Path of a CUDA binary (e.g. "cuobjdump", "nvdisasm") or None: PATH, $CUDA_HOME/bin,
    the directory of nvcc, /usr/local/cuda/bin, then the pip wheels' bin directories."""
    if not isinstance(name, str) or not name or os.sep in name:
        raise ValueError(f"name: expected a bare tool name, got {name!r}")
    found = shutil.which(name)
    if found is not None:
        return found
    dirs = []
    home = _cuda_home()
    if home is not None:
        dirs.append(home / "bin")
    try:
        dirs.append(Path(os.path.realpath(nvcc_path())).parent)
    except RuntimeError:
        pass
    dirs.append(_DEFAULT_CUDA_HOME / "bin")
    dirs.extend(_pip_tool_dirs())
    for d in dirs:
        candidate = d / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None
