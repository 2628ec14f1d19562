"""The modules on a Hopper GPU (skipped without one): every FP8 GEMM and cast of a training
step on the native kernels gives what the reference emulation gives on the same GPU
tensors, up to FP32 summation order; and the layers compile there."""
import copy

import pytest
import torch

from fp8train import ops
from fp8train.nn import FP8Linear, FP8MoE, FP8Recipe
from numerics import rel_err_of_output as rel_err

pytestmark = pytest.mark.gpu

# Native and reference casts are bit-identical; the GEMMs differ only in the order FP32
# partial sums are added, which BF16 outputs mostly round away.
NATIVE_VS_REFERENCE = 1e-2


def step(module, x, grad_out, backend):
    """Forward and backward under `backend`: the output, dx and every parameter gradient."""
    ops.set_backend(backend)
    try:
        module.zero_grad(set_to_none=True)
        if hasattr(module, "weight") and hasattr(module.weight, "main_grad"):
            module.weight.main_grad.zero_()
        x = x.detach().clone().requires_grad_()
        y = module(x)
        y.backward(grad_out)
        torch.cuda.synchronize()
        grads = [p.main_grad.clone() if hasattr(p, "main_grad") else p.grad for p in module.parameters()]
        return [y.detach(), x.grad] + grads
    finally:
        ops.set_backend("auto")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("main_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_native_matches_reference(bias, main_grad, dtype):
    torch.manual_seed(0)
    layer = FP8Linear(1024, 768, bias=bias, device="cuda", dtype=dtype,
                      recipe=FP8Recipe(accumulate_into_main_grad=main_grad))
    if main_grad:
        layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float32)
    x = torch.randn(3, 700, 1024, device="cuda", dtype=dtype)  # 2100 tokens: partial blocks
    grad_out = torch.randn(3, 700, 768, device="cuda", dtype=dtype)
    native = step(layer, x, grad_out, "native")
    reference = step(layer, x, grad_out, "reference")
    for name, got, want in zip(["y", "dx", "weight", "bias"], native, reference):
        assert got is not None and not got.isnan().any(), name
        assert rel_err(got, want) < NATIVE_VS_REFERENCE, name


@pytest.mark.parametrize("shared", [False, True])
def test_fp8_moe_native_matches_reference(shared):
    torch.manual_seed(0)
    moe = FP8MoE(1024, 512, 8, 2, shared_expert_dim=512 if shared else 0, device="cuda",
                 dtype=torch.bfloat16)
    x = torch.randn(2, 1000, 1024, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    native = step(moe, x, grad_out, "native")
    reference = step(moe, x, grad_out, "reference")
    names = ["y", "dx"] + [name for name, _ in moe.named_parameters()]
    for name, got, want in zip(names, native, reference):
        assert got is not None and not got.isnan().any(), name
        assert rel_err(got, want) < NATIVE_VS_REFERENCE, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_linear_on_the_gpu_gives_the_bits_of_the_unfused_layer(dtype):
    """fp8_swiglu_linear on the native kernels (the SwiGLU-fused cast) against fp8_linear on
    F.silu(gate) * up, torch's CUDA ops, on the same kernels: output and every gradient
    bit-identical."""
    from fp8train.nn import fp8_linear, fp8_swiglu_linear

    torch.manual_seed(0)
    gate = torch.randn(300, 512, device="cuda", dtype=dtype) * 4
    up = torch.randn(300, 512, device="cuda", dtype=dtype)
    weight = torch.randn(256, 512, device="cuda", dtype=dtype) / 20
    grad_out = torch.randn(300, 256, device="cuda", dtype=dtype)
    results = []
    for fused in (True, False):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        y = fp8_swiglu_linear(g, u, w) if fused else fp8_linear(torch.nn.functional.silu(g) * u, w)
        y.backward(grad_out)
        results.append([y, g.grad, u.grad, w.grad])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                                            (torch.float32, True)])
def test_swiglu_mlp_on_the_gpu_gives_the_bits_of_three_layers(dtype, autocast):
    """The one-Function SwiGLU MLP on the native kernels (both SwiGLU-fused casts) against
    three FP8 layers reading F.silu(gate) * up made by torch's CUDA ops: output and every
    gradient bit-identical."""
    from fp8train.nn import FP8SwiGLUMLPFunction, swiglu_mlp

    torch.manual_seed(0)
    layers = [FP8Linear(512, 384, bias=False, device="cuda", dtype=dtype),
              FP8Linear(512, 384, bias=False, device="cuda", dtype=dtype),
              FP8Linear(384, 512, bias=False, device="cuda", dtype=dtype)]
    x = torch.randn(3, 100, 512, device="cuda", dtype=dtype)
    grad_out = torch.randn(3, 100, 512, device="cuda", dtype=dtype)
    results = []
    for fused in (True, False):
        for layer in layers:
            layer.weight.grad = None
        xi = x.clone().requires_grad_()
        gate, up, down = layers
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = swiglu_mlp(gate, up, down, xi) if fused else down(torch.nn.functional.silu(gate(xi)) * up(xi))
        assert (y.grad_fn.__class__.__name__ == FP8SwiGLUMLPFunction.__name__ + "Backward") is fused
        y.backward(grad_out.to(y.dtype))
        results.append([y, xi.grad] + [layer.weight.grad for layer in layers])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_moe_experts_as_one_function_on_the_gpu_give_the_bits_of_two_layers(dtype, monkeypatch):
    """The experts' two projections as one Function on the native kernels (SwiGLU's gradient
    made inside the gate_up projection's casts) against the two layers, SwiGLU's backward
    run by torch's CUDA ops: output and every gradient bit-identical."""
    from fp8train.nn import moe as moe_module

    torch.manual_seed(0)
    moe = FP8MoE(512, 256, 8, 2, device="cuda", dtype=dtype)
    x = torch.randn(600, 512, device="cuda", dtype=dtype)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(moe_module, "fuses_expert_block", lambda *args: False)
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.float().square().sum().backward()
        results.append([y, xi.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_fp8_linear_compiles_fullgraph_on_the_gpu():
    torch.manual_seed(0)
    layer = FP8Linear(512, 512, device="cuda", dtype=torch.bfloat16)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(lambda inp: layer(inp).float().square().sum(), fullgraph=True)
    compiled(x).backward()
    x_eager = x.detach().clone().requires_grad_()
    twin(x_eager).float().square().sum().backward()
    assert torch.equal(x.grad, x_eager.grad)
    assert torch.equal(layer.weight.grad, twin.weight.grad)
