"""The JIT's disk cache with a fake nvcc: hits, keys, concurrent compiles, corruption, errors.

The fake nvcc is a small Python script selected through FP8TRAIN_NVCC, so every code path
(subprocess, staging directory, rename) is the real one, across processes too.
"""
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fp8train.ops.jit import cache, compiler, toolkit
from fp8train.ops.jit.compiler import compile_cubin

FAKE_NVCC = """\
#!{python}
import hashlib, os, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("fake nvcc, release {version}")
    sys.exit(0)
src = args[-1]
out = args[args.index("-o") + 1]
text = open(src).read()
if "#error" in text:
    print(src + "(1): error: boom", file=sys.stderr)
    sys.exit(2)
with open({log!r}, "a") as f:
    f.write(str(os.getpid()) + "\\n")
flags = [a for a in args if a != src and a != out]
payload = hashlib.sha256((text + repr(flags)).encode()).digest() * 256
time.sleep({sleep})
with open(out, "wb") as f:  # written slowly, in pieces: a reader must never see this
    for i in range(0, len(payload), 2048):
        f.write(payload[i:i + 2048]); f.flush(); time.sleep(0.002)
print("ptxas info    : Compiling entry function 'k' for 'sm_90a'", file=sys.stderr)
print("ptxas info    : Function properties for k", file=sys.stderr)
print("    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads", file=sys.stderr)
print("ptxas info    : Used 42 registers, used 1 barriers, 1024 bytes smem", file=sys.stderr)
"""

SOURCE = '#include "fp8train/probe.cuh"\nextern "C" __global__ void k() {}\n'


def _write_fake(path: Path, log: Path, sleep: float = 0.0, version: str = "1.0") -> Path:
    path.write_text(FAKE_NVCC.format(python=sys.executable, log=str(log), sleep=sleep,
                                     version=version))
    path.chmod(0o755)
    return path


@pytest.fixture
def jit(tmp_path, monkeypatch):
    """A private cache dir, a fake nvcc and a private csrc dir with one header."""
    csrc = tmp_path / "csrc"
    (csrc / "fp8train").mkdir(parents=True)
    (csrc / "fp8train" / "probe.cuh").write_text("#pragma once\n")
    log = tmp_path / "nvcc.log"
    nvcc = _write_fake(tmp_path / "nvcc", log)
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FP8TRAIN_NVCC", str(nvcc))
    monkeypatch.delenv("FP8TRAIN_JIT_DEBUG", raising=False)
    monkeypatch.setattr(compiler, "csrc_dir", lambda: csrc)
    compiler._reset_process_caches()
    yield type("Jit", (), {"root": tmp_path, "csrc": csrc, "log": log, "nvcc": nvcc,
                           "kernels": tmp_path / "cache" / "kernels"})
    compiler._reset_process_caches()


def _compiles(jit) -> int:
    return len(jit.log.read_text().split()) if jit.log.exists() else 0


def _assert_valid(result):
    meta = json.loads((result.cubin_path.parent / cache.META).read_text())
    assert hashlib.sha256(result.cubin_path.read_bytes()).hexdigest() == meta["cubin_sha256"]
    assert result.cubin_path.stat().st_size == 32 * 256


def test_compile_then_in_process_hit_is_fast(jit):
    first = compile_cubin("probe", SOURCE)
    assert not first.cached and first.cubin_path.is_file()
    assert first.registers == 42 and first.spill_bytes == 12
    assert "Used 42 registers" in first.ptxas_report and first.compile_seconds > 0
    assert first.cubin_path.parent.parent == jit.kernels
    assert first.cubin_path.parent.name.startswith("probe-")
    _assert_valid(first)
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        again = compile_cubin("probe", SOURCE)
    per_call = (time.perf_counter() - start) / calls
    assert again.cached and again.cubin_path == first.cubin_path
    assert per_call < 1e-3, f"in-process cache hit costs {per_call * 1e6:.0f} us"
    assert _compiles(jit) == 1


def test_disk_hit_in_a_new_process(jit):
    first = compile_cubin("probe", SOURCE)
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fp8train.ops.jit import compiler
        compiler.csrc_dir = lambda: Path({str(jit.csrc)!r})
        start = time.perf_counter()
        r = compiler.compile_cubin("probe", {SOURCE!r})
        print(r.cached, r.cubin_path, time.perf_counter() - start)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         env=os.environ.copy(), check=True).stdout.split()
    assert out[0] == "True" and Path(out[1]) == first.cubin_path
    assert _compiles(jit) == 1


def test_memory_hit_does_not_run_the_compiler(jit, monkeypatch):
    compile_cubin("probe", SOURCE)
    runs = []
    real = compiler._run_nvcc
    monkeypatch.setattr(compiler, "_run_nvcc", lambda cmd, cwd: runs.append(cmd) or real(cmd, cwd))
    compile_cubin("probe", SOURCE)
    compiler._reset_process_caches()  # forces `nvcc --version` and a disk lookup, no compile
    assert compile_cubin("probe", SOURCE).cached
    assert runs == [[str(jit.nvcc), "--version"]]


def test_key_follows_source_flags_headers_and_compiler(jit, monkeypatch):
    base = compile_cubin("probe", SOURCE).cubin_path.parent
    entries = {base}
    entries.add(compile_cubin("probe", SOURCE + "// edit\n").cubin_path.parent)
    entries.add(compile_cubin("probe", SOURCE, flags=["-DBLOCK_N=128"]).cubin_path.parent)
    entries.add(compile_cubin("probe2", SOURCE).cubin_path.parent)
    assert len(entries) == 4
    # Headers are hashed once per process; a new process (here: a reset) sees the edit.
    (jit.csrc / "fp8train" / "probe.cuh").write_text("#pragma once\n// changed\n")
    compiler._reset_process_caches()
    edited = compile_cubin("probe", SOURCE)
    assert not edited.cached and edited.cubin_path.parent not in entries
    entries.add(edited.cubin_path.parent)
    (jit.csrc / "fp8train" / "other.cuh").write_text("#pragma once\n")
    compiler._reset_process_caches()
    entries.add(compile_cubin("probe", SOURCE).cubin_path.parent)
    assert len(entries) == 6
    _write_fake(jit.nvcc, jit.log, version="2.0")
    compiler._reset_process_caches()
    upgraded = compile_cubin("probe", SOURCE)
    assert not upgraded.cached and upgraded.cubin_path.parent not in entries
    # Same inputs again: the same entry, no compile.
    n = _compiles(jit)
    compiler._reset_process_caches()
    assert compile_cubin("probe", SOURCE).cubin_path == upgraded.cubin_path
    assert _compiles(jit) == n


@pytest.mark.parametrize("variable", ["NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "NVCC_CCBIN"])
def test_key_follows_the_nvcc_environment(jit, monkeypatch, variable):
    """nvcc reads these itself: a kernel built with one set is never served without it."""
    for name in ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "NVCC_CCBIN"):
        monkeypatch.delenv(name, raising=False)
    plain = compile_cubin("probe", SOURCE)
    monkeypatch.setenv(variable, "-DPOISON=1")
    poisoned = compile_cubin("probe", SOURCE)
    assert not poisoned.cached and poisoned.cubin_path.parent != plain.cubin_path.parent
    monkeypatch.delenv(variable)
    assert compile_cubin("probe", SOURCE).cubin_path == plain.cubin_path


def _worker(barrier, queue):
    barrier.wait()
    r = compile_cubin("probe", SOURCE)
    queue.put((str(r.cubin_path), hashlib.sha256(r.cubin_path.read_bytes()).hexdigest(),
               r.registers))


def test_concurrent_compiles_end_with_one_valid_entry(jit):
    _write_fake(jit.nvcc, jit.log, sleep=0.3)
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _compiles(jit) >= 2, "the processes did not actually race"
    paths = {r[0] for r in results}
    assert len(paths) == 1 and all(r[2] == 42 for r in results)
    entry = Path(paths.pop()).parent
    meta = json.loads((entry / cache.META).read_text())
    assert {r[1] for r in results} == {meta["cubin_sha256"]}
    assert sorted(p.name for p in jit.kernels.iterdir()) == [entry.name]  # no temp dirs left


@pytest.mark.parametrize("damage", ["truncate_cubin", "delete_cubin", "garble_meta"])
def test_corrupt_entry_is_rebuilt(jit, damage):
    first = compile_cubin("probe", SOURCE)
    entry = first.cubin_path.parent
    if damage == "truncate_cubin":
        first.cubin_path.write_bytes(first.cubin_path.read_bytes()[:100])
    elif damage == "delete_cubin":
        first.cubin_path.unlink()
    else:
        (entry / cache.META).write_text("{not json")
    compiler._reset_process_caches()
    again = compile_cubin("probe", SOURCE)
    assert not again.cached and again.cubin_path == first.cubin_path
    _assert_valid(again)
    assert _compiles(jit) == 2
    assert sorted(p.name for p in jit.kernels.iterdir()) == [entry.name]


def test_cubin_removed_under_a_live_process_is_rebuilt(jit):
    first = compile_cubin("probe", SOURCE)
    first.cubin_path.unlink()
    again = compile_cubin("probe", SOURCE)
    assert not again.cached and again.cubin_path.is_file()


def test_debug_output(jit, monkeypatch, capfd):
    monkeypatch.setenv("FP8TRAIN_JIT_DEBUG", "1")
    compile_cubin("probe", SOURCE)
    err = capfd.readouterr().err
    assert "[fp8train.jit] probe: compiling" in err
    assert "command: " in err and "-gencode=arch=compute_90a,code=sm_90a" in err
    assert "compiled in" in err and "42 registers" in err
    compiler._reset_process_caches()
    compile_cubin("probe", SOURCE)
    assert "disk cache hit" in capfd.readouterr().err
    monkeypatch.setenv("FP8TRAIN_JIT_DEBUG", "0")
    compiler._reset_process_caches()
    compile_cubin("probe", SOURCE)
    assert capfd.readouterr().err == ""


def test_nvcc_failure_names_the_error_and_keeps_the_source(jit):
    with pytest.raises(RuntimeError, match="boom") as info:
        compile_cubin("broken", SOURCE + "#error boom\n")
    kept = Path(str(info.value).split("source kept at ")[1].split()[0])
    assert kept.is_file() and "#error boom" in kept.read_text()
    assert not any(p.name.startswith("broken-") for p in jit.kernels.iterdir())


def test_command_line(jit, monkeypatch):
    seen = []
    real = compiler._run_nvcc
    monkeypatch.setattr(compiler, "_run_nvcc", lambda cmd, cwd: seen.append(cmd) or real(cmd, cwd))
    compile_cubin("probe", SOURCE, flags=("-lineinfo",))
    cmd = seen[-1]
    for flag in ("-gencode=arch=compute_90a,code=sm_90a", "--cubin", "-std=c++17", "-O3",
                 f"-I{jit.csrc}", "-lineinfo"):
        assert flag in cmd
    assert cmd[cmd.index("-Xptxas") + 1] == "-v"
    assert cmd[-1].endswith("kernel.cu") and cmd[cmd.index("-o") + 1].endswith("kernel.cubin")


def test_missing_nvcc_is_a_clear_error(jit, tmp_path, monkeypatch):
    monkeypatch.setenv("FP8TRAIN_NVCC", str(tmp_path / "no-such-nvcc"))
    with pytest.raises(RuntimeError, match="FP8TRAIN_NVCC"):
        compile_cubin("probe", SOURCE)
    monkeypatch.delenv("FP8TRAIN_NVCC")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(toolkit, "_DEFAULT_CUDA_HOME", tmp_path / "no-default-cuda")
    with pytest.raises(RuntimeError, match="no nvcc found; tried: .*no-cuda.*PATH"):
        compile_cubin("probe", SOURCE)


def test_nvcc_search_order(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    _write_fake(home / "bin" / "nvcc", tmp_path / "log")
    monkeypatch.delenv("FP8TRAIN_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert toolkit.nvcc_path() == str(home / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(home / "bin"))
    assert toolkit.nvcc_path() == str(home / "bin" / "nvcc")


def test_arguments_are_validated(jit):
    with pytest.raises(ValueError, match="name"):
        compile_cubin("../escape", SOURCE)
    with pytest.raises(ValueError, match="source"):
        compile_cubin("probe", "  ")
    with pytest.raises(TypeError, match="flags"):
        compile_cubin("probe", SOURCE, flags="-O3")
    with pytest.raises(TypeError, match="flags"):
        compile_cubin("probe", SOURCE, flags=["-O3", 3])


def test_csrc_dir_is_the_source_tree_here():
    from fp8train.ops.jit import csrc_dir

    here = csrc_dir()
    assert here == Path(__file__).resolve().parents[1] / "csrc" and here.is_dir()
