"""Loading and launching cubins, TMA descriptors and the SM count.

GPU tests (marked `gpu`) launch real kernels; on a CPU machine the same kernel sources are
still compiled (so they cannot rot) and the argument checks, which run before any driver
call, are tested.
"""
import ctypes

import pytest
import torch

from fp8train.ops.jit import (compile_cubin, compiler, device, encode_tma_2d, encode_tma_3d,
                              load_kernel, runtime)
from test_jit_nvcc import needs_nvcc

FILL = r"""
extern "C" __global__ void fill(float* out, float value, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value + i;
}
"""

# Needs > 48 KB of dynamic shared memory (the opt-in path) and reports its cluster rank.
CLUSTER = r"""
#include <cstdint>
extern "C" __global__ void cluster_ranks(int* out, int smem_words) {
  extern __shared__ int smem[];
  for (int i = threadIdx.x; i < smem_words; i += blockDim.x) smem[i] = i;
  __syncthreads();
  uint32_t rank, size;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = static_cast<int>(rank) + smem[smem_words - 1] - (smem_words - 1);
    out[2 * blockIdx.x + 1] = static_cast<int>(size);
  }
}
"""

# One TMA box load into shared memory (offset 0, so 1024-byte aligned for the swizzle),
# completed through an mbarrier placed after the box, then copied out byte for byte.
TMA_LOAD = r"""
#include <cuda.h>
#include <cstdint>
extern "C" __global__ void tma_load_2d(const __grid_constant__ CUtensorMap desc, uint8_t* out,
                                       int x, int y, int box_bytes) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t bar = smem_addr + ((box_bytes + 7) & ~7);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 :: "r"(bar), "r"(box_bytes) : "memory");
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];"
        :: "r"(smem_addr), "l"(reinterpret_cast<uint64_t>(&desc)), "r"(x), "r"(y), "r"(bar)
        : "memory");
  }
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar) : "memory");
  }
  for (int i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = smem[i];
}
"""

SOURCES = {"fill": FILL, "cluster_ranks": CLUSTER, "tma_load_2d": TMA_LOAD}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    compiler._reset_process_caches()
    yield tmp_path
    compiler._reset_process_caches()


def _kernel(name):
    return load_kernel(compile_cubin(f"test_{name}", SOURCES[name]), name,
                       torch.cuda.current_device())


@needs_nvcc
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_gpu_test_kernels_compile(cache_dir, name):
    compiled = compile_cubin(f"test_{name}", SOURCES[name])
    assert compiled.cubin_path.is_file() and compiled.spill_bytes == 0
    assert f"'{name}'" in compiled.ptxas_report


# ---- argument checks (no driver needed) -------------------------------------------------

GOOD = dict(ptr=1 << 20, dtype=torch.uint8, inner=256, outer=64, row_stride_bytes=256,
            box_inner=128, box_outer=32, swizzle_bytes=128)


@pytest.mark.parametrize("change, error, match", [
    (dict(ptr=(1 << 20) + 8), ValueError, "ptr"),
    (dict(ptr=0), ValueError, "ptr"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
    (dict(inner=0), ValueError, "inner"),
    (dict(row_stride_bytes=264), ValueError, "row_stride_bytes"),
    (dict(row_stride_bytes=128), ValueError, "row_stride_bytes"),
    (dict(box_outer=257), ValueError, "box_outer"),
    (dict(box_inner=8), ValueError, "box_inner"),
    (dict(box_inner=256, swizzle_bytes=0, inner=256), None, None),
    (dict(box_inner=256), ValueError, "swizzle span"),
    (dict(dtype=torch.bfloat16, box_inner=128, row_stride_bytes=512), ValueError, "swizzle span"),
    (dict(swizzle_bytes=16), ValueError, "swizzle_bytes"),
])
def test_encode_tma_2d_checks_arguments(change, error, match, monkeypatch):
    args = {**GOOD, **change}
    if error is None:
        # Valid: reaches the driver, which is stubbed out here.
        called = []
        monkeypatch.setattr(runtime, "_encode", lambda *a: called.append(a) or "map")
        assert encode_tma_2d(**args) == "map" and called
        runtime._validate_tma(args["ptr"], args["dtype"], (args["inner"], args["outer"]),
                              (args["row_stride_bytes"],),
                              (args["box_inner"], args["box_outer"]), args["swizzle_bytes"])
        return
    with pytest.raises(error, match=match):
        encode_tma_2d(**args)


def test_encode_tma_3d_checks_arguments():
    with pytest.raises(ValueError, match="dims"):
        encode_tma_3d(1 << 20, torch.uint8, (128, 64), (128, 8192), (128, 64, 1), 0)
    with pytest.raises(ValueError, match=r"strides_bytes\[1\]"):
        encode_tma_3d(1 << 20, torch.uint8, (128, 64, 4), (128, 4096), (128, 64, 1), 0)


def test_load_kernel_checks_arguments(tmp_path):
    compiled = compiler.CompiledKernel("k", tmp_path / "k.cubin", "", 1, 0, 0.0, True)
    with pytest.raises(TypeError, match="compiled"):
        load_kernel(str(tmp_path / "k.cubin"), "k", 0)
    with pytest.raises(ValueError, match="kernel_name"):
        load_kernel(compiled, "", 0)
    with pytest.raises(ValueError, match="device_index"):
        load_kernel(compiled, "k", -1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_kernel(compiled, "k", 0)


def test_launch_config_is_built_and_checked():
    pytest.importorskip("cuda.bindings.driver")
    runtime._driver()
    kernel = runtime.Kernel("k", 0, None, smem_limit=232448)
    config = kernel._build_config((8, 2), 384, 1024, 2, 0)
    assert (config.gridDimX, config.gridDimY, config.gridDimZ) == (8, 2, 1)
    assert (config.blockDimX, config.sharedMemBytes, config.numAttrs) == (384, 1024, 1)
    assert config.attrs[0].value.clusterDim.x == 2
    assert kernel._build_config(132, 128, 0, 1, 7).numAttrs == 0
    for args, match in [(((0,), 128, 0, 1, 0), "grid"), (([4], 128, 0, 1, 0), "grid"),
                        ((4, 2048, 0, 1, 0), "block"), ((4, 128, 300000, 1, 0), "smem_bytes"),
                        ((5, 128, 0, 2, 0), "cluster"), ((4, 128, 0, 1, -1), "stream")]:
        with pytest.raises(ValueError, match=match):
            kernel._build_config(*args)
    with pytest.raises(ValueError, match="grid"):
        kernel.launch([4], 128, 0, (), (), 0)


def test_num_sms_override_and_checks(monkeypatch):
    monkeypatch.setattr(device, "_override", None)
    with pytest.raises(TypeError, match="n"):
        device.set_num_sms(1.5)
    with pytest.raises(TypeError, match="n"):
        device.set_num_sms(True)
    with pytest.raises(ValueError, match="n"):
        device.set_num_sms(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "_device_sm_count", lambda: 132)
    with pytest.raises(ValueError, match="132 SMs"):
        device.set_num_sms(133)
    assert device.get_num_sms() == 132
    device.set_num_sms(100)
    assert device.get_num_sms() == 100
    device.set_num_sms(None)
    assert device.get_num_sms() == 132


def test_num_sms_without_gpu(monkeypatch):
    from fp8train.ops import get_num_sms, set_num_sms

    monkeypatch.setattr(device, "_override", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="set_num_sms"):
        get_num_sms()
    set_num_sms(78)
    assert get_num_sms() == 78


# ---- on the GPU ---------------------------------------------------------------------------

def _launch_fill(kernel, out, value, stream):
    n = out.numel()
    kernel.launch((n + 127) // 128, 128, 0, (out.data_ptr(), value, n),
                  (ctypes.c_void_p, ctypes.c_float, ctypes.c_int), stream)


@pytest.mark.gpu
def test_launch_writes_a_tensor(cache_dir):
    out = torch.zeros(1000, device="cuda")
    kernel = _kernel("fill")
    _launch_fill(kernel, out, 1.5, torch.cuda.current_stream().cuda_stream)
    torch.testing.assert_close(out.cpu(), 1.5 + torch.arange(1000, dtype=torch.float32))
    assert load_kernel(compile_cubin("test_fill", FILL), "fill", out.device.index) is kernel


@pytest.mark.gpu
def test_launch_from_a_thread_without_cuda_calls(cache_dir):
    # Autograd runs backward on its own thread; our launch can be that thread's first CUDA
    # call, with no driver context current (CUDA_ERROR_INVALID_CONTEXT before the fix).
    import threading

    out = torch.zeros(256, device="cuda")
    kernel = _kernel("fill")
    stream = torch.cuda.current_stream().cuda_stream
    errors = []

    def launch():
        try:
            _launch_fill(kernel, out, 2.5, stream)
        except Exception as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    assert not errors, errors
    torch.testing.assert_close(out.cpu(), 2.5 + torch.arange(256, dtype=torch.float32))


@pytest.mark.gpu
def test_launch_with_cluster_and_large_smem(cache_dir):
    blocks, smem = 8, 160 * 1024
    out = torch.full((2 * blocks,), -1, dtype=torch.int32, device="cuda")
    kernel = _kernel("cluster_ranks")
    kernel.launch(blocks, 128, smem, (out.data_ptr(), smem // 4),
                  (ctypes.c_void_p, ctypes.c_int), torch.cuda.current_stream().cuda_stream,
                  cluster=2)
    got = out.cpu().view(blocks, 2)
    assert got[:, 0].tolist() == [0, 1] * (blocks // 2)
    assert got[:, 1].tolist() == [2] * blocks


def _tma_roundtrip(src, inner, box_inner, box_outer, x, y, swizzle):
    """Load one box of the [rows, inner] view of `src` at element (x, y); return its bytes."""
    box_bytes = box_inner * box_outer * src.element_size()
    out = torch.full((box_bytes,), 0xAB, dtype=torch.uint8, device="cuda")
    desc = encode_tma_2d(src.data_ptr(), src.dtype, inner, src.shape[0],
                         src.stride(0) * src.element_size(), box_inner, box_outer, swizzle)
    _kernel("tma_load_2d").launch(
        1, 128, box_bytes + 16, (desc, out.data_ptr(), x, y, box_bytes),
        (None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int),
        torch.cuda.current_stream().cuda_stream)
    return out.cpu()


@pytest.mark.gpu
def test_tma_load_with_row_stride_and_out_of_bounds_zeros(cache_dir):
    torch.manual_seed(0)
    base = torch.randint(0, 256, (40, 112), dtype=torch.uint8, device="cuda")
    view = base[:, :96]  # 96 valid bytes per row, rows 112 bytes apart
    got = _tma_roundtrip(view, 96, 64, 16, x=64, y=32, swizzle=0).view(16, 64)
    expected = torch.zeros(16, 64, dtype=torch.uint8)
    expected[:8, :32] = view[32:40, 64:96].cpu()  # the rest lies outside the tensor
    assert torch.equal(got, expected)


def _unswizzle_128b(box: torch.Tensor, rows: int) -> torch.Tensor:
    """Undo the 128-byte swizzle of a box of 128-byte rows: 16-byte chunk c of row r is
    stored in chunk c ^ (r % 8)."""
    chunks = box.view(rows, 8, 16)
    index = torch.arange(8).repeat(rows, 1) ^ (torch.arange(rows) % 8).unsqueeze(1)
    return torch.gather(chunks, 1, index.unsqueeze(2).expand(rows, 8, 16)).view(rows, 128)


@pytest.mark.gpu
def test_tma_load_128b_swizzle(cache_dir):
    torch.manual_seed(1)
    src = torch.randint(0, 256, (16, 128), dtype=torch.uint8, device="cuda")
    got = _tma_roundtrip(src, 128, 128, 8, x=0, y=8, swizzle=128)
    assert not torch.equal(got.view(8, 128), src[8:16].cpu())  # it is swizzled
    assert torch.equal(_unswizzle_128b(got, 8), src[8:16].cpu())


@pytest.mark.gpu
def test_tma_load_fp8_and_bf16(cache_dir):
    torch.manual_seed(2)
    a = torch.randn(64, 256, device="cuda").to(torch.float8_e4m3fn)
    got = _tma_roundtrip(a, 256, 128, 64, x=128, y=0, swizzle=128)
    assert torch.equal(_unswizzle_128b(got, 64), a[:, 128:].cpu().view(torch.uint8))
    b = torch.randn(32, 64, device="cuda").to(torch.bfloat16)
    got = _tma_roundtrip(b, 64, 64, 32, x=0, y=0, swizzle=0)
    assert torch.equal(got.view(torch.bfloat16).view(32, 64), b.cpu())


def test_unswizzle_helper_inverts_the_documented_pattern():
    rows = torch.arange(16 * 128, dtype=torch.int64).remainder(251).to(torch.uint8).view(16, 128)
    swizzled = torch.empty_like(rows).view(16, 8, 16)
    for r in range(16):
        for c in range(8):
            swizzled[r, c ^ (r % 8)] = rows[r].view(8, 16)[c]
    assert torch.equal(_unswizzle_128b(swizzled.flatten(), 16), rows)


@pytest.mark.gpu
def test_max_active_clusters_of_a_big_smem_kernel(cache_dir):
    """Clusters of two 160 KB CTAs: at least one fits, at most half the SMs' worth."""
    kernel = _kernel("cluster_ranks")
    fit = kernel.max_active_clusters(128, 160 * 1024, 2)
    print(f"clusters of 2 x 160 KB that fit at once: {fit}")
    assert 1 <= fit <= torch.cuda.get_device_properties(0).multi_processor_count // 2
