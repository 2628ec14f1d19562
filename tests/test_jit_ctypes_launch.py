"""The ctypes launch path (fp8train/ops/jit/ctypes_launch.py): its structs match cuda.h
byte for byte (checked with the host C compiler, no GPU), and on a GPU it launches what the
cuda-bindings path launches (in a subprocess: a wrong struct would crash, not fail)."""
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fp8train.ops.jit.ctypes_launch import LaunchAttribute, LaunchConfig

LAYOUT_PROBE = r"""
#include <cuda.h>
#include <stddef.h>
#include <stdio.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, hStream),
           offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs),
           sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),
           offsetof(CUlaunchAttributeValue, clusterDim.x));
    printf("%d\n", (int)CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION);
    return 0;
}
"""


def _cuda_include() -> Path | None:
    from fp8train.ops.jit.toolkit import nvcc_path

    try:
        include = Path(nvcc_path()).resolve().parent.parent / "include"
    except RuntimeError:
        return None
    return include if (include / "cuda.h").exists() else None


def test_structs_match_cuda_h(tmp_path):
    include, cc = _cuda_include(), shutil.which("cc") or shutil.which("gcc")
    if include is None or cc is None:
        pytest.skip("needs cuda.h and a host C compiler")
    (tmp_path / "probe.c").write_text(LAYOUT_PROBE)
    subprocess.run([cc, "-I", str(include), "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")],
                   check=True, capture_output=True)
    sizes, cluster_id = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True,
                                       text=True).stdout.splitlines()
    assert [int(v) for v in sizes.split()] == [
        ctypes.sizeof(LaunchConfig), LaunchConfig.hStream.offset, LaunchConfig.attrs.offset,
        LaunchConfig.numAttrs.offset, ctypes.sizeof(LaunchAttribute), LaunchAttribute.value.offset, 0]
    from fp8train.ops.jit.ctypes_launch import CLUSTER_DIMENSION

    assert int(cluster_id) == CLUSTER_DIMENSION


GPU_SCRIPT = r"""
import ctypes, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from test_jit_runtime import CLUSTER, FILL
from fp8train.ops.jit import compile_cubin, load_kernel, runtime

def param_block(slots):
    # The void* array pointing at one ctypes value per kernel parameter.
    return slots, (ctypes.c_void_p * len(slots))(*[ctypes.addressof(s) for s in slots])

results = {}
for launcher in ("bindings", "ctypes"):
    runtime._launcher = launcher
    n = 1000
    out = torch.zeros(n, device="cuda")
    fill = load_kernel(compile_cubin("test_fill", FILL), "fill", 0)
    slots, array = param_block([ctypes.c_uint64(out.data_ptr()), ctypes.c_float(1.5), ctypes.c_int(n)])
    stream = torch.cuda.current_stream().cuda_stream
    fill.launch_params((n + 127) // 128, 128, 0, ctypes.addressof(array), stream)
    assert torch.equal(out.cpu(), 1.5 + torch.arange(n, dtype=torch.float32)), launcher
    ranks = torch.full((16,), -1, dtype=torch.int32, device="cuda")
    cluster = load_kernel(compile_cubin("test_cluster", CLUSTER), "cluster_ranks", 0)
    slots2, array2 = param_block([ctypes.c_uint64(ranks.data_ptr()), ctypes.c_int(160 * 256)])
    cluster.launch_params(8, 128, 160 * 1024, ctypes.addressof(array2), stream, 2)
    got = ranks.cpu().view(8, 2)
    assert got[:, 0].tolist() == [0, 1] * 4 and got[:, 1].tolist() == [2] * 8, (launcher, got)
    torch.cuda._sleep(100_000_000)
    t0 = time.perf_counter()
    for _ in range(2000):
        fill.launch_params((n + 127) // 128, 128, 0, ctypes.addressof(array), stream)
    results[launcher] = (time.perf_counter() - t0) / 2000 * 1e6
    torch.cuda.synchronize()
print("launch us:", " ".join(f"{k} {v:.1f}" for k, v in results.items()))
print("OK")
"""


@pytest.mark.gpu
def test_ctypes_launch_matches_bindings_on_the_gpu(tmp_path):
    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(tests)], capture_output=True, text=True,
                          timeout=300, cwd=tests.parent)
    print(proc.stdout)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
