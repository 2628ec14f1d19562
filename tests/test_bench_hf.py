"""The HF benchmark's CPU-checkable parts: the table it holds a run against is found, and the
torchao row converts what it says (the timing runs on the device: python -m benchmarks hf)."""
import json

import pytest
import torch
import torch.nn as nn

from benchmarks import hf


def test_previous_table_is_found():
    table = json.loads(hf.PREVIOUS_TABLE.read_text())
    assert table["rows"] and {"model", "compiled", "precision", "tokens_per_s"} <= set(table["rows"][0])


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_torchao_row_converts_every_linear_but_the_head_and_the_router(arch):
    pytest.importorskip("torchao.float8")
    pytest.importorskip("transformers")
    from torchao.float8.float8_linear import Float8Linear

    model = hf.tiny_model(arch)
    assert hf.torchao_convert(model)
    converted = {name for name, mod in model.named_modules() if isinstance(mod, Float8Linear)}
    plain = {name for name, mod in model.named_modules()
             if type(mod) is nn.Linear and name not in converted}
    assert any(name.endswith("self_attn.q_proj") for name in converted)
    assert plain and all(name.endswith(("lm_head", "mlp.gate")) for name in plain), plain
    if arch == "qwen3_moe":  # experts stay plain BF16 parameters (torchao_convert says why)
        experts = [mod for name, mod in model.named_modules() if name.endswith("mlp.experts")]
        assert experts and all(type(p.data) is torch.Tensor for mod in experts for p in mod.parameters())
