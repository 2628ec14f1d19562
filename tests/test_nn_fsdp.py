"""FSDP2 FP8 all-gather pieces in one process: the hooks called as FSDP2 calls them (the
all-gather simulated by concatenating the ranks' inputs), the pre-cast FP8BlockWeight in
FP8Linear, and the argument checks. The two-process runs are in test_nn_distributed.py."""
import copy

import pytest
import torch
from torch import nn

from fp8train.nn import FP8GroupedLinear, FP8Linear, FP8Recipe, fp8_linear
from fp8train.quant import casts as quant_casts
from fp8train.nn.fp8_weight import FP8BlockWeight
from fp8train.nn.fsdp import FP8AllGatherWeight, enable_fp8_all_gather
from fp8train.quant import per_block_cast

pytestmark = pytest.mark.filterwarnings("ignore")


class FakeMesh:
    """What the hooks read from FSDP2's DeviceMesh: its size."""

    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def gather_like_fsdp(master: torch.Tensor, world: int, pow2=False, dtype=torch.bfloat16):
    """Each rank's pre-all-gather on its rows, outputs concatenated along dim 0 (what an
    all-gather of dim-0 shards yields), then post-all-gather. Returns the gathered weight
    and the bytes each rank sent."""
    shards = [FP8AllGatherWeight(s, pow2) for s in master.chunk(world)]
    inputs = [s.fsdp_pre_all_gather(FakeMesh(world), master.shape, master.stride(), None, None)
              for s in shards]
    for (data, scale), metadata in inputs:
        assert metadata is None and data.dtype == torch.float8_e4m3fn
    sent = sum(t.numel() * t.element_size() for t in inputs[0][0])
    outputs = tuple(torch.cat([inp[0][i] for inp in inputs]) for i in range(2))
    weight, inner = shards[0].fsdp_post_all_gather(outputs, None, dtype)
    assert inner[0] is outputs[0] and inner[1] is outputs[1]
    return weight, outputs, sent


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(512, 384), (4, 256, 384)], ids=["linear", "experts"])
def test_gathered_shards_equal_the_whole_weight_cast(world, pow2, shape):
    master = torch.randn(shape) * torch.logspace(-3, 3, shape[-2]).unsqueeze(1)
    weight, (data, scale), sent = gather_like_fsdp(master, world, pow2)
    ref_data, ref_scale = per_block_cast(master, pow2_scale=pow2)
    # 128x128 blocks never straddle two ranks' rows: no cross-rank amax is needed.
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))
    assert torch.equal(scale, ref_scale)
    assert isinstance(weight, FP8BlockWeight) and weight.dtype == torch.bfloat16
    assert weight.shape == master.shape and weight.pow2_scale is pow2
    # Bytes each rank sends: e4m3 + one float32 per 128x128 block, against 2 bytes of BF16.
    bf16 = master.numel() // world * 2
    assert sent / bf16 == pytest.approx(0.5 + 4 / (2 * 128 * 128))


def test_shards_off_the_block_boundary_are_refused():
    master = torch.randn(384, 256)  # 192 rows a rank: a block would straddle two ranks
    shard = FP8AllGatherWeight(master[:192])
    with pytest.raises(ValueError, match=r"divisible by 128 x world size = 256.*\(384, 256\)"):
        shard.fsdp_pre_all_gather(FakeMesh(2), master.shape, master.stride(), None, None)
    model = nn.Sequential(FP8Linear(256, 384, bias=False), FP8GroupedLinear(3, 128, 256))
    with pytest.raises(ValueError, match=r"0\.weight.*shape \(384, 256\) over 2 ranks"):
        enable_fp8_all_gather(model, world_size=2)
    with pytest.raises(ValueError, match=r"1\.weight.*num_experts divisible by the world size 2"):
        enable_fp8_all_gather(model[1:], world_size=2)
    assert enable_fp8_all_gather(model, world_size=2, skip_ineligible=True) == []
    assert enable_fp8_all_gather(model, world_size=3) == ["0.weight", "1.weight"]


def test_post_all_gather_reuses_its_buffers():
    master = torch.randn(256, 128)
    weight, outputs, _ = gather_like_fsdp(master, 2)
    shard = FP8AllGatherWeight(master[:128])
    # Later gathers refill the same buffers in place: nothing to build.
    assert shard.fsdp_post_all_gather(outputs, None, torch.bfloat16, out=weight) is None
    other, _, _ = gather_like_fsdp(master, 2)
    with pytest.raises(RuntimeError, match="out must be the FP8BlockWeight"):
        shard.fsdp_post_all_gather(outputs, None, torch.bfloat16, out=other)


def count_weight_casts(monkeypatch) -> list:
    """A list that gets the shape of every weight the layers cast 128x128 (W, W with W^T,
    or W^T alone), whichever op makes the cast."""
    casts = []
    for name in ("per_block_cast", "per_block_cast_dual", "per_block_cast_transposed"):
        original = getattr(quant_casts, name)
        monkeypatch.setattr(quant_casts, name, lambda w, original=original, **kw:
                            casts.append(w.shape) or original(w, **kw))
    return casts


RECIPES = [FP8Recipe(), FP8Recipe(save_fp8_weight=True), FP8Recipe.from_name("wgrad_hp"),
           FP8Recipe.from_name("fprop_only"), FP8Recipe(fprop_fp8=False)]


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_pre_cast_weight_gives_the_same_outputs_and_gradients(recipe, monkeypatch):
    casts = count_weight_casts(monkeypatch)
    torch.manual_seed(0)
    master = torch.randn(256, 384)
    x = torch.randn(3, 100, 384, dtype=torch.bfloat16)
    pre_cast = nn.Parameter(FP8BlockWeight(*per_block_cast(master), torch.float32))
    # The high-precision weight the pre-cast one stands for: FP8Linear's own cast of it is
    # the identity on the block grid, so every GEMM operand is bit-identical.
    plain = nn.Parameter(pre_cast.dequantize())
    grads, weight_casts = [], []
    for weight in (pre_cast, plain):
        casts.clear()
        xi = x.clone().requires_grad_()
        y = fp8_linear(xi, weight, None, recipe)
        y.float().square().sum().backward()
        grads.append((y, xi.grad, weight.grad))
        weight_casts.append(len(casts))
    # The pre-cast weight is used as it is; the plain one is cast for fprop and/or dgrad.
    assert weight_casts == [0, recipe.fprop_fp8 + recipe.dgrad_fp8 - (
        recipe.fprop_fp8 and recipe.dgrad_fp8 and recipe.save_fp8_weight)]
    assert isinstance(pre_cast, FP8BlockWeight) and type(pre_cast.grad) is torch.Tensor
    assert pre_cast.grad.dtype == torch.float32
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("recipe", RECIPES[:3], ids=str)
def test_pre_cast_expert_weights_give_the_same_outputs_and_gradients(recipe, monkeypatch):
    casts = count_weight_casts(monkeypatch)
    torch.manual_seed(0)
    layers = [FP8GroupedLinear(3, 256, 128, recipe=recipe) for _ in range(2)]
    layers[0].weight = nn.Parameter(FP8BlockWeight(*per_block_cast(layers[0].weight.detach()),
                                                   torch.float32))
    layers[1].weight = nn.Parameter(layers[0].weight.dequantize())
    x = torch.randn(512, 256, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 128, 128, 512], dtype=torch.int32)  # an empty expert too
    results, weight_casts = [], []
    for layer in layers:
        casts.clear()
        xi = x.clone().requires_grad_()
        y = layer(xi, offsets)
        y.float().square().sum().backward()
        results.append((y, xi.grad, layer.weight.grad))
        weight_casts.append(len(casts))
    assert weight_casts[0] == 0 and weight_casts[1] > 0
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_pre_cast_weight_checks():
    data, scale = per_block_cast(torch.randn(256, 128))
    with pytest.raises(TypeError, match="fp8_data: expected dtype"):
        FP8BlockWeight(data.float(), scale, torch.bfloat16)
    with pytest.raises(ValueError, match=r"fp8_scale: expected shape \(2, 1\)"):
        FP8BlockWeight(data, scale.t(), torch.bfloat16)
    with pytest.raises(TypeError, match="dtype: expected one of"):
        FP8BlockWeight(data, scale, torch.int32)
    weight = FP8BlockWeight(data, scale, torch.bfloat16)
    with pytest.raises(ValueError, match="weight: the recipe asks for power-of-two scales"):
        fp8_linear(torch.randn(4, 128), weight, None, FP8Recipe(pow2_scale=True))
    # Aliases keep the FP8 payload; everything else sees the dequantized weight.
    assert isinstance(nn.Parameter(weight), FP8BlockWeight)
    assert isinstance(torch.as_strided(weight, (256, 128), (128, 1)), FP8BlockWeight)
    transposed = weight.t()
    assert type(transposed) is torch.Tensor
    assert torch.equal(transposed, weight.dequantize().t())


def test_wrapped_master_trains_like_the_plain_one():
    torch.manual_seed(0)
    plain = nn.Sequential(FP8Linear(128, 256), nn.GELU(), FP8Linear(256, 128, bias=False),
                          FP8Linear(128, 128, recipe=FP8Recipe(fprop_fp8=False, dgrad_fp8=False)))
    wrapped = copy.deepcopy(plain)
    assert enable_fp8_all_gather(wrapped) == ["0.weight", "2.weight"]  # 3: no FP8 weight use
    assert enable_fp8_all_gather(wrapped) == []  # already wrapped
    assert wrapped[0].weight.data_ptr() == wrapped[0].weight.hp.data_ptr() != 0
    x = torch.randn(256, 128)
    for model in (plain, wrapped):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert isinstance(wrapped[0].weight, FP8AllGatherWeight)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(p.detach(), q.detach().hp if isinstance(q, FP8AllGatherWeight)
                           else q.detach())


def test_enable_fp8_all_gather_checks_its_arguments():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        enable_fp8_all_gather(torch.randn(2))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="world_size: expected a positive int"):
            enable_fp8_all_gather(nn.Linear(2, 2), world_size=bad)
    with pytest.raises(TypeError, match="skip_ineligible: expected a bool"):
        enable_fp8_all_gather(nn.Linear(2, 2), skip_ineligible=None)
    with pytest.raises(TypeError, match="hp: expected a plain torch.Tensor"):
        FP8AllGatherWeight(FP8AllGatherWeight(torch.randn(128, 128)))
    with pytest.raises(TypeError, match="pow2_scale: expected a bool"):
        FP8AllGatherWeight(torch.randn(128, 128), pow2_scale=1)
