"""FP8 all-gather of ``FP8Linear`` weights and ``FP8GroupedLinear`` expert stacks under FSDP2
(``torch.distributed.fsdp.fully_shard``).

FSDP2 shards each weight ``[N, K]`` by rows and all-gathers it before the layer runs. A
parameter whose local tensor defines ``fsdp_pre_all_gather``/``fsdp_post_all_gather``
chooses what is gathered: here each rank casts its own rows to e4m3 with 128x128 block
scales and gathers those (1 byte an element plus one float32 per 16,384 elements, about
half of a BF16 gather), and the gathered pair reaches ``FP8Linear`` as an
``FP8BlockWeight`` that the forward GEMM uses without casting again.

Why no cross-rank communication of scales: a 128x128 block's scale depends only on its own
elements, so as long as every rank's rows start and end on 128-row block boundaries, the
shard casts are exactly the blocks of the whole weight's cast (bit-identical to casting
after a high-precision gather from the same master). Expert stacks ``[G, N, K]`` shard
over experts, each its own blocks. ``enable_fp8_all_gather`` and the pre-all-gather hook
check those boundaries and raise otherwise.

Usage (before ``fully_shard``; build the optimizer after it, as FSDP2 replaces parameters):
    enable_fp8_all_gather(model)            # wraps every FP8Linear / expert weight
    for block in model.layers: fully_shard(block)
    fully_shard(model)

The master weight stays high precision and sharded; the weight gradient is produced in
the parameter's dtype and reduce-scattered by FSDP as usual.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..quant.casts import per_block_cast
from ..quant.formats import GROUP
from .fp8_weight import FP8BlockWeight
from .grouped_linear import FP8GroupedLinear
from .linear import FP8Linear

aten = torch.ops.aten

# Ops through which FSDP2 builds and pads the sharded parameter (chunk -> split, narrow ->
# slice, new_zeros + copy_, view, DTensor's detach/alias): their results must stay wrapped
# so the shard still has the hooks. Every other op (optimizer math, norms) returns plain
# tensors computed on the master weight; in-place ones update it.
_KEEP_WRAPPED = {aten.detach.default, aten.alias.default, aten.view.default,
                 aten._unsafe_view.default, aten.as_strided.default, aten.slice.Tensor,
                 aten.split.Tensor, aten.split_with_sizes.default, aten.new_zeros.default,
                 aten.new_empty.default, aten.empty_like.default, aten.clone.default,
                 aten.copy_.default, aten._to_copy.default, aten._pin_memory.default}


def _check_shards(shape, world_size: int, what: str) -> None:
    """Every rank's dim-0 shard must be whole 128x128 blocks: whole 128-row blocks of a
    weight [N, K], whole experts of an expert stack [G, N, K]."""
    unit = GROUP if len(shape) == 2 else 1
    if shape[0] % (unit * world_size) == 0:
        return
    need = (f"out_features divisible by {GROUP} x world size = {GROUP * world_size}"
            if unit == GROUP else f"num_experts divisible by the world size {world_size}")
    raise ValueError(f"{what}: FP8 all-gather needs every rank's shard to be whole "
                     f"{GROUP}x{GROUP} blocks, i.e. {need}; got shape {tuple(shape)} over "
                     f"{world_size} ranks. Leave this layer out of enable_fp8_all_gather "
                     "(skip_ineligible=True) or change the world size.")


class FP8AllGatherWeight(torch.Tensor):
    """A high-precision master weight (or its FSDP shard) that FSDP2 all-gathers in FP8.

    Behaves as the tensor it wraps (``hp``) for every operation; only FSDP2's all-gather
    hooks differ. ``pow2_scale`` must match the layer's recipe.
    """

    @staticmethod
    def __new__(cls, hp: torch.Tensor, pow2_scale: bool = False):
        if not isinstance(hp, torch.Tensor) or isinstance(hp, FP8AllGatherWeight):
            raise TypeError(f"hp: expected a plain torch.Tensor, got {type(hp).__name__}")
        if not isinstance(pow2_scale, bool):
            raise TypeError(f"pow2_scale: expected a bool, got {type(pow2_scale).__name__}")
        self = torch.Tensor._make_wrapper_subclass(
            cls, hp.size(), strides=hp.stride(), storage_offset=hp.storage_offset(),
            dtype=hp.dtype, device=hp.device, layout=hp.layout,
            requires_grad=hp.requires_grad)
        self.hp, self.pow2_scale = hp, pow2_scale
        return self

    def data_ptr(self) -> int:
        # A wrapper has no storage of its own (data_ptr() would be 0 for every wrapped
        # weight); accelerate's FSDP2 prepare maps optimizer parameters to their sharded
        # replacements by data_ptr, so report the master weight's.
        return self.hp.data_ptr()

    def __repr__(self) -> str:
        return f"FP8AllGatherWeight({self.hp!r}, pow2_scale={self.pow2_scale})"

    def __tensor_flatten__(self):
        return ["hp"], self.pow2_scale

    @staticmethod
    def __tensor_unflatten__(inner, pow2_scale, outer_size, outer_stride):
        return FP8AllGatherWeight(inner["hp"], pow2_scale)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pow2 = next(a.pow2_scale for a in tree_flatten((args, kwargs))[0]
                    if isinstance(a, FP8AllGatherWeight))
        unwrap = lambda t: t.hp if isinstance(t, FP8AllGatherWeight) else t  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func not in _KEEP_WRAPPED:
            return out
        wrap = lambda t: FP8AllGatherWeight(t, pow2) if type(t) is torch.Tensor else t  # noqa: E731
        return tree_map(wrap, out)

    # ------------------------------------------------------------------ FSDP2 hooks
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """Cast this rank's rows (or experts): gather e4m3 data ``[rows, K]`` and scales
        ``[rows/128, K/128]`` (``[experts, ...]`` for a stack) instead of the
        high-precision shard."""
        _check_shards(outer_size, mesh.size(), "weight")
        w_fp8, w_scale = per_block_cast(self.hp, pow2_scale=self.pow2_scale)
        return (w_fp8, w_scale), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """Present the gathered ``(data [N, K], scale [N/128, K/128])`` as an
        ``FP8BlockWeight`` of the compute dtype. The payload tensors are views of FSDP's
        gather buffers, which FSDP frees and refills in place; on later gathers (``out``
        given) the existing FP8BlockWeight already sees the new values."""
        w_fp8, w_scale = all_gather_outputs
        if out is not None:
            if not isinstance(out, FP8BlockWeight) or \
                    out.fp8_data.untyped_storage().data_ptr() != w_fp8.untyped_storage().data_ptr():
                raise RuntimeError("fsdp_post_all_gather: out must be the FP8BlockWeight "
                                   "built over these gather buffers on the first all-gather")
            return
        weight = FP8BlockWeight(w_fp8, w_scale, param_dtype, self.pow2_scale)
        return weight, (w_fp8, w_scale)


def _world_size(world_size: Optional[int]) -> int:
    if world_size is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int or None, got {world_size!r}")
    return world_size


def enable_fp8_all_gather(model: nn.Module, world_size: Optional[int] = None,
                          skip_ineligible: bool = False) -> List[str]:
    """Wrap the weight of every FP8 ``FP8Linear`` and ``FP8GroupedLinear`` (MoE experts) in
    ``model`` so that FSDP2 gathers it in FP8. Call before ``fully_shard``. Returns the
    qualified names of the wrapped weights.

    ``world_size``: the FSDP shard group size (default: the initialised process group's, or
    1). A linear's out_features must be a multiple of 128 x world_size (each rank's rows whole
    128-row blocks), an expert stack's num_experts a multiple of world_size; otherwise a
    ValueError names the layer, or, with ``skip_ineligible``, the layer is left out and keeps
    the high-precision gather. Layers whose recipe runs neither fprop nor dgrad in FP8 have
    no use for an FP8 weight and are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(skip_ineligible, bool):
        raise TypeError(f"skip_ineligible: expected a bool, got {type(skip_ineligible).__name__}")
    world_size = _world_size(world_size)
    wrapped = []
    for name, module in model.named_modules():
        if not isinstance(module, (FP8Linear, FP8GroupedLinear)) or not (
                module.recipe.fprop_fp8 or module.recipe.dgrad_fp8):
            continue
        weight = module.weight
        if isinstance(weight, FP8AllGatherWeight):
            continue
        if type(weight.data) is not torch.Tensor:
            raise ValueError(f"model: {name}.weight is a {type(weight.data).__name__}; call "
                             "enable_fp8_all_gather before fully_shard")
        try:
            _check_shards(weight.shape, world_size, f"{name or 'model'}.weight")
        except ValueError:
            if skip_ineligible:
                continue
            raise
        module.weight = nn.Parameter(FP8AllGatherWeight(weight.data, module.recipe.pow2_scale),
                                     requires_grad=weight.requires_grad)
        wrapped.append(f"{name}.weight" if name else "weight")
    return wrapped
