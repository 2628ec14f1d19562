"""Sibling FP8Linears reading one input (q/k/v, gate/up) cast it once: same results as
separate casts, one cast call, one saved column-wise copy, and never a stale cast."""
import gc
import warnings

import pytest
import torch

from fp8train.nn import FP8Linear, FP8Recipe, _custom_ops, shared_input_cast
from numerics import rand

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


@pytest.fixture
def cast_calls(monkeypatch):
    """Counts the activation casts the layers make (forward and backward)."""
    calls = []
    original = _custom_ops.cast_1x128_layouts

    def counted(x_hp, pow2_scale, rowwise, colwise, backend=""):
        calls.append((tuple(x_hp.shape), rowwise, colwise))
        return original(x_hp, pow2_scale, rowwise, colwise, backend)

    monkeypatch.setattr(_custom_ops, "cast_1x128_layouts", counted)
    shared_input_cast.clear()
    yield calls
    shared_input_cast.clear()


def siblings(recipe=None, seed=0):
    torch.manual_seed(seed)
    return [FP8Linear(256, n, bias=False, recipe=recipe) for n in (256, 128, 384)]


def test_siblings_share_one_cast_and_match_separate_casts(cast_calls):
    layers = siblings()
    x = rand(2, 80, 256, seed=1).requires_grad_()
    outs = [layer(x) for layer in layers]
    forward_casts = [c for c in cast_calls if c[0] == (160, 256)]
    assert len(forward_casts) == 1  # one cast of x for the three layers
    sum(o.float().square().sum() for o in outs).backward()
    shared_dw = [layer.weight.grad for layer in layers]

    # The same layers, each on its own copy of x (no sharing possible).
    for layer in layers:
        layer.weight.grad = None
    alone = []
    for layer in layers:
        xi = x.detach().clone().requires_grad_()
        out = layer(xi)
        out.float().square().sum().backward()
        alone.append((out, xi.grad, layer.weight.grad.clone()))
        layer.weight.grad = None
    assert all(torch.equal(o, a[0]) for o, a in zip(outs, alone))
    assert all(torch.equal(dw, a[2]) for dw, a in zip(shared_dw, alone))
    # dx: the same three terms; autograd adds them in its own order.
    torch.testing.assert_close(x.grad, sum(a[1] for a in alone), rtol=1e-6, atol=1e-6)


def test_in_place_update_or_another_scale_rule_recasts(cast_calls):
    a, b, _ = siblings()
    x = rand(64, 256, seed=2)
    a(x)
    x.mul_(2.0)  # same tensor, new values: the cached cast is stale
    y = b(x)
    assert len(cast_calls) == 2
    pow2 = FP8Linear(256, 128, bias=False, recipe=FP8Recipe(pow2_scale=True))
    pow2(x)
    assert len(cast_calls) == 3
    assert torch.equal(y, b(x.clone()))  # the recast saw the new values


def test_inference_cast_is_not_reused_for_training(cast_calls):
    a, b, _ = siblings()
    x = rand(64, 256, seed=3).requires_grad_()
    with torch.no_grad():
        a(x)  # row-wise only
    b(x).sum().backward()  # needs the column-wise copy too: a new cast
    forward_casts = [c for c in cast_calls if c[0] == (64, 256)]
    assert forward_casts == [((64, 256), True, False), ((64, 256), True, True)]


def test_siblings_save_one_column_wise_copy():
    """Three layers on one input keep one FP8 copy of it for wgrad, not three."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    layers = siblings()
    x = rand(256, 256, seed=4).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    fp8_bytes = sum(n for n, d in storages.values() if d == torch.float8_e4m3fn)
    assert fp8_bytes == x.numel()  # one e4m3 byte per element of x, saved once
    del outs


def test_cache_entry_dies_with_its_input(cast_calls):
    layer = siblings()[0]
    x = rand(64, 256, seed=5)
    layer(x)
    assert shared_input_cast.cached()
    del x
    gc.collect()
    assert not shared_input_cast.cached()
