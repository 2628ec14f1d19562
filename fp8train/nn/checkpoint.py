"""FP8 checkpoints in the Hugging Face fine-grained FP8 convention, and a loader back.

Master weights need nothing from here: ``FP8Linear``/``FP8MoE`` have the state_dict of the
modules they replace, so ``safetensors.torch.save_file(model.state_dict(), ...)`` works as
it does for the BF16 model. ``export_fp8_safetensors`` writes the inference form instead:

    <name>.weight            float8_e4m3fn [N, K]    (each FP8Linear / FP8GroupedLinear;
    <name>.weight_scale_inv  float32 [ceil(N/128), ceil(K/128)]   [G, ...] for experts)
    every other tensor       as it is in the state_dict

with ``quantization_config`` (``quant_method: fp8``, ``fmt: e4m3``, ``activation_scheme:
dynamic``, ``weight_block_size: [128, 128]``, ``modules_to_not_convert``) in the file's
metadata and merged into ``config.json`` beside it. ``weight_scale_inv`` is the
dequantization multiplier (``w ~= weight * weight_scale_inv``), as in DeepSeek-V3's files.
The metadata also holds the sha256 of every tensor's bytes (``fp8train_sha256``), which
``load_fp8_safetensors`` checks: a corrupted file fails to load, naming the tensor. The file
is written beside its destination and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..quant import GROUP, dequantize, per_block_cast
from .grouped_linear import FP8GroupedLinear
from .linear import FP8Linear

PathLike = Union[str, os.PathLike]
SCALE_SUFFIX = "_scale_inv"
DIGESTS = "fp8train_sha256"  # metadata key: {tensor name: sha256 of its bytes}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes in row-major order (dtype and shape not included)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def quantization_config(model: nn.Module) -> Dict:
    """The HF ``quantization_config`` describing ``model``'s exported FP8 weights."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    keep = [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)]
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [GROUP, GROUP], "modules_to_not_convert": keep}


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def export_fp8_safetensors(model: nn.Module, path: PathLike, *,
                           config_json: bool = True) -> Dict[str, torch.Tensor]:
    """Write ``model``'s weights to ``path`` (a .safetensors file) with every FP8 layer's
    weight as e4m3 + ``weight_scale_inv`` (128x128 blocks, the layer's scale format).

    ``config_json``: also merge ``quantization_config`` into ``config.json`` in the same
    directory (created if absent). Returns the tensors written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    path = _check_path(path)
    if not isinstance(config_json, bool):
        raise TypeError(f"config_json: expected a bool, got {type(config_json).__name__}")
    quantized = {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
                 if isinstance(m, (FP8Linear, FP8GroupedLinear))}
    tensors: Dict[str, torch.Tensor] = {}
    seen_storages = set()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in quantized:
                w_fp8, w_scale = per_block_cast(value, pow2_scale=quantized[key].recipe.pow2_scale)
                tensors[key] = w_fp8.cpu()
                tensors[key + SCALE_SUFFIX] = w_scale.cpu()
                continue
            value = value.detach().cpu().contiguous()
            # safetensors refuses shared storage (tied embeddings): write a copy.
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen_storages and value.numel():
                value = value.clone()
            seen_storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value
    config = quantization_config(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    digests = {key: tensor_digest(value) for key, value in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "quantization_config": json.dumps(config),
                                               DIGESTS: json.dumps(digests)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if config_json:
        config_path = path.parent / "config.json"
        merged = json.loads(config_path.read_text()) if config_path.exists() else {}
        merged["quantization_config"] = config
        config_path.write_text(json.dumps(merged, indent=2) + "\n")
    return tensors


def load_fp8_safetensors(model: nn.Module, path: PathLike, *, strict: bool = True):
    """Load a file written by ``export_fp8_safetensors`` (or any HF fine-grained FP8
    checkpoint) into ``model``: each e4m3 weight is dequantized with its
    ``weight_scale_inv`` and cast to the dtype of the model's tensor of that name.

    Returns ``model.load_state_dict``'s result (missing and unexpected keys).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    path = _check_path(path)
    if not path.is_file():
        raise ValueError(f"path: no file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {key: f.get_tensor(key) for key in f.keys()}
        digests = json.loads(metadata.get(DIGESTS, "{}"))
        block = json.loads(metadata.get("quantization_config", "{}")).get("weight_block_size",
                                                                          [GROUP, GROUP])
    except Exception as err:  # a truncated or damaged file: safetensors' own errors name no file
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    for key, digest in digests.items():
        if key not in raw:
            raise ValueError(f"{path}: tensor {key} is recorded in the metadata but missing")
        if tensor_digest(raw[key]) != digest:
            raise ValueError(f"{path}: tensor {key} does not match its recorded sha256 "
                             "(the file is corrupted)")
    if list(block) != [GROUP, GROUP]:
        raise ValueError(f"{path}: weight_block_size {block} is not supported (only "
                         f"[{GROUP}, {GROUP}])")
    targets = model.state_dict()
    state = {}
    for key, value in raw.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if value.dtype == torch.float8_e4m3fn:
            scale = raw.get(key + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"{path}: {key} is e4m3 but {key + SCALE_SUFFIX} is missing")
            value = dequantize(value, scale, (GROUP, GROUP))
            if key in targets:
                value = value.to(targets[key].dtype)
        state[key] = value
    return model.load_state_dict(state, strict=strict)
