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
