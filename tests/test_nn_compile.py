"""torch.compile(fullgraph=True) of FP8Linear forward+backward on CPU: the fp8train:: custom
ops keep the layer free of graph breaks, and compiled results equal eager ones bit for bit."""
import warnings

import pytest
import torch

from fp8train.nn import FP8Linear, FP8Recipe

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


def run_step(module, x, compiled_backend=None):
    def step(inp):
        return module(inp).float().square().sum()

    fn = torch.compile(step, fullgraph=True, backend=compiled_backend) if compiled_backend else step
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    if hasattr(module.weight, "main_grad"):
        module.weight.main_grad.zero_()
    loss = fn(x)
    loss.backward()
    wgrad = module.weight.grad if module.weight.grad is not None else module.weight.main_grad
    return loss.detach(), x.grad, wgrad.clone(), module.bias.grad


@pytest.mark.parametrize("recipe", [FP8Recipe(), FP8Recipe(pow2_scale=True, save_fp8_weight=True),
                                    FP8Recipe(accumulate_into_main_grad=True),
                                    FP8Recipe.from_name("wgrad_hp")])
def test_compiled_fp8_linear_matches_eager(recipe):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = FP8Linear(256, 384, recipe=recipe, dtype=torch.bfloat16)
    module.weight.main_grad = torch.zeros(384, 256)
    x = torch.randn(2, 70, 256, dtype=torch.bfloat16)
    eager = run_step(module, x)
    compiled = run_step(module, x, "aot_eager")
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_inductor_fullgraph_fp8_linear_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = FP8Linear(128, 256)
    x = torch.randn(3, 50, 128)
    eager = run_step(module, x)
    compiled = run_step(module, x, "inductor")
    # Inductor may fuse the float32 loss reduction differently; the FP8 layer's own
    # outputs (custom ops) are identical, so gradients agree to float32 rounding.
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def fp8train_ops_recorder(graphs: list):
    """A torch.compile backend that appends to ``graphs``, for each graph AOTAutograd hands
    the compiler (forward, then backward), the fp8train custom ops it calls, and runs it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append([n.target.name().split("::")[1].split(".")[0] for n in gm.graph.nodes
                       if n.op == "call_function" and hasattr(n.target, "name")
                       and n.target.name().startswith("fp8train::")])
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _fp8train_ops_per_graph(module, x):
    """The fp8train custom ops in the forward and backward graphs AOTAutograd hands the
    compiler for one step of ``module``."""
    graphs = []
    torch._dynamo.reset()
    run_step(module, x, fp8train_ops_recorder(graphs))
    return graphs


def test_compiled_linear_step_makes_three_custom_op_calls():
    """Every custom op call under torch.compile is a dispatcher round trip (host time): with
    the default recipe a layer step is the input's cast, the forward GEMM with its weight
    cast, and the whole backward."""
    torch.manual_seed(0)
    graphs = _fp8train_ops_per_graph(FP8Linear(256, 384), torch.randn(2, 70, 256))
    assert graphs == [["cast_1x128_both", "fprop_cast_weight"], ["linear_grads"]], graphs
    # Other recipes keep one op per cast and GEMM.
    graphs = _fp8train_ops_per_graph(FP8Linear(256, 384, recipe=FP8Recipe(save_fp8_weight=True)),
                                     torch.randn(2, 70, 256))
    assert graphs == [["cast_1x128_both", "cast_128x128_dual", "gemm_nt"],
                      ["cast_1x128_both", "gemm_nt", "gemm_nt"]], graphs
