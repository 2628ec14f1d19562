"""SwiGLU fused into a down projection's FP8 input casts (fp8_swiglu_linear, FP8Linear's
swiglu_up, swiglu_linear): the same bits as fp8_linear on F.silu(gate) * up, output and
every gradient, for every recipe; the product made in high precision only where a
high-precision GEMM reads it; compiled in one graph."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8train.nn import (FP8Linear, FP8Recipe, FP8SwiGLUMLPFunction, SwiGLUMLP, fp8_linear, fp8_swiglu_linear,
                         fp8_swiglu_mlp, swiglu_linear, swiglu_mlp)
from fp8train.quant import casts
from numerics import rand

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")

RECIPES = [FP8Recipe(), FP8Recipe(pow2_scale=True, save_fp8_weight=True), FP8Recipe.from_name("wgrad_hp"),
           FP8Recipe.from_name("fprop_only"), FP8Recipe(fprop_fp8=False), FP8Recipe(dgrad_fp8=False)]


def count_fused(monkeypatch) -> list:
    calls = []
    original = casts.swiglu_cast
    monkeypatch.setattr(casts, "swiglu_cast", lambda *a, **kw: calls.append(kw.get("colwise", True))
                        or original(*a, **kw))
    return calls


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.float32, True)])
def test_swiglu_linear_equals_linear_on_silu_gate_times_up(recipe, dtype, bias, monkeypatch):
    calls = count_fused(monkeypatch)
    torch.manual_seed(0)
    weight = rand(256, 128, seed=1, dtype=dtype).requires_grad_()
    b = rand(256, seed=2, dtype=dtype).requires_grad_() if bias else None
    gate, up = rand(2, 100, 128, seed=3, dtype=dtype), rand(2, 100, 128, seed=4, dtype=dtype) * 3
    grad_out = rand(2, 100, 256, seed=5, dtype=dtype)
    results = []
    for fused in (True, False):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        bb = None if b is None else b.detach().clone().requires_grad_()
        y = fp8_swiglu_linear(g, u, w, bb, recipe) if fused else fp8_linear(F.silu(g) * u, w, bb, recipe)
        y.backward(grad_out)
        results.append([y, g.grad, u.grad, w.grad] + ([bb.grad] if bias else []))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    fused_path = recipe.fprop_fp8 and recipe.wgrad_fp8
    assert calls == ([True] if fused_path else [])
    calls.clear()
    with torch.no_grad():  # inference: the row-wise cast alone
        assert torch.equal(fp8_swiglu_linear(gate, up, weight, b, recipe), results[0][0])
    assert calls == ([False] if recipe.fprop_fp8 else [])


def test_fp8_linear_swiglu_up_goes_through_the_module_call(monkeypatch):
    """FP8Linear(gate, swiglu_up=up) runs through nn.Module.__call__ (FSDP2's hooks see it),
    and swiglu_linear picks it for an FP8Linear, the product for anything else."""
    layer = FP8Linear(128, 256, bias=False)
    seen = []
    layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    gate, up = rand(64, 128, seed=1), rand(64, 128, seed=2)
    assert torch.equal(swiglu_linear(layer, gate, up), fp8_linear(F.silu(gate) * up, layer.weight))
    assert seen == [["swiglu_up"]]
    plain = nn.Linear(128, 256, bias=False)
    assert torch.equal(swiglu_linear(plain, gate, up), plain(F.silu(gate) * up))


def test_converted_swiglu_mlp_matches_its_unfused_self_and_compiles(monkeypatch):
    calls = count_fused(monkeypatch)
    torch.manual_seed(0)
    mlp = SwiGLUMLP(128, 256)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, FP8Linear.from_linear(getattr(mlp, name)))
    unfused = copy.deepcopy(mlp)
    unfused.forward = lambda x: unfused.down_proj(F.silu(unfused.gate_proj(x)) * unfused.up_proj(x))
    x = rand(3, 40, 128, seed=5)
    grads = []
    for module in (mlp, unfused):
        xi = x.clone().requires_grad_()
        module(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert calls == [True]
    compiled = torch.compile(lambda inp: mlp(inp).square().sum(), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), mlp(x).square().sum())


def test_swiglu_argument_checks():
    w = torch.ones(256, 128)
    with pytest.raises(ValueError, match=r"up: expected gate's shape \(4, 128\)"):
        fp8_swiglu_linear(torch.ones(4, 128), torch.ones(5, 128), w)
    with pytest.raises(TypeError, match="up"):
        fp8_swiglu_linear(torch.ones(4, 128), torch.ones(4, 128, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"gate: expected shape \[\.\.\., 128\]"):
        fp8_swiglu_linear(torch.ones(4, 64), torch.ones(4, 64), w)


def test_fused_mlp_keeps_no_swiglu_product_for_backward():
    """What a step keeps for backward (parameters aside): the BF16 MLP keeps x, gate, silu(gate),
    up and the product; the FP8 MLP keeps gate and up and FP8 copies of x and the product,
    about 0.62x here; making the product first would also keep silu(gate) for the product's
    backward."""
    from test_nn_linear import saved_bytes

    t, hidden, inter = 1024, 256, 1024
    bf16 = SwiGLUMLP(hidden, inter, dtype=torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(fp8, name, FP8Linear.from_linear(getattr(fp8, name)))
    x = rand(t, hidden, seed=0, dtype=torch.bfloat16).requires_grad_()

    def unfused():
        return fp8.down_proj(F.silu(fp8.gate_proj(x)) * fp8.up_proj(x))

    bf16_bytes, _ = saved_bytes(lambda: bf16(x), exclude=list(bf16.parameters()))
    fused_bytes, _ = saved_bytes(lambda: fp8(x), exclude=list(fp8.parameters()))
    unfused_bytes, _ = saved_bytes(unfused, exclude=list(fp8.parameters()))
    assert fused_bytes <= 0.65 * bf16_bytes, (fused_bytes, bf16_bytes)
    assert unfused_bytes - fused_bytes >= t * inter * 2, (unfused_bytes, fused_bytes)


def _three_fp8_layers(dtype=torch.float32, bias=False, recipe=None):
    torch.manual_seed(0)
    return [FP8Linear(128, 256, bias=bias, dtype=dtype, recipe=recipe),
            FP8Linear(128, 256, bias=bias, dtype=dtype, recipe=recipe),
            FP8Linear(256, 128, bias=bias, dtype=dtype, recipe=recipe)]


def _mlp_step(layers, x, grad_out, fused: bool, autocast: bool = False):
    for layer in layers:
        layer.zero_grad()
    xi = x.clone().requires_grad_()
    gate, up, down = layers
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = swiglu_mlp(gate, up, down, xi) if fused else down(F.silu(gate(xi)) * up(xi))
    y.backward(grad_out.to(y.dtype))
    return y, [y, xi.grad] + [p.grad for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                                            (torch.float32, True)])
def test_swiglu_mlp_is_one_function_with_the_bits_of_three_layers(dtype, autocast, monkeypatch):
    """Three bias-free FP8 layers of the default recipe run as one Function: SwiGLU's
    gradients made inside their casts (one swiglu_backward_cast), and output and every
    gradient the bits of the three layers reading F.silu(gate) * up."""
    calls = []
    original = casts.swiglu_backward_cast
    monkeypatch.setattr(casts, "swiglu_backward_cast", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    layers = _three_fp8_layers(dtype)
    x, grad_out = rand(2, 70, 128, seed=1, dtype=dtype), rand(2, 70, 128, seed=2)
    y, fused = _mlp_step(layers, x, grad_out, True, autocast)
    assert type(y.grad_fn).__name__ == FP8SwiGLUMLPFunction.__name__ + "Backward"
    assert calls == [1]
    _, unfused = _mlp_step(layers, x, grad_out, False, autocast)
    for got, want in zip(fused, unfused):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["bias", "save_fp8_weight", "frozen weight", "hook", "global hook",
                                  "no input grad", "no_grad"])
def test_swiglu_mlp_runs_the_layers_where_one_function_does_not_fit(case):
    """Biases, another recipe, a frozen weight, a hook on a layer, an input without a
    gradient or inference: the three layers run as they are (the same results)."""
    layers = _three_fp8_layers(bias=case == "bias",
                               recipe=FP8Recipe(save_fp8_weight=True) if case == "save_fp8_weight" else None)
    if case == "frozen weight":
        layers[1].weight.requires_grad_(False)
    seen = []
    if case == "hook":
        handle = layers[0].register_forward_hook(lambda *args: seen.append(1))
    if case == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda *args: seen.append(1))
    x = rand(70, 128, seed=1).requires_grad_(case != "no input grad")
    try:
        with torch.set_grad_enabled(case != "no_grad"):
            y = swiglu_mlp(*layers, x)
            want = layers[2](F.silu(layers[0](x)) * layers[1](x))
    finally:
        if "hook" in case:
            handle.remove()
    assert y.grad_fn is None or type(y.grad_fn).__name__ != FP8SwiGLUMLPFunction.__name__ + "Backward"
    assert torch.equal(y, want)
    assert seen == {"hook": [1, 1], "global hook": [1] * 6}.get(case, [])


def test_swiglu_mlp_compiles_in_one_graph_with_eager_gradients():
    layers = _three_fp8_layers()
    x, grad_out = rand(2, 70, 128, seed=1), rand(2, 70, 128, seed=2)
    compiled = torch.compile(lambda inp: swiglu_mlp(*layers, inp), fullgraph=True, backend="aot_eager")
    xi = x.clone().requires_grad_()
    y = compiled(xi)
    y.backward(grad_out)
    got = [y, xi.grad] + [layer.weight.grad.clone() for layer in layers]
    _, want = _mlp_step(layers, x, grad_out, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_fp8_swiglu_mlp_checks_its_arguments():
    w_gate, w_up, w_down = torch.ones(256, 128), torch.ones(256, 128), torch.ones(128, 256)
    with pytest.raises(ValueError, match="recipe: the one-Function MLP"):
        fp8_swiglu_mlp(torch.ones(4, 128), w_gate, w_up, w_down, FP8Recipe.from_name("wgrad_hp"))
    with pytest.raises(ValueError, match=r"w_up, w_down: expected \[256, 128\]"):
        fp8_swiglu_mlp(torch.ones(4, 128), w_gate, torch.ones(128, 128), w_down)
    with pytest.raises(ValueError, match=r"x: expected a non-empty \[\.\.\., 128\]"):
        fp8_swiglu_mlp(torch.ones(4, 64), w_gate, w_up, w_down)
    with pytest.raises(ValueError, match="w_gate: expected dims that are positive multiples of 128"):
        fp8_swiglu_mlp(torch.ones(4, 100), torch.ones(256, 100), w_up, w_down)
    x = rand(4, 128, seed=0).requires_grad_()
    assert torch.equal(fp8_swiglu_mlp(x, w_gate, w_up, w_down),
                       fp8_linear(F.silu(fp8_linear(x, w_gate)) * fp8_linear(x, w_up), w_down))


def test_compiled_swiglu_mlp_step_makes_seven_custom_op_calls():
    """Under torch.compile each custom op call is a dispatcher round trip (host time): the
    one-Function MLP's step is x's cast, three forward GEMMs with their weight casts and the
    SwiGLU cast between them, then two backward ops (the down projection's gradients, and
    SwiGLU's with the gate and up projections' gradients)."""
    from test_nn_compile import fp8train_ops_recorder

    graphs = []
    layers = _three_fp8_layers()
    torch._dynamo.reset()
    step = torch.compile(lambda inp: swiglu_mlp(*layers, inp).square().sum(), fullgraph=True,
                         backend=fp8train_ops_recorder(graphs))
    step(rand(2, 70, 128, seed=1).requires_grad_()).backward()
    assert graphs == [["cast_1x128_both", "fprop_cast_weight", "fprop_cast_weight", "cast_swiglu_both",
                       "fprop_cast_weight"], ["linear_grads", "swiglu_input_grads"]], graphs
    torch._dynamo.reset()
