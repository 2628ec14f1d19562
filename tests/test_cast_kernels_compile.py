"""The native FP8 casts compile for sm_90a without spills (no LDL/STL in the SASS) and keep
their 16-byte global loads and stores (LDG.E.128 / STG.E.128). Needs nvcc and
cuobjdump/nvdisasm; no GPU. A representative set (every kernel, every dtype, both scale
rules at least once) keeps CI at a few seconds on 2 cores."""
import concurrent.futures
import re

import pytest
import torch

from fp8train.quant import native
from test_gemm_kernels_compile import needs_toolchain

# (kind, dtype, pow2): every kind and dtype, both scale rules; the register-heaviest (fp32
# and non-pow2, which carries the division's range branch) included.
REPRESENTATIVE = [
    ("dual_async", torch.bfloat16, False), ("dual_async", torch.float16, True),
    ("dual_async", torch.float32, False), ("dual_async", torch.bfloat16, True),
    ("per_token", torch.float16, True), ("per_token", torch.bfloat16, False),
    ("block", torch.bfloat16, False), ("block", torch.float32, False), ("block", torch.float16, True),
    ("swiglu_dual", torch.bfloat16, False), ("swiglu_dual", torch.float32, True),
    ("swiglu_backward_dual", torch.bfloat16, False), ("swiglu_backward_dual", torch.float32, True),
]


@needs_toolchain
def test_cast_kernels_compile_without_spills(tmp_path, monkeypatch):
    from fp8train.ops.jit import compiler
    from fp8train.ops.jit.sass import disassemble, summarize_sass

    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", str(tmp_path))
    compiler._reset_process_caches()

    def build(case):
        return compiler.compile_cubin(native.compiled_name(*case), native.render_source(*case))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        compiled = list(pool.map(build, REPRESENTATIVE))
    for (kind, dtype, pow2), ck in zip(REPRESENTATIVE, compiled):
        sass = disassemble(ck.cubin_path)
        report = summarize_sass(sass)
        assert ck.spill_bytes == 0 and report.local_memory_ops == 0, f"{ck.name}: spills"
        # The staged dual cast loads with cp.async (LDGSTS) straight into shared memory.
        load = r"\bLDGSTS\.E\.BYPASS\.128" if kind in ("dual_async", "swiglu_dual", "swiglu_backward_dual") else r"\bLDG\.E\.128"
        assert re.search(load, sass), f"{ck.name}: no 16-byte loads"
        assert re.search(r"\bSTG\.E\.128", sass), f"{ck.name}: no 16-byte e4m3 stores"
        assert ck.registers <= 128, f"{ck.name}: {ck.registers} registers"
        if kind == "dual_async" and dtype != torch.float32:  # 6 blocks of 256 threads per SM
            assert ck.registers <= 40, f"{ck.name}: {ck.registers} registers (6 blocks need <= 40)"
        if kind == "swiglu_dual" and dtype != torch.float32:  # 3 blocks of 256 threads per SM
            assert ck.registers <= 80, f"{ck.name}: {ck.registers} registers (3 blocks need <= 80)"
        if kind == "swiglu_backward_dual" and dtype != torch.float32:  # 2 blocks of 512 threads per SM
            assert ck.registers <= 64, f"{ck.name}: {ck.registers} registers (2 blocks need <= 64)"


def test_render_source_names_each_kernel():
    for kind in native.KINDS:
        source = native.render_source(kind, torch.bfloat16, True)
        assert native.kernel_name(kind) in source and "__nv_bfloat16, true" in source
