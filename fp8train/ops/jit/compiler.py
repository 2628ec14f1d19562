"""Compile a rendered .cu source to an sm_90a cubin with nvcc, cached on disk and in memory.

    compiled = compile_cubin("sm90_fp8_gemm_1d2d_n2112_k7168", source)
    compiled.cubin_path, compiled.registers, compiled.spill_bytes

The cache key hashes the kernel name, the source, every file under csrc_dir() (so an edited
header recompiles), the flags, the arch and `nvcc --version`. Entries are published by an
atomic directory rename (see cache.py), so several processes may compile the same kernel at
once: each compiles privately, one entry wins, nobody reads a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ... import _env
from . import cache, toolkit
from .ptxas import parse_ptxas_report
from .toolkit import nvcc_path

__all__ = ["CompiledKernel", "compile_cubin", "csrc_dir", "nvcc_path"]

ARCH = "sm_90a"
_BASE_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "--cubin", "-std=c++17", "-O3",
               "-Xptxas", "-v")
# Bump when the entry layout or the key's recipe changes, so old entries are never misread.
_CACHE_VERSION = "1"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../fp8train


@dataclass(frozen=True)
class CompiledKernel:
    # The name given to compile_cubin (also the cache directory's prefix).
    name: str
    # The cubin inside the cache entry; stays valid while the cache directory exists.
    cubin_path: Path
    # ptxas's resource report (registers, spills, stack frame, shared memory) per kernel.
    ptxas_report: str
    # Largest register count per thread over the cubin's kernels.
    registers: int
    # Spill stores + spill loads in bytes (0 for a healthy kernel).
    spill_bytes: int
    # Seconds nvcc took when this entry was built (for a cached entry, the original build).
    compile_seconds: float
    # True if the cubin came from the disk or in-process cache rather than this call's nvcc.
    cached: bool


def csrc_dir() -> Path:
    """The directory of the CUDA sources the kernels #include (passed to nvcc as -I).

    A wheel ships them as the data package `fp8train/csrc`; in the source tree (and an
    editable install) they are the top-level `csrc/` next to the `fp8train` package.
    """
    shipped = _PACKAGE_DIR / "csrc"
    if shipped.is_dir():
        return shipped
    tree = _PACKAGE_DIR.parent / "csrc"
    # Only trust a sibling csrc/ in a source checkout, never a stray site-packages/csrc.
    if tree.is_dir() and (_PACKAGE_DIR.parent / "setup.py").is_file():
        return tree
    raise RuntimeError(f"fp8train's CUDA sources are missing: looked for {shipped} and {tree}")


def _run_nvcc(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the compiler; the one place a process is spawned (tests replace this function)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


# Per-process caches: compiler identity per nvcc, header digest per csrc dir, results per key.
_IDENTITY: dict[str, str] = {}
_HEADERS: dict[Path, str] = {}
_MEMO: dict[tuple, CompiledKernel] = {}


def _reset_process_caches() -> None:
    """Forget everything cached in this process (tests; headers edited in a live process)."""
    _IDENTITY.clear()
    _HEADERS.clear()
    _MEMO.clear()
    toolkit._RESOLVED.clear()


def _log(message: str) -> None:
    if _env.jit_debug():
        print(f"[fp8train.jit] {message}", file=sys.stderr, flush=True)


def _compiler_identity(nvcc: str) -> str:
    identity = _IDENTITY.get(nvcc)
    if identity is None:
        proc = _run_nvcc([nvcc, "--version"], Path.cwd())
        if proc.returncode != 0:
            raise RuntimeError(f"`{nvcc} --version` failed (exit {proc.returncode}):\n"
                               f"{proc.stderr}")
        identity = _IDENTITY[nvcc] = proc.stdout.strip()
    return identity


def _headers_digest(include: Path) -> str:
    # Hashing every file (not parsing #includes) is simple and cannot miss a dependency;
    # csrc/ is small. Done once per process per directory.
    digest = _HEADERS.get(include)
    if digest is None:
        h = hashlib.sha256()
        for path in sorted(p for p in include.rglob("*") if p.is_file()):
            h.update(path.relative_to(include).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        digest = _HEADERS[include] = h.hexdigest()
    return digest


def _cache_key(name: str, source: str, flags: tuple[str, ...], nvcc: str, include: Path) -> str:
    parts = [_CACHE_VERSION, name, source, list(flags), ARCH, list(_BASE_FLAGS),
             _compiler_identity(nvcc), _headers_digest(include), _env.nvcc_environment()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _from_meta(name: str, entry: Path, meta: dict, cached: bool) -> CompiledKernel:
    return CompiledKernel(name, entry / cache.CUBIN, meta["ptxas_report"], meta["registers"],
                          meta["spill_bytes"], meta["compile_seconds"], cached)


def _validate(name: object, source: object, flags: object) -> tuple[str, ...]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name: expected letters, digits, '_', '.', '-' (<= 128), got {name!r}")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("source: expected the non-empty text of a .cu file")
    if isinstance(flags, (str, bytes)) or not isinstance(flags, Sequence):
        raise TypeError(f"flags: expected a sequence of str, got {type(flags).__name__}")
    if not all(isinstance(f, str) and f for f in flags):
        raise TypeError(f"flags: every flag must be a non-empty str, got {list(flags)!r}")
    return tuple(flags)


def compile_cubin(name: str, source: str, *, flags: Sequence[str] = ()) -> CompiledKernel:
    """Compile `source` (a complete .cu text that may #include files from csrc_dir()) to an
    sm_90a cubin, or return the cached one. Raises RuntimeError with nvcc's output and the
    path of the kept source file if nvcc fails."""
    flags = _validate(name, source, flags)
    nvcc = nvcc_path()
    root = _env.cache_dir() / "kernels"
    memo_key = (name, source, flags, nvcc, root, tuple(sorted(_env.nvcc_environment().items())))
    hit = _MEMO.get(memo_key)
    # One stat guards against the cache directory being wiped while the process runs.
    if hit is not None and hit.cubin_path.is_file():
        return hit

    include = csrc_dir()
    key = _cache_key(name, source, flags, nvcc, include)
    entry = root / f"{name}-{key[:16]}"
    meta = cache.read_meta(entry)
    if meta is not None and meta.get("key") == key:
        _log(f"{name}: disk cache hit {entry}")
        result = _from_meta(name, entry, meta, cached=True)
    else:
        result = _compile(name, source, flags, nvcc, include, key, root, entry)
    _MEMO[memo_key] = replace(result, cached=True)
    return result


def _compile(name: str, source: str, flags: tuple[str, ...], nvcc: str, include: Path,
             key: str, root: Path, entry: Path) -> CompiledKernel:
    root.mkdir(parents=True, exist_ok=True)
    # Private staging directory on the same filesystem as the entry, so rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    src = staging / cache.SOURCE
    src.write_text(source)
    cubin = staging / cache.CUBIN
    cmd = [nvcc, *_BASE_FLAGS, f"-I{include}", *flags, "-o", str(cubin), str(src)]
    _log(f"{name}: compiling into {entry}\n  command: {shlex.join(cmd)}")
    start = time.perf_counter()
    proc = _run_nvcc(cmd, staging)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        # The staging directory is kept so the failing source can be inspected.
        raise RuntimeError(f"nvcc failed for kernel {name!r} (exit {proc.returncode}); "
                           f"source kept at {src}\ncommand: {shlex.join(cmd)}\n"
                           f"{proc.stderr}{proc.stdout}")
    try:
        if not cubin.is_file() or cubin.stat().st_size == 0:
            raise RuntimeError(f"nvcc reported success for {name!r} but wrote no cubin at "
                               f"{cubin}\ncommand: {shlex.join(cmd)}")
        report = parse_ptxas_report(proc.stdout + "\n" + proc.stderr)
        meta = {
            "key": key, "name": name, "cubin_sha256": cache.sha256_file(cubin),
            "ptxas_report": report.text, "registers": report.registers,
            "spill_bytes": report.spill_bytes, "compile_seconds": round(seconds, 4),
            "command": cmd,
        }
        cache.write_meta(staging, meta)
        entry, meta = cache.publish(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"{name}: compiled in {seconds:.2f} s, {report.registers} registers, "
         f"{report.spill_bytes} spill bytes")
    return _from_meta(name, entry, meta, cached=False)
