"""The JIT with the real nvcc (skipped without one): an FP8 wgmma kernel compiles to a cubin
whose SASS holds QGMMA; local-memory use is detected; report parsing on nvcc's real text."""
import shutil
import time

import pytest

from fp8train.ops.jit import check_sass, compiler, toolkit
from fp8train.ops.jit.compiler import compile_cubin
from fp8train.ops.jit.ptxas import parse_ptxas_report
from fp8train.ops.jit.sass import summarize_sass

# One warpgroup issues m64n8k32 e4m3 x e4m3 -> f32 from shared-memory descriptors. Built
# only (never run): the point is that nvcc emits QGMMA for it.
QGMMA_PROBE = r"""
#include <cstdint>
extern "C" __global__ void __launch_bounds__(128) qgmma_probe(float* out) {
  __shared__ __align__(128) uint8_t a[64 * 32];
  __shared__ __align__(128) uint8_t b[8 * 32];
  for (int i = threadIdx.x; i < 64 * 32; i += 128) a[i] = 0x38;
  for (int i = threadIdx.x; i < 8 * 32; i += 128) b[i] = 0x38;
  __syncthreads();
  uint64_t da = (static_cast<uint64_t>(__cvta_generic_to_shared(a)) >> 4) & 0x3FFF;
  uint64_t db = (static_cast<uint64_t>(__cvta_generic_to_shared(b)) >> 4) & 0x3FFF;
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, %4, %5, 0, 1, 1;\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3) : "l"(da), "l"(db));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  float4* o = reinterpret_cast<float4*>(out) + threadIdx.x;
  *o = make_float4(d0, d1, d2, d3);
}
"""

# A dynamically indexed per-thread array lives in local memory: LDL/STL, no QGMMA.
LOCAL_MEMORY = r"""
extern "C" __global__ void local_probe(float* out, const int* idx, int n) {
  float buf[256];
  for (int i = 0; i < 256; ++i) buf[i] = out[i * blockDim.x + threadIdx.x];
  for (int i = 0; i < n; ++i) buf[idx[i] & 255] += buf[idx[i + n] & 255];
  out[threadIdx.x] = buf[idx[threadIdx.x] & 255];
}
"""


def _have_nvcc() -> bool:
    try:
        toolkit.nvcc_path()
        return True
    except RuntimeError:
        return False


needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="nvcc not found")
needs_cuobjdump = pytest.mark.skipif(toolkit.find_cuda_tool("cuobjdump") is None,
                                     reason="cuobjdump not found (pip install "
                                            "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    compiler._reset_process_caches()
    yield tmp_path
    compiler._reset_process_caches()


@needs_nvcc
@needs_cuobjdump
def test_fp8_wgmma_compiles_to_qgmma(cache_dir):
    compiled = compile_cubin("test_qgmma_probe", QGMMA_PROBE)
    assert compiled.cubin_path.is_file() and compiled.cubin_path.read_bytes()[:4] == b"\x7fELF"
    assert not compiled.cached and compiled.compile_seconds < 10
    assert 0 < compiled.registers <= 255 and compiled.spill_bytes == 0
    assert "qgmma_probe" in compiled.ptxas_report and "sm_90a" in compiled.ptxas_report
    report = check_sass(compiled.cubin_path)
    assert report.functions == ("qgmma_probe",)
    assert report.has_qgmma and report.qgmma_count == 1
    assert report.local_memory_ops == 0
    # Cached use: in-process and (after forgetting the process caches) from disk.
    start = time.perf_counter()
    assert compile_cubin("test_qgmma_probe", QGMMA_PROBE).cached
    assert time.perf_counter() - start < 0.010
    compiler._reset_process_caches()
    start = time.perf_counter()
    again = compile_cubin("test_qgmma_probe", QGMMA_PROBE)
    disk_seconds = time.perf_counter() - start
    assert again.cached and again.cubin_path == compiled.cubin_path
    # Includes one `nvcc --version` and hashing csrc/; still far below a compile.
    assert disk_seconds < 0.5, f"disk cache hit took {disk_seconds:.3f} s"


@needs_nvcc
@needs_cuobjdump
def test_local_memory_is_counted(cache_dir):
    compiled = compile_cubin("test_local_probe", LOCAL_MEMORY)
    report = check_sass(compiled.cubin_path)
    assert not report.has_qgmma
    assert report.local_memory_ops >= 2
    assert "bytes stack frame" in compiled.ptxas_report


@needs_nvcc
def test_compile_error_reports_nvcc_output(cache_dir):
    with pytest.raises(RuntimeError, match=r"(?s)nvcc failed.*undefined_thing"):
        compile_cubin("test_broken", 'extern "C" __global__ void k() { undefined_thing(); }')


def test_ptxas_report_parsing():
    text = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'a' for 'sm_90a'
ptxas info    : Function properties for a
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 2304 bytes smem
ptxas info    : Compiling entry function 'b' for 'sm_90a'
ptxas info    : Function properties for b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compile time = 18.700 ms
some unrelated nvcc line
"""
    report = parse_ptxas_report(text)
    assert (report.registers, report.spill_bytes, report.stack_bytes, report.smem_bytes) == (
        168, 20, 16, 2304)
    assert "unrelated" not in report.text and report.text.count("\n") == 9
    with pytest.raises(RuntimeError, match="register report"):
        parse_ptxas_report("nvcc warning: nothing\n")


def test_sass_summary():
    sass = """
\tcode for sm_90a
\t\tFunction : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL.64 [R1], R2 ;
        /*0020*/                   LDL R4, [R1+0x8] ;
        /*0030*/                   QGMMA.64x8x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0040*/                   LDLK R0, [R1] ;
        /*0050*/                   EXIT ;
"""
    report = summarize_sass(sass)
    assert report.functions == ("k",) and report.instructions == 6
    assert report.qgmma_count == 1 and report.has_qgmma and report.local_memory_ops == 2
    assert not summarize_sass(sass.replace("QGMMA", "HGMMA")).has_qgmma


def test_disassemble_validates_its_argument(tmp_path):
    from fp8train.ops.jit import disassemble

    with pytest.raises(ValueError, match="cubin_path"):
        disassemble(tmp_path / "missing.cubin")
    with pytest.raises(TypeError, match="cubin_path"):
        disassemble(3)


def test_cuobjdump_found_next_to_nvdisasm():
    # In CI the test extra installs both wheels; the SASS checks depend on them.
    cuobjdump = toolkit.find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed")
    assert toolkit.find_cuda_tool("nvdisasm") is not None or shutil.which("nvdisasm")
