"""The layer benchmark's correctness half runs on CPU at toy sizes (the timing half needs a
GPU and runs on the device: python -m benchmarks linear|moe)."""
import warnings

import torch

from benchmarks.layers import LIMITS, LayerByLayerFP8MoE, LayerByLayerSwiGLUMLP, build_linear, build_mlp, build_moe, compare, step_fn

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


def test_linear_comparison_is_within_fp8_bounds():
    base, fp8 = build_linear(256, 256, 384, "cpu")
    x = torch.randn(256, 256, dtype=torch.bfloat16)
    grad = torch.randn(256, 384, dtype=torch.bfloat16)
    errors = compare(base, fp8, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["linear"]))
    step_fn(fp8, x.clone().requires_grad_(True), grad)()  # the timed closure runs


def test_moe_comparison_is_within_fp8_bounds(monkeypatch):
    from fp8train.nn.grouped_swiglu import FP8GroupedSwiGLUFunction

    base, fp8 = build_moe(256, 256, 128, 4, 2, "cpu")
    x = torch.randn(256, 256, dtype=torch.bfloat16)
    grad = torch.randn(256, 256, dtype=torch.bfloat16)
    errors = compare(base, fp8, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["moe"]))
    # The experts as two layer Functions (the bench's comparison row): the same bits, and
    # not the one expert-block Function.
    seen = []
    original = FP8GroupedSwiGLUFunction.apply
    monkeypatch.setattr(FP8GroupedSwiGLUFunction, "apply", lambda *a: seen.append(1) or original(*a))
    two_layers = LayerByLayerFP8MoE(fp8)
    assert compare(fp8, two_layers, x, grad) == {"out": 0.0, "dx": 0.0, "dw": 0.0}
    seen.clear()
    two_layers(x.clone().requires_grad_()).float().sum().backward()
    assert seen == []


def test_mlp_comparison_is_within_fp8_bounds_and_the_unfused_twin_gives_the_same_bits():
    base, fp8 = build_mlp(256, 256, 384, "cpu")
    x = torch.randn(256, 256, dtype=torch.bfloat16)
    grad = torch.randn(256, 256, dtype=torch.bfloat16)
    errors = compare(base, fp8, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["mlp"])), errors
    for fuse_product in (True, False):  # the one Function and the three layers: the same bits
        assert compare(fp8, LayerByLayerSwiGLUMLP(fp8, fuse_product), x, grad) == {"out": 0.0, "dx": 0.0, "dw": 0.0}


def test_tensorwise_stand_in_is_a_working_fp8_linear():
    """The torchao-style reference the linear bench times next to ours computes the layer
    (per-tensor scales: looser than 1x128, still within a few percent on Gaussian data)."""
    from benchmarks.tensorwise_linear import TensorwiseFP8Linear

    base, _ = build_linear(256, 256, 384, "cpu")
    twin = TensorwiseFP8Linear(256, 384, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        twin.weight.copy_(base.weight)
    x = torch.randn(2, 128, 256, dtype=torch.bfloat16)
    grad = torch.randn(2, 128, 384, dtype=torch.bfloat16)
    errors = compare(base, twin, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["linear"])), errors
