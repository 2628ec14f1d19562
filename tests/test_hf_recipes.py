"""recipes with a transformers architecture: ``model: {hf: <model_type>, ...}`` in the config
builds it with AutoModelForCausalLM.from_config; its keys are checked before anything runs."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import fp8train  # noqa: E402
from recipes.config import ConfigError, config_from_dict, load_config  # noqa: E402
from recipes.model import HFCausalLM, build_model  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny-hf-qwen3-moe.yaml"


def test_hf_model_from_config_file_and_overrides():
    cfg = load_config(CONFIG, ["model.num_experts=8", "model.num_hidden_layers=1"])
    assert cfg.model.hf == "qwen3_moe"
    assert cfg.model.hf_config["num_experts"] == 8
    assert cfg.model.hf_config["hidden_size"] == 128
    # The resolved config (as saved in a run folder) rebuilds to the same one.
    assert config_from_dict(cfg.to_dict()) == cfg
    model = build_model(cfg.model, max_seq_len=cfg.seq_len)
    assert isinstance(model, HFCausalLM)
    assert model.hf.config.num_experts == 8 and len(model.hf.model.layers) == 1
    assert model.hf.config.vocab_size == cfg.model.vocab_size
    report = fp8train.convert_to_fp8(model)
    assert "hf.model.layers.0.mlp.experts" in dict(report.converted)
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 256) and torch.isfinite(loss)


def test_hf_config_errors():
    with pytest.raises(ConfigError, match="num_expertz"):
        load_config(CONFIG, ["model.num_expertz=8"])
    with pytest.raises(ConfigError, match="not a transformers model_type"):
        load_config(None, ["model.hf=no_such_arch"])
    with pytest.raises(ConfigError, match="multiple of 128"):
        load_config(CONFIG, ["model.hidden_size=96"])
    # Without model.hf an unknown key is still an error.
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["model.num_experts=8"])


def test_bench_hf_bf16_experts_run_in_the_autocast_dtype():
    """`bench hf`'s BF16 baseline: transformers' grouped_mm experts casts the tokens to the
    weights' dtype, so FP32 master weights would make it an FP32 baseline; the bench's
    implementation casts the weights to autocast's dtype instead. Same result as BF16
    weights, the GEMM inputs are BF16, and dynamo traces it into one graph per layer class
    (with use_cache=False, as the bench calls the model)."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks import hf as bench_hf

    config = AutoConfig.for_model("qwen3_moe", hidden_size=128, intermediate_size=256,
                                  moe_intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                  num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                  vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(32, 128)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(32)])
    weights = torch.rand(32, 2)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proxy = bench_hf._CastExperts(experts, torch.bfloat16)
        seen.append(proxy.gate_up_proj.dtype)
        out = bench_hf._grouped_mm_autocast_forward(experts, x, ids, weights)
    assert seen == [torch.bfloat16] and experts.gate_up_proj.dtype == torch.float32
    ref_experts = bench_hf._CastExperts(experts, torch.bfloat16)  # explicit BF16 weights
    from transformers.integrations.moe import grouped_mm_experts_forward
    ref = grouped_mm_experts_forward(ref_experts, x, ids, weights)
    assert torch.equal(out, ref)

    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(bench_hf.BF16_EXPERTS, bench_hf._grouped_mm_autocast_forward)
    model.set_experts_implementation(bench_hf.BF16_EXPERTS)
    for layer in model.model.layers:
        layer.compile(backend="eager")
    counters.clear()
    tokens = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    torch._dynamo.reset()
    assert torch.isfinite(loss)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # not one per layer
    assert experts.gate_up_proj.grad is not None


def test_bench_hf_layer_check_isolates_each_layer():
    """`bench hf`'s kernel check feeds every decoder layer the reference run's input to it,
    so a fault shows in its own layer only and differences do not carry up the stack."""
    import copy

    from benchmarks import hf as bench_hf
    from hf_models import batch, tiny_model

    model = tiny_model("llama", seed=0)
    fp8train.convert_to_fp8(model)
    ids = batch(0, batch_size=1, seq_len=32)
    # On a CPU both runs are the reference emulation: every layer agrees exactly.
    errs, limits, last_hidden = bench_hf._layer_native_errs(model, ids)
    assert errs == [0.0, 0.0]
    # Each layer's limit: twice what a one-ulp nudge of its input moves the reference.
    assert all(0 < limit < 0.5 for limit in limits), limits
    # Its last hidden states are the whole model's (the last layer's output, final norm).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = model.model(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(last_hidden, whole.double())

    # A fault in layer 0 alone: only layer 0 differs when each layer gets its given input.
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        faulty.model.layers[0].mlp.down_proj.weight.mul_(-1)
    reference = bench_hf._layer_outputs(model, ids)
    fed = bench_hf._layer_outputs(faulty, ids, inputs=[inp for inp, _ in reference])
    errors = [bench_hf._rel_err(got.double(), want.double())
              for (_, got), (_, want) in zip(fed, reference)]
    assert errors[0] > 0.1 and errors[1] == 0.0
    # Fed its own layer 0's output instead, layer 1 would differ too.
    chained = bench_hf._layer_outputs(faulty, ids)
    assert bench_hf._rel_err(chained[1][1].double(), reference[1][1].double()) > 0.01
