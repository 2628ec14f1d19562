"""``save_pretrained_fp8``: a converted Hugging Face model written as a fine-grained FP8
checkpoint that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

The directory is exactly what the model's own ``save_pretrained`` writes (same shards, same
key names: transformers reverts its load-time weight conversions, so fused experts come out
as per-expert ``experts.{e}.{gate,up,down}_proj.weight`` keys, or ``w1/w2/w3`` for Mixtral),
then every tensor that comes from a converted weight is rewritten as

    <key>                   float8_e4m3fn [N, K]
    <key>_scale_inv         float32 [ceil(N/128), ceil(K/128)]   (HF: ``weight_scale_inv``)

and ``config.json`` gains ``quantization_config`` (``quant_method: fp8``, ``fmt: e4m3``,
``activation_scheme: dynamic``, ``weight_block_size: [128, 128]``, ``modules_to_not_convert``:
the linear layers and experts left in high precision, under the model's own names).

Which saved keys come from a converted weight is asked of transformers itself: the
converted parameters (as meta tensors, so nothing is copied) go through the same
``revert_weight_conversion`` that ``save_pretrained`` applies.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..quant import GROUP, per_block_cast
from .linear import FP8Linear
from .recipe import FP8Recipe

PathLike = Union[str, os.PathLike]
SCALE_SUFFIX = "_scale_inv"


def _converted(model: nn.Module):
    """([(parameter names, recipe)] of the converted modules, names of the high-precision
    modules transformers' FP8 loader would otherwise quantize)."""
    from .hf import _RECIPE_ATTR, is_fused_experts

    keep: List[str] = []
    groups = []  # one entry per converted module: its parameter names
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FP8Linear):
            groups.append(([prefix + "weight"], module.recipe))
        elif is_fused_experts(module):
            recipe = getattr(module, _RECIPE_ATTR, None)
            if recipe is None:
                keep.append(name)
                continue
            up = "gate_up_proj" if module.has_gate else "up_proj"
            groups.append(([prefix + up, prefix + "down_proj"], recipe))
        elif isinstance(module, nn.Linear):
            keep.append(name)
    return groups, keep


def _saved_keys(model: nn.Module, names: List[str], state: Dict[str, torch.Tensor]) -> List[str]:
    """The keys ``save_pretrained`` writes for the model tensors ``names``."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = {key: torch.empty_like(state[key], device="meta") for key in names}
    return list(revert_weight_conversion(model, meta).keys())


def _rewrite_shard(path: Path, recipes: Dict[str, FP8Recipe]) -> List[str]:
    """Quantize the tensors of ``path`` named in ``recipes``; returns the scale keys added."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    added = []
    for key in [k for k in tensors if k in recipes]:
        value = tensors[key]
        if value.dim() not in (2, 3) or any(d % GROUP for d in value.shape[-2:]):
            raise ValueError(f"model: saved tensor {key} of shape {tuple(value.shape)} is not "
                             f"made of whole {GROUP}x{GROUP} blocks")
        tensors[key], tensors[key + SCALE_SUFFIX] = per_block_cast(
            value.float(), pow2_scale=recipes[key].pow2_scale)
        added.append(key + SCALE_SUFFIX)
    save_file(tensors, str(path), metadata=metadata)
    return added


def save_pretrained_fp8(model: nn.Module, save_directory: PathLike, **save_kwargs) -> Dict:
    """Write the converted HF ``model`` to ``save_directory`` as a fine-grained FP8
    checkpoint (see the module docstring); ``save_kwargs`` go to ``model.save_pretrained``
    (e.g. ``max_shard_size``). Returns the ``quantization_config`` written."""
    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained") \
            or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory: expected a str or os.PathLike, got "
                        f"{type(save_directory).__name__}")
    if "state_dict" in save_kwargs:
        raise ValueError("save_kwargs: state_dict is not accepted (the FP8 weights are cast "
                         "from the model's own)")
    groups, keep = _converted(model)
    if not groups:
        raise ValueError("model: has no FP8 layer; call fp8train.convert_to_fp8(model) first")
    state = model.state_dict()
    recipes: Dict[str, FP8Recipe] = {}
    for names, recipe in groups:
        for key in _saved_keys(model, names, state):
            recipes[key] = recipe

    directory = Path(save_directory)
    model.save_pretrained(str(directory), **save_kwargs)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    found = 0
    for shard in sorted(directory.glob("*.safetensors")):
        added = _rewrite_shard(shard, recipes)
        found += len(added)
        if index is not None:
            index["weight_map"].update({key: shard.name for key in added})
    if found != len(recipes):
        raise ValueError(f"model: save_pretrained wrote {found} of the {len(recipes)} converted "
                         "tensors under the names transformers' revert_weight_conversion gives")
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [GROUP, GROUP], "modules_to_not_convert": keep}
    config_path = directory / "config.json"
    merged = json.loads(config_path.read_text())
    merged["quantization_config"] = config
    config_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return config
