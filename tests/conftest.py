import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The repo root: tests import the benchmarks (benchmarks/) and recipes (recipes/), which are
# not installed with the package; `pytest` alone (not only `python -m pytest`) finds them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# CI has 2 cores: keep example counts modest, no deadlines (first calls compile/warm up).
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an sm_90 (Hopper) GPU; skipped elsewhere")


# FP8TRAIN_REQUIRE_GPU=1 (the GPU test script sets it): a GPU test that would be skipped
# (no Hopper GPU, no toolchain, no cuda-bindings, any skip inside it) fails instead, so a GPU
# run cannot pass by running nothing.
REQUIRE_GPU = os.environ.get("FP8TRAIN_REQUIRE_GPU", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if _has_hopper() or REQUIRE_GPU:
        return
    skip = pytest.mark.skip(reason="needs an sm_90 (Hopper) GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if REQUIRE_GPU and "gpu" in item.keywords and not _has_hopper():
        pytest.fail("FP8TRAIN_REQUIRE_GPU=1: this GPU test needs an sm_90 (Hopper) GPU, and there is none",
                    pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_GPU and "gpu" in item.keywords and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"FP8TRAIN_REQUIRE_GPU=1: a GPU test was skipped: {report.longrepr}"


@pytest.fixture
def native_backend():
    """Force the native kernels for one test (GPU tests of the native paths)."""
    from fp8train import ops

    ops.set_backend("native")
    yield
    ops.set_backend("auto")
