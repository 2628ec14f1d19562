"""The layer benchmark's correctness half runs on CPU at toy sizes (the timing half needs a
GPU and runs on the device: python -m fp8train.bench linear|moe)."""
import warnings

import torch

from fp8train.bench.layers import LIMITS, build_linear, build_moe, compare, step_fn

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


def test_linear_comparison_is_within_fp8_bounds():
    base, fp8 = build_linear(256, 256, 384, "cpu")
    x = torch.randn(256, 256, dtype=torch.bfloat16)
    grad = torch.randn(256, 384, dtype=torch.bfloat16)
    errors = compare(base, fp8, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["linear"]))
    step_fn(fp8, x.clone().requires_grad_(True), grad)()  # the timed closure runs


def test_moe_comparison_is_within_fp8_bounds():
    base, fp8 = build_moe(256, 256, 128, 4, 2, "cpu")
    x = torch.randn(256, 256, dtype=torch.bfloat16)
    grad = torch.randn(256, 256, dtype=torch.bfloat16)
    errors = compare(base, fp8, x, grad)
    assert all(errors[key] < limit for key, limit in zip(("out", "dx", "dw"), LIMITS["moe"]))
