"""Checkpoints: master weights through safetensors unchanged, and the HF fine-grained FP8
export (e4m3 + weight_scale_inv, quantization_config) with its loader."""
import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fp8train import convert_to_fp8, export_fp8_safetensors, load_fp8_safetensors
from fp8train.nn import FP8Recipe, MoE
from fp8train.quant import dequantize, per_block_cast

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


class Tiny(nn.Module):
    """Embedding, a dense linear, an MoE block, an ineligible linear and a head."""

    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(256, 128)
        self.proj = nn.Linear(128, 384)
        self.moe = MoE(384, 128, 3, 2, shared_expert_dim=128)
        self.small = nn.Linear(384, 96)
        self.lm_head = nn.Linear(384 if not tied else 128, 256, bias=False)
        self.tied = tied
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.moe(self.proj(self.embed(tokens)))
        h = h + self.small(h).mean(-1, keepdim=True)
        return self.lm_head(h[..., :128] if self.tied else h)


def fresh_pair(seed=0, recipe=None):
    torch.manual_seed(seed)
    model = Tiny()
    convert_to_fp8(model, recipe)
    return model


TOKENS = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))


def test_master_weights_round_trip_through_safetensors_exactly(tmp_path):
    model = fresh_pair(0)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = fresh_pair(1)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model(TOKENS), other(TOKENS))
    # The same file loads into the unconverted model: the keys did not change.
    torch.manual_seed(2)
    Tiny().load_state_dict(load_file(tmp_path / "model.safetensors"))


def test_export_writes_the_hf_fine_grained_fp8_convention(tmp_path):
    model = fresh_pair(0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    export_fp8_safetensors(model, tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["quantization_config"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert config["quant_method"] == "fp8" and config["fmt"] == "e4m3"
    assert config["activation_scheme"] == "dynamic" and config["weight_block_size"] == [128, 128]
    assert set(config["modules_to_not_convert"]) == {"small", "lm_head"}
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "tiny" and on_disk["quantization_config"] == config
    expected_fp8 = {"proj.weight": (3, 1), "moe.experts_gate_up.weight": (3, 2, 3),
                    "moe.experts_down.weight": (3, 3, 1),
                    "moe.shared_expert.gate_proj.weight": (1, 3),
                    "moe.shared_expert.up_proj.weight": (1, 3),
                    "moe.shared_expert.down_proj.weight": (3, 1)}
    for key, grid in expected_fp8.items():
        assert tensors[key].dtype == torch.float8_e4m3fn
        scale = tensors[key + "_scale_inv"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == grid
        w_fp8, w_scale = per_block_cast(model.state_dict()[key])
        assert torch.equal(tensors[key].float(), w_fp8.float()) and torch.equal(scale, w_scale)
    for key in ("proj.bias", "small.weight", "lm_head.weight", "embed.weight", "moe.router.weight"):
        assert torch.equal(tensors[key], model.state_dict()[key])


@pytest.mark.parametrize("pow2", [False, True])
def test_export_then_load_reproduces_the_exported_weights(tmp_path, pow2):
    model = fresh_pair(0, FP8Recipe(pow2_scale=pow2))
    export_fp8_safetensors(model, tmp_path / "fp8.safetensors", config_json=False)
    assert not (tmp_path / "config.json").exists()
    # Into a plain high-precision model: every FP8 weight comes back as fp8 * scale.
    torch.manual_seed(5)
    plain = Tiny()
    result = load_fp8_safetensors(plain, tmp_path / "fp8.safetensors")
    assert not result.missing_keys and not result.unexpected_keys
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in ("proj.weight", "moe.experts_gate_up.weight", "moe.experts_down.weight") \
                    or name.startswith("moe.shared_expert"):
                w_fp8, w_scale = per_block_cast(p, pow2_scale=pow2)
                p.copy_(dequantize(w_fp8, w_scale, (128, 128)))
    for (name, a), (_, b) in zip(plain.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    # Into an FP8 model: re-quantizing the dequantized weights gives the same FP8 operands,
    # so the outputs are those of the exported model, bit for bit (with power-of-two scales
    # this holds by construction; with float32 scales for these weights).
    converted = fresh_pair(7, FP8Recipe(pow2_scale=pow2))
    load_fp8_safetensors(converted, tmp_path / "fp8.safetensors")
    assert torch.equal(converted(TOKENS), model(TOKENS))


def test_export_handles_tied_embeddings_and_bf16(tmp_path):
    torch.manual_seed(0)
    model = Tiny(tied=True).to(torch.bfloat16)
    report = convert_to_fp8(model)
    assert "tied" in dict(report.skipped)["lm_head"]
    export_fp8_safetensors(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    other = Tiny(tied=True).to(torch.bfloat16)
    load_fp8_safetensors(other, tmp_path / "m.safetensors")
    assert other.lm_head.weight is other.embed.weight
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.proj.weight.dtype == torch.bfloat16


def test_checkpoint_functions_check_their_arguments(tmp_path):
    model = fresh_pair(0)
    with pytest.raises(TypeError, match="model"):
        export_fp8_safetensors({}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="path"):
        export_fp8_safetensors(model, 3)
    with pytest.raises(TypeError, match="config_json"):
        export_fp8_safetensors(model, tmp_path / "x.safetensors", config_json="yes")
    with pytest.raises(ValueError, match="path"):
        load_fp8_safetensors(model, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="model"):
        load_fp8_safetensors(None, tmp_path / "missing.safetensors")
    fp8 = per_block_cast(torch.randn(128, 128))[0]
    save_file({"proj.weight": fp8}, tmp_path / "noscale.safetensors")
    with pytest.raises(ValueError, match="weight_scale_inv"):
        load_fp8_safetensors(model, tmp_path / "noscale.safetensors", strict=False)
    meta = {"quantization_config": json.dumps({"weight_block_size": [1, 128]})}
    save_file({"a": torch.ones(1)}, tmp_path / "block.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="weight_block_size"):
        load_fp8_safetensors(model, tmp_path / "block.safetensors", strict=False)


def test_a_corrupted_or_truncated_export_fails_to_load_naming_the_file_and_tensor(tmp_path):
    """Every tensor's sha256 is in the metadata: flipped payload bytes (which safetensors
    alone would load as NaN or wrong weights) and a cut file both fail, naming the file."""
    model = fresh_pair(0)
    path = tmp_path / "model.safetensors"
    export_fp8_safetensors(model, path)
    assert not list(tmp_path.glob(".*tmp*"))  # written beside, renamed into place
    load_fp8_safetensors(fresh_pair(1), path)  # intact: loads
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # the last tensor's payload
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: tensor .* does not match its recorded sha256"):
        load_fp8_safetensors(fresh_pair(1), corrupt)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_fp8_safetensors(fresh_pair(1), cut)
