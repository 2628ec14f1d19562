"""FP8Linear / FP8LinearFunction: accuracy against FP32 nn.Linear, bit-exact agreement with
the step-by-step recipe built from fp8train.quant/ops, saved-tensor memory, dtypes,
autocast, main_grad, activation checkpointing and argument checks."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from fp8train.nn import FP8Linear, FP8LinearFunction, FP8Recipe, fp8_linear
from fp8train.ops import fp8_gemm_nt
from fp8train.quant import per_block_cast, per_token_cast, per_token_cast_transposed
from numerics import rand, rel_err

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")

# E4M3 keeps 3 mantissa bits: each quantized operand element is within 2^-4 (half an ulp)
# of itself, relative, away from subnormals. A product of two such operands is then off by
# at most (2 * 2^-4 + 2^-8) of sum |a||b|, elementwise.
PAIR_BOUND = 2 * 2.0**-4 + 2.0**-8


def assert_within_fp8_bound(got, a, b, exact, out_dtype):
    """|got - a b^T| <= (|a| |b|^T) * PAIR_BOUND, plus the rounding of the output dtype."""
    a, b, got, exact = a.double(), b.double(), got.double(), exact.double()
    bound = (a.abs() @ b.abs().t()) * PAIR_BOUND
    rounding = 2.0**-8 if out_dtype in (torch.bfloat16, torch.float16) else 2.0**-20
    assert torch.all((got - exact).abs() <= bound * (1 + rounding) + exact.abs() * rounding)


def run_pair(fp8_module, ref_module, x, grad_out):
    """Forward+backward of both modules on copies of x; returns (fp8, ref) result dicts."""
    results = []
    for module in (fp8_module, ref_module):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        y.backward(grad_out)
        results.append({"y": y, "dx": xi.grad, "dw": module.weight.grad,
                        "db": None if module.bias is None else module.bias.grad})
    return results


@settings(max_examples=20)
@given(batch=st.integers(1, 3), seq=st.integers(1, 130), kb=st.integers(1, 3),
       nb=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), exp=st.integers(-6, 3))
def test_fp8_linear_close_to_fp32_linear(batch, seq, kb, nb, bias, seed, dtype, exp):
    k, n = 128 * kb, 128 * nb
    ref = nn.Linear(k, n, bias=bias)
    torch.manual_seed(seed)
    ref.reset_parameters()
    fp8 = FP8Linear.from_linear(copy.deepcopy(ref).to(dtype))
    x = rand(batch, seq, k, seed=seed + 1, scale=10.0**exp, dtype=dtype)
    grad_out = rand(batch, seq, n, seed=seed + 2, dtype=dtype)
    # The FP32 reference sees exactly the values the FP8 module sees (x, dy, W in `dtype`).
    ref.load_state_dict({key: v.float() for key, v in fp8.state_dict().items()})
    xr = x.float().clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(grad_out.float())
    want = {"y": y_ref.detach(), "dx": xr.grad, "dw": ref.weight.grad,
            "db": ref.bias.grad if bias else None}
    xi = x.detach().clone().requires_grad_()
    y = fp8(xi)
    y.backward(grad_out)
    assert y.dtype == dtype and xi.grad.dtype == dtype and fp8.weight.grad.dtype == dtype
    got = {"y": y, "dx": xi.grad, "dw": fp8.weight.grad, "db": fp8.bias.grad if bias else None}

    x2, dy2, w = x.float().reshape(-1, k), grad_out.float().reshape(-1, n), ref.weight.detach()
    assert_within_fp8_bound(got["y"].reshape(-1, n), x2, w, want["y"].reshape(-1, n), dtype)
    assert_within_fp8_bound(got["dx"].reshape(-1, k), dy2, w.t(), want["dx"].reshape(-1, k), dtype)
    assert_within_fp8_bound(got["dw"], dy2.t(), x2.t(), want["dw"], dtype)
    if bias:
        assert rel_err(got["db"], want["db"]) < (2.0**-7 if dtype == torch.bfloat16 else 1e-5)
    if x2.shape[0] * n >= 4096:  # in aggregate about 2.5-4% on Gaussian data
        for key in ("y", "dx", "dw"):
            assert rel_err(got[key], want[key]) < 0.06, key


def reference_steps(x, w, b, grad_out, pow2):
    """The recipe written out with the public quant/ops calls, no autograd."""
    k, n = w.shape[1], w.shape[0]
    x2, dy2 = x.reshape(-1, k), grad_out.reshape(-1, n)
    out_dtype = torch.bfloat16 if (x.dtype == torch.bfloat16 and b is None) else torch.float32
    y = fp8_gemm_nt(per_token_cast(x2, pow2_scale=pow2), per_block_cast(w, pow2_scale=pow2),
                    out_dtype=out_dtype)
    if b is not None:
        y = y + b.float()
    dx_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    dx = fp8_gemm_nt(per_token_cast(dy2, pow2_scale=pow2),
                     per_block_cast(w.t(), pow2_scale=pow2), out_dtype=dx_dtype)
    pad = -x2.shape[0] % 128
    dw = fp8_gemm_nt(per_token_cast_transposed(F.pad(dy2, (0, 0, 0, pad)), pow2_scale=pow2),
                     per_token_cast_transposed(F.pad(x2, (0, 0, 0, pad)), pow2_scale=pow2),
                     out_dtype=torch.float32)
    return (y.to(x.dtype).reshape(*x.shape[:-1], n), dx.to(x.dtype).reshape(x.shape),
            dw.to(w.dtype), None if b is None else dy2.float().sum(0).to(b.dtype))


@given(t=st.integers(1, 300), kb=st.integers(1, 3), nb=st.integers(1, 3), bias=st.booleans(),
       pow2=st.booleans(), save_fp8_weight=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_linear_bit_exact_with_step_by_step_reference(t, kb, nb, bias, pow2,
                                                          save_fp8_weight, seed, dtype):
    k, n = 128 * kb, 128 * nb
    recipe = FP8Recipe(pow2_scale=pow2, save_fp8_weight=save_fp8_weight)
    module = FP8Linear(k, n, bias=bias, dtype=dtype, recipe=recipe)
    with torch.no_grad():
        module.weight.copy_(rand(n, k, seed=seed, scale=0.05))
    x = rand(t, k, seed=seed + 1, dtype=dtype).requires_grad_()
    grad_out = rand(t, n, seed=seed + 2, dtype=dtype)
    y = module(x)
    y.backward(grad_out)
    y_ref, dx_ref, dw_ref, db_ref = reference_steps(x.detach(), module.weight.detach(),
                                                    module.bias, grad_out, pow2)
    assert torch.equal(y, y_ref)
    assert torch.equal(FP8LinearFunction.apply(x, module.weight, module.bias, recipe, dtype), y)
    assert torch.equal(x.grad, dx_ref)
    assert torch.equal(module.weight.grad, dw_ref)
    if bias:
        assert torch.equal(module.bias.grad, db_ref)


def test_weight_transpose_of_128x128_cast_is_exact():
    w = rand(384, 256, seed=3)
    w_fp8, w_scale = per_block_cast(w)
    wt_fp8, wt_scale = per_block_cast(w.t())
    assert torch.equal(w_fp8.t().float(), wt_fp8.float()) and torch.equal(w_scale.t(), wt_scale)


def saved_bytes(fn, exclude=()):
    """Bytes of the distinct storages autograd saves while running fn(), minus `exclude`."""
    storages = {}
    skip = {p.untyped_storage().data_ptr() for p in exclude}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = (s.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(nbytes for nbytes, _ in storages.values()), storages


@pytest.mark.parametrize("save_fp8_weight", [False, True])
def test_saved_tensor_memory_at_most_055x_of_bf16_linear(save_fp8_weight):
    t, k, n = 1024, 512, 512
    bf16 = nn.Linear(k, n, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(copy.deepcopy(bf16),
                                FP8Recipe(save_fp8_weight=save_fp8_weight))
    x = rand(t, k, seed=0, dtype=torch.bfloat16).requires_grad_()
    if save_fp8_weight:
        # Everything saved counts, the weight included (nn.Linear saves its BF16 weight).
        bf16_bytes, _ = saved_bytes(lambda: bf16(x))
        fp8_bytes, kept = saved_bytes(lambda: fp8(x))
    else:
        # The master weight is saved by reference: it is a live parameter either way, so
        # count what backward keeps alive beyond the parameters.
        bf16_bytes, _ = saved_bytes(lambda: bf16(x), exclude=list(bf16.parameters()))
        fp8_bytes, kept = saved_bytes(lambda: fp8(x), exclude=list(fp8.parameters()))
    assert fp8_bytes <= 0.55 * bf16_bytes, (fp8_bytes, bf16_bytes)
    # No high-precision activation: only FP8 data and their float32 scales.
    assert all(d == torch.float8_e4m3fn or nbytes * 32 <= t * k for nbytes, d in kept.values())


def test_frozen_weight_saves_no_wgrad_copy_and_gives_no_weight_grad():
    module = FP8Linear(256, 256, bias=False)
    module.weight.requires_grad_(False)
    x = rand(64, 256, seed=1).requires_grad_()
    nbytes, _ = saved_bytes(lambda: module(x), exclude=[module.weight])
    assert nbytes == 0
    module(x).sum().backward()
    assert x.grad is not None and module.weight.grad is None


def test_leading_dims_fp16_and_autocast():
    module = FP8Linear(256, 128)
    x = rand(2, 3, 5, 256, seed=2, dtype=torch.float16).requires_grad_()
    y = FP8Linear.from_linear(copy.deepcopy(module).half())(x)
    assert y.shape == (2, 3, 5, 128) and y.dtype == torch.float16
    x32 = rand(4, 7, 256, seed=3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x32)
        assert y.dtype == torch.bfloat16
        ref = nn.Linear(256, 128)
        ref.load_state_dict(module.state_dict())
        assert ref(x32).dtype == y.dtype  # as nn.Linear under autocast
    y.float().sum().backward()
    assert x32.grad.dtype == torch.float32 and module.weight.grad.dtype == torch.float32


def test_zero_tokens():
    module = FP8Linear(128, 256)
    x = torch.zeros(0, 128, requires_grad=True)
    y = module(x)
    assert y.shape == (0, 256)
    y.sum().backward()
    assert torch.equal(module.weight.grad, torch.zeros(256, 128))


def test_main_grad_accumulates_in_fp32_and_leaves_grad_none():
    plain = FP8Linear(256, 128, dtype=torch.bfloat16)
    fused = FP8Linear.from_linear(copy.deepcopy(plain), FP8Recipe(accumulate_into_main_grad=True))
    fused.weight.main_grad = torch.zeros(128, 256)
    x = rand(200, 256, seed=4, dtype=torch.bfloat16)
    grad_out = rand(200, 128, seed=5, dtype=torch.bfloat16)
    plain(x).backward(grad_out)
    for _ in range(2):
        fused(x).backward(grad_out)
    assert fused.weight.grad is None
    fresh = fp8_gemm_nt(per_token_cast_transposed(F.pad(grad_out, (0, 0, 0, 56))),
                        per_token_cast_transposed(F.pad(x, (0, 0, 0, 56))), out_dtype=torch.float32)
    assert torch.equal(fused.weight.main_grad, fresh + fresh)
    assert torch.equal(plain.weight.grad, fresh.bfloat16())
    with pytest.raises(ValueError, match="weight.main_grad"):
        FP8Linear(128, 128, recipe=FP8Recipe(accumulate_into_main_grad=True))(torch.ones(1, 128))


def count_weight_casts(monkeypatch) -> dict:
    """Calls of the 128x128 casts (W alone, W with W^T, W^T alone) and of the FP8 block
    transpose."""
    import fp8train.quant.casts as casts
    from fp8train.nn import _custom_ops

    calls = {"per_block_cast": 0, "per_block_cast_dual": 0, "per_block_cast_transposed": 0,
             "transpose_128x128": 0}
    for module, name in ((casts, "per_block_cast"), (casts, "per_block_cast_dual"),
                         (casts, "per_block_cast_transposed"), (_custom_ops, "transpose_128x128")):
        def counted(*args, _name=name, _original=getattr(module, name), **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("save_fp8_weight", [False, True])
def test_training_step_casts_w_t_from_w(save_fp8_weight, monkeypatch):
    """(W^T)_q is cast from W in one read, never by transposing a cast W: with
    save_fp8_weight in the forward's dual cast (W_q feeds fprop), else in backward by the
    cast that writes (W^T)_q alone."""
    calls = count_weight_casts(monkeypatch)
    module = FP8Linear(256, 384, recipe=FP8Recipe(save_fp8_weight=save_fp8_weight))
    x = rand(70, 256, seed=11).requires_grad_()
    y = module(x)
    assert calls == {"per_block_cast": 0 if save_fp8_weight else 1,
                     "per_block_cast_dual": 1 if save_fp8_weight else 0,
                     "per_block_cast_transposed": 0, "transpose_128x128": 0}
    y.backward(rand(70, 384, seed=12))
    assert calls == {"per_block_cast": 0 if save_fp8_weight else 1,
                     "per_block_cast_dual": 1 if save_fp8_weight else 0,
                     "per_block_cast_transposed": 0 if save_fp8_weight else 1, "transpose_128x128": 0}


def test_save_fp8_weight_with_main_grad():
    """The weight is kept for main_grad even when dgrad reads the saved (W^T)_q."""
    plain = FP8Linear(256, 128)
    fused = FP8Linear.from_linear(copy.deepcopy(plain), FP8Recipe(
        save_fp8_weight=True, accumulate_into_main_grad=True))
    fused.weight.main_grad = torch.zeros(128, 256)
    x, grad_out = rand(64, 256, seed=13), rand(64, 128, seed=14)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    plain(xs[0]).backward(grad_out)
    fused(xs[1]).backward(grad_out)
    assert fused.weight.grad is None and torch.equal(fused.weight.main_grad, plain.weight.grad)
    assert torch.equal(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_identical_gradients(use_reentrant):
    torch.manual_seed(0)
    block = nn.Sequential(FP8Linear(256, 384), nn.GELU(), FP8Linear(384, 256))
    x = rand(3, 50, 256, seed=6).requires_grad_()
    block(x).square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in block.parameters()]
    x2 = x.detach().clone().requires_grad_()
    block.zero_grad()
    checkpoint(block, x2, use_reentrant=use_reentrant).square().sum().backward()
    for a, b in zip(grads, [x2.grad] + [p.grad for p in block.parameters()]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["wgrad_hp", "fprop_only"])
def test_high_precision_gemms_of_partial_recipes_match_fp32(name):
    ref = nn.Linear(256, 128)
    module = FP8Linear.from_linear(copy.deepcopy(ref), FP8Recipe.from_name(name))
    x, grad_out = rand(64, 256, seed=7), rand(64, 128, seed=8)
    got, want = run_pair(module, ref, x, grad_out)
    assert rel_err(got["y"], want["y"]) < 0.06 and rel_err(got["y"], want["y"]) > 0
    assert torch.allclose(got["dw"], want["dw"], rtol=1e-5, atol=1e-5)
    if name == "fprop_only":
        assert torch.allclose(got["dx"], want["dx"], rtol=1e-5, atol=1e-5)


def test_drop_in_for_nn_linear():
    ref = nn.Linear(256, 128)
    module = FP8Linear.from_linear(ref)
    assert isinstance(module, nn.Linear)
    assert module.weight is ref.weight and module.bias is ref.bias
    assert list(module.state_dict()) == list(ref.state_dict())
    fresh = FP8Linear(256, 128, bias=False, dtype=torch.bfloat16)
    assert fresh.weight.dtype == torch.bfloat16 and fresh.bias is None
    assert "recipe=FP8Recipe" in repr(fresh)


def test_argument_checks_name_the_argument():
    with pytest.raises(ValueError, match="in_features"):
        FP8Linear(100, 128)
    with pytest.raises(ValueError, match="out_features"):
        FP8Linear(128, 200)
    with pytest.raises(TypeError, match="in_features"):
        FP8Linear(128.0, 128)
    with pytest.raises(TypeError, match="recipe"):
        FP8Linear(128, 128, recipe="deepseek_v3")
    with pytest.raises(TypeError, match="linear"):
        FP8Linear.from_linear(nn.Conv1d(1, 1, 1))
    module = FP8Linear(128, 128)
    with pytest.raises(ValueError, match="x"):
        module(torch.ones(4, 256))
    with pytest.raises(TypeError, match="x"):
        module(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="x"):
        fp8_linear([1.0], module.weight)
    with pytest.raises(ValueError, match="bias"):
        fp8_linear(torch.ones(2, 128), module.weight, torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        fp8_linear(torch.ones(2, 100), torch.ones(128, 100))
    with pytest.raises(TypeError, match="recipe"):
        fp8_linear(torch.ones(2, 128), module.weight, recipe={})
    with pytest.raises(ValueError, match="backend"):
        FP8Recipe(backend="fastest")


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the operators that run (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_inference_casts_no_column_wise_copy():
    module = FP8Linear(256, 128)
    x = rand(64, 256, seed=9)
    with torch.no_grad(), OpLog() as log:
        y = module(x)
    assert any("fp8train.cast_1x128." in n for n in log.names)
    assert not any("colwise" in n or "both" in n for n in log.names)
    assert torch.equal(y, module(x))


def test_recipe_validation_and_presets():
    assert FP8Recipe.from_name("deepseek_v3") == FP8Recipe()
    assert FP8Recipe.from_name("deepseek_v3_pow2").pow2_scale
    assert not FP8Recipe.from_name("fprop_only", pow2_scale=True).dgrad_fp8
    with pytest.raises(ValueError, match="name"):
        FP8Recipe.from_name("fastest")
    with pytest.raises(TypeError, match="pow2_scale"):
        FP8Recipe(pow2_scale=1)
    with pytest.raises(TypeError, match="wgrad_fp8"):
        FP8Recipe(wgrad_fp8="yes")
    with pytest.raises(ValueError, match="accumulate_into_main_grad"):
        FP8Recipe(accumulate_into_main_grad=True, wgrad_fp8=False)
    with pytest.raises(Exception, match="cannot assign"):
        FP8Recipe().pow2_scale = True  # frozen


def test_recipe_backend_is_applied_per_layer():
    import fp8train

    before = fp8train.get_backend()
    module = FP8Linear(128, 128, recipe=FP8Recipe(backend="native"))
    with pytest.raises(RuntimeError, match="native"):
        module(torch.ones(4, 128))  # no native kernels on a CPU tensor: raises, no fallback
    assert fp8train.get_backend() == before  # restored after the call
    assert torch.equal(FP8Linear.from_linear(module, FP8Recipe(backend="reference"))(
        torch.ones(4, 128)), FP8Linear.from_linear(module)(torch.ones(4, 128)))


def test_recipe_backends_in_threads_never_touch_the_process_wide_backend(monkeypatch):
    """The recipe's backend travels as an argument: layers with different backends running in
    two threads leave ``get_backend()`` as it was, and a third thread watching it all along
    only ever sees the process-wide value."""
    import threading

    import fp8train
    from fp8train.ops import backend as backend_module

    before = fp8train.get_backend()
    seen, errors, stop = set(), [], threading.Event()
    resolved = []
    original = backend_module.resolve

    def recording_resolve(op, device, **kwargs):
        resolved.append(kwargs.get("backend"))
        return original(op, device, **kwargs)

    monkeypatch.setattr(backend_module, "resolve", recording_resolve)

    def watch():
        while not stop.wait(0.0005):  # look often, without holding the GIL all the time
            seen.add(fp8train.get_backend())

    def train(recipe):
        try:
            layer = FP8Linear(128, 128, recipe=recipe)
            for _ in range(5):
                x = torch.randn(8, 128, requires_grad=True)
                layer(x).sum().backward()
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=train, args=(FP8Recipe(backend=name),))
               for name in ("reference", "auto")]
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert fp8train.get_backend() == before and seen == {before}
    assert {"reference", "auto"} <= set(resolved)  # each layer's GEMMs saw its own backend


def test_eager_layers_call_the_op_bodies_directly(monkeypatch):
    """Eager FP8 layers run the cast and GEMM bodies without a trip through the
    dispatcher (its host cost per call is what an eager step waits on): with the registered
    ops made to fail, forward and backward still run and give the same gradients."""
    from fp8train.nn import _custom_ops

    torch.manual_seed(0)
    layer = FP8Linear(256, 128)
    x = torch.randn(2, 64, 256, requires_grad=True)
    layer(x).sum().backward()
    want = x.grad.clone(), layer.weight.grad.clone()

    def fail(*args):
        raise AssertionError("an eager call went through the registered op")

    for name in ("cast_1x128", "cast_1x128_both", "cast_1x128_colwise", "cast_128x128",
                 "cast_128x128_dual", "cast_128x128_transposed", "gemm_nt", "fprop_cast_weight",
                 "linear_grads"):
        monkeypatch.setattr(getattr(_custom_ops, name), "op", fail)
    x.grad = layer.weight.grad = None
    layer(x).sum().backward()
    assert torch.equal(x.grad, want[0]) and torch.equal(layer.weight.grad, want[1])


def test_output_of_3d_input_is_not_a_view():
    """Like nn.Linear's: FSDP2 drops its pre-backward hook from a view output after an
    in-place op downstream (and warns about every view output), so the layer's [B, S, N]
    output must own its shape; in-place use keeps gradients right."""
    torch.manual_seed(0)
    layer = FP8Linear(256, 128)
    x = torch.randn(2, 64, 256, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 64, 128) and y._base is None
    y.add_(1.0)
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    layer(ref).sum().backward()
    assert torch.equal(x.grad, ref.grad)
