"""fp8train.save_pretrained_fp8: a converted transformers model written as a fine-grained
FP8 checkpoint, loaded back with AutoModelForCausalLM.from_pretrained (which dequantizes it
on a machine without a GPU)."""
import importlib.util
import json
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import fp8train  # noqa: E402
from fp8train.quant import dequantize, per_block_cast  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hf_models import batch, rel_err, tiny_model  # noqa: E402

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")
# The loaded model quantizes only its weights, the converted one also its activations and
# gradients; measured 0.036-0.058 on these models.
LOGITS_BOUND = 0.1


def read(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_save_pretrained_fp8_loads_in_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    fp8train.convert_to_fp8(model)
    model.save_pretrained(tmp_path / "plain")
    config = fp8train.save_pretrained_fp8(model, tmp_path / "fp8")

    written = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert written == config
    assert {k: written[k] for k in ("quant_method", "fmt", "activation_scheme",
                                    "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128]}
    assert written["modules_to_not_convert"] == ["lm_head"]

    plain, fp8 = read(tmp_path / "plain"), read(tmp_path / "fp8")
    scales = {k for k in fp8 if k.endswith("weight_scale_inv")}
    # transformers' own key names, plus one scale per quantized weight.
    assert set(fp8) == set(plain) | scales
    assert {k for k in fp8 if fp8[k].dtype == torch.float8_e4m3fn} == \
        {k.removesuffix("_scale_inv") for k in scales}
    if arch != "llama":  # per-expert keys, each its own e4m3 weight
        expert_key = {"qwen3_moe": "model.layers.1.mlp.experts.3.gate_proj.weight",
                      "mixtral": "model.layers.1.block_sparse_moe.experts.3.w1.weight"}[arch]
        assert fp8[expert_key].dtype == torch.float8_e4m3fn
    for key in scales:
        weight = key.removesuffix("_scale_inv")
        n, k = plain[weight].shape
        assert fp8[key].dtype == torch.float32 and fp8[key].shape == (-(-n // 128), -(-k // 128))
        w_fp8, w_scale = per_block_cast(plain[weight].float())
        assert torch.equal(fp8[weight].view(torch.uint8), w_fp8.view(torch.uint8))
        assert torch.equal(fp8[key], w_scale)
    for key in set(plain) - {k.removesuffix("_scale_inv") for k in scales}:
        assert torch.equal(fp8[key], plain[key]), key

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    # Dequantized on load: each weight is exactly its 128x128 block cast, dequantized.
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key.endswith(("gate_up_proj", "down_proj")) or "proj.weight" in key:
            want = dequantize(*per_block_cast(state[key].float()), (128, 128))
            assert torch.equal(value, want.to(value.dtype)), key
        else:
            assert torch.equal(value, state[key]), key
    ids = batch(5)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) < LOGITS_BOUND


def test_save_pretrained_fp8_argument_checks(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="convert_to_fp8"):
        fp8train.save_pretrained_fp8(model, tmp_path)
    with pytest.raises(TypeError, match="model"):
        fp8train.save_pretrained_fp8(torch.nn.Linear(128, 128), tmp_path)
    fp8train.convert_to_fp8(model)
    with pytest.raises(TypeError, match="save_directory"):
        fp8train.save_pretrained_fp8(model, 3)
    with pytest.raises(ValueError, match="state_dict"):
        fp8train.save_pretrained_fp8(model, tmp_path, state_dict={})


def _file_tensor(saved: dict, key: str) -> torch.Tensor:
    """The file's tensor for a key of the loaded model: its own, or for transformers' fused
    experts (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I], and their
    ``_scale_inv``) the per-expert tensors of the file stacked as transformers fuses them."""
    if key in saved:
        return saved[key]
    fused = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?", key)
    assert fused, f"{key}: neither in the file nor a fused expert tensor"
    prefix, name, suffix = fused.group(1), fused.group(2), "weight" + (fused.group(3) or "")
    experts = sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in saved if k.startswith(prefix + ".")})
    parts = ("gate_proj", "up_proj") if name == "gate_up_proj" else ("down_proj",)
    return torch.stack([torch.cat([saved[f"{prefix}.{e}.{part}.{suffix}"] for part in parts])
                        for e in experts])


def check_loaded_fp8(state: dict, saved: dict) -> None:
    """Every e4m3 tensor of a loaded model holds the file's bytes and its scale the file's
    values (fused expert tensors against the file's experts stacked)."""
    kept_fp8 = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    assert kept_fp8, "transformers dequantized the checkpoint"
    for key in kept_fp8:
        want = _file_tensor(saved, key)
        assert torch.equal(state[key].cpu().view(torch.uint8), want.view(torch.uint8)), key
        scale = f"{key}_scale_inv"
        assert torch.equal(state[scale].cpu(), _file_tensor(saved, scale)), scale


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_fp8_checkpoint_loads_on_the_gpu_in_fp8(arch, tmp_path):
    """On a GPU transformers keeps the checkpoint's weights in e4m3 (its fine-grained FP8
    layers) rather than dequantizing them: the loaded layers hold the file's bytes and
    scales, and, where transformers has its FP8 matmul (the `kernels` package, fetched from
    the hub: absent on an offline machine), the logits stay close to the converted model's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    fp8train.convert_to_fp8(model)
    fp8train.save_pretrained_fp8(model, tmp_path / "fp8")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cuda")
    saved = {}
    for path in (tmp_path / "fp8").glob("*.safetensors"):
        saved.update(load_file(path))
    check_loaded_fp8(loaded.state_dict(), saved)
    if importlib.util.find_spec("kernels") is None:
        return
    ids = batch(5).cuda()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = model.cuda()(input_ids=ids).logits
    assert rel_err(got.float(), want.float()) < LOGITS_BOUND
