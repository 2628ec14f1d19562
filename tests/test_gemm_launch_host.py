"""The native GEMM launcher's host side without a GPU: driver calls stubbed, CPU tensors
standing in for device ones. Checks the parameter blocks it hands the driver: built once
per (kernel, pointers, shapes) and reused, rebuilt when anything in them changes; scales
not in the kernel's layout are staged into one buffer per stream and shape, so a repeated
call still reuses its block."""
import ctypes

import pytest
import torch

from fp8train.ops.jit import device
from fp8train.ops.native import sm90_fp8_gemm as native
from fp8train.quant import per_block_cast, per_token_cast
from fp8train.ops.scale_layout import as_kblock_major


class RecordingKernel:
    def __init__(self):
        self.calls = []

    def launch_params(self, grid, block, smem, params_address, stream, cluster):
        self.calls.append(params_address)


@pytest.fixture
def stubbed(monkeypatch):
    """A launch whose kernel records parameter blocks; TMA encoding stubbed."""
    from fp8train.ops.jit import runtime

    buf = (ctypes.c_uint8 * 128)()

    class FakeMap:
        def getPtr(self):
            return ctypes.addressof(buf)

    monkeypatch.setattr(runtime, "encode_tma_2d", lambda *args: FakeMap())
    monkeypatch.setattr(native, "_raw_stream", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(native._local, "staging", {}, raising=False)
    monkeypatch.setattr(native._local, "blocks", {}, raising=False)
    monkeypatch.setattr(device, "_override", 132)
    kernel = RecordingKernel()
    launches = {}

    def launch_for(m, n, k, kind, *args, **kwargs):
        if (m, n, k, kind) not in launches:  # one launch per problem, as the real cache keeps them
            cfg = native.choose_config(m, n, k, 132, kind)
            launches[m, n, k, kind] = native._Launch(cfg, kernel, 1024, cfg.num_ctas)
        return launches[m, n, k, kind]

    monkeypatch.setattr(native, "_launch_for", launch_for)
    return kernel


def operands(m, n, k):
    """A with its scales row-major (whatever layout the casts write), B 128x128."""
    a = per_token_cast(torch.randn(m, k))
    return (a[0], a[1].contiguous()), per_block_cast(torch.randn(n, k))


def kernel_layout(a):
    """A with its scales stored as the kernel reads them (K-block-major), so no copy is made."""
    return a[0], as_kblock_major(a[1])


def test_repeated_calls_reuse_one_parameter_block(stubbed):
    a, b = operands(256, 256, 512)
    a = kernel_layout(a)
    out = torch.empty(256, 256, dtype=torch.bfloat16)
    for _ in range(3):
        native.fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False)
    assert len(set(stubbed.calls)) == 1
    other_out = torch.empty(256, 256, dtype=torch.bfloat16)
    native.fp8_gemm_nt_native(a[0], a[1], b[0], b[1], other_out, "1d2d", False)
    assert len(set(stubbed.calls)) == 2, "a new output pointer must get its own block"
    params = ctypes.c_void_p.from_address(stubbed.calls[-1] + 2 * 8).value  # slot 2: out
    assert ctypes.c_uint64.from_address(params).value == other_out.data_ptr()


def test_row_major_scales_are_staged_and_the_block_reused(stubbed):
    a, b = operands(128, 128, 384)  # row-major scales: copied into the kernel's layout
    out = torch.empty(128, 128, dtype=torch.bfloat16)
    for _ in range(2):
        native.fp8_gemm_nt_native(a[0], a[1], b[0], b[1], out, "1d2d", False)
    assert len(set(stubbed.calls)) == 1, "the staged copy keeps one pointer: one block"
    (staged,) = native._local.staging.values()
    assert torch.equal(staged[:, :128].t(), a[1]), "the staged buffer holds the scales"
    other = operands(128, 128, 384)[0]
    native.fp8_gemm_nt_native(other[0], other[1], b[0], b[1], out, "1d2d", False)
    assert torch.equal(staged[:, :128].t(), other[1]), "a later call rewrites the staged scales"
