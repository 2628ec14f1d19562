"""No host synchronisation on the training path (Hopper GPU; skipped without one).

Forward and backward of ``FP8Linear``, ``FP8MoE`` and converted HF dense and MoE decoder
layers, eager and compiled, under ``torch.cuda.set_sync_debug_mode("error")``: any call
that makes the host wait for the GPU (``.item()``, ``.tolist()``, a device-to-host copy, a
data-dependent shape) raises. A warm-up step runs first, outside the check: the first call
compiles kernels and graphs, which is not the training path.
"""
import pytest
import torch

import fp8train
from fp8train.nn import FP8Linear, FP8MoE
from hf_models import tiny_model

pytestmark = pytest.mark.gpu


def _linear():
    layer = FP8Linear(256, 384).cuda()
    x = torch.randn(2, 128, 256, device="cuda", requires_grad=True)
    return layer, (x,), {}


def _moe():
    layer = FP8MoE(256, 128, num_experts=4, top_k=2).cuda()
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    return layer, (x,), {}


def _hf_layer(arch):
    def build():
        model = tiny_model(arch, seed=3).cuda()
        fp8train.convert_to_fp8(model)
        x = torch.randn(1, 256, 128, device="cuda", requires_grad=True)
        position_ids = torch.arange(256, device="cuda").unsqueeze(0)
        pos = model.model.rotary_emb(x, position_ids)
        return model.model.layers[0], (x,), {"position_embeddings": pos, "position_ids": position_ids}
    return build


LAYERS = {"FP8Linear": _linear, "FP8MoE": _moe, "hf-llama": _hf_layer("llama"),
          "hf-qwen3_moe": _hf_layer("qwen3_moe")}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_training_step_never_syncs(name, compiled):
    layer, args, kwargs = LAYERS[name]()
    fn = torch.compile(layer) if compiled else layer

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(*args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()

    step()  # warm-up: kernels and graphs compile here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    torch._dynamo.reset()
