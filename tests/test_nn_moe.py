"""MoE: the padded contiguous layout, FP8GroupedLinear against the step-by-step recipe
(bit-exact) and the FP32 GroupedLinear, FP8MoE against the FP32 MoE, argument checks."""
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train.nn import FP8GroupedLinear, FP8MoE, FP8Recipe, GroupedLinear, MoE
from fp8train.nn import moe as moe_module
from fp8train.nn.moe_layout import (TALL_SEGMENT_MIN_ROWS, build_moe_layout, padded_rows_bound, permute,
                                     segment_rows_for, unpermute)
from fp8train.ops import k_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_contiguous
from fp8train.quant import per_block_cast, per_token_cast, per_token_cast_transposed
from numerics import rand, rel_err

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")

# Each FP8 GEMM adds about 2.5-4% relative error on Gaussian data (see test_nn_linear's
# bound); the longest chain in an MoE step (dx: down dgrad, SwiGLU, gate_up dgrad, and the
# forward that feeds them) goes through at most four FP8 GEMMs.
MOE_REL_BOUND = 4 * 0.025


@given(t=st.integers(0, 300), e=st.integers(1, 9), k=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_layout_places_every_assignment_once_in_its_padded_segment(t, e, k, seed):
    k = min(k, e)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else \
        torch.zeros(0, k, dtype=torch.int64)
    layout = build_moe_layout(ids, e)
    offsets = layout.group_offsets.tolist()
    assert layout.num_rows == padded_rows_bound(t * k, e)
    counts_padded = (torch.bincount(ids.reshape(-1), minlength=e) + 127) // 128 * 128
    assert offsets[-1] == int(counts_padded.sum()) <= layout.num_rows  # spare rows: no expert
    assert offsets[0] == 0 and all(o % 128 == 0 for o in offsets)
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    assert torch.equal(layout.tokens_per_expert, counts)
    dest = layout.dest_rows.tolist()
    assert len(set(dest)) == t * k  # no two assignments share a row
    for i, row in enumerate(dest):
        expert = int(ids.reshape(-1)[i])
        assert offsets[expert] <= row < offsets[expert] + int(counts[expert])
        assert int(layout.src_tokens[row]) == i // k
    assert int((layout.src_tokens == t).sum()) == layout.num_rows - t * k
    x = rand(t, 8, seed=seed)
    x_perm = permute(x, layout)
    assert torch.equal(x_perm[layout.src_tokens == t], torch.zeros(layout.num_rows - t * k, 8))
    weights = torch.rand(t, k, generator=gen)
    expected = (x.unsqueeze(1) * weights.unsqueeze(-1)).sum(1)
    assert torch.allclose(unpermute(x_perm, layout, weights), expected, atol=1e-6)


def grouped_steps(x, w, offsets, grad_out, pow2):
    """FP8GroupedLinear written out with the public quant/ops calls."""
    y = m_grouped_fp8_gemm_nt_contiguous(per_token_cast(x, pow2_scale=pow2),
                                         per_block_cast(w, pow2_scale=pow2), offsets)
    dx = m_grouped_fp8_gemm_nt_contiguous(per_token_cast(grad_out, pow2_scale=pow2),
                                          per_block_cast(w.transpose(1, 2), pow2_scale=pow2),
                                          offsets)
    dw = k_grouped_fp8_gemm_nt_contiguous(per_token_cast_transposed(grad_out, pow2_scale=pow2),
                                          per_token_cast_transposed(x, pow2_scale=pow2), offsets)
    return y, dx, dw


@settings(max_examples=15)
@given(blocks=st.lists(st.integers(0, 2), min_size=1, max_size=4), kb=st.integers(1, 2),
       nb=st.integers(1, 2), pow2=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_grouped_linear_bit_exact_and_close_to_fp32(blocks, kb, nb, pow2, seed, dtype):
    g, k, n = len(blocks), 128 * kb, 128 * nb
    offsets = torch.tensor([0] + [128 * b for b in blocks], dtype=torch.int32).cumsum(0)
    offsets = offsets.to(torch.int32)
    m = int(offsets[-1])
    ref = GroupedLinear(g, k, n)
    module = FP8GroupedLinear.from_grouped(copy.deepcopy(ref).to(dtype),
                                           FP8Recipe(pow2_scale=pow2))
    x = rand(m, k, seed=seed, dtype=dtype).requires_grad_()
    grad_out = rand(m, n, seed=seed + 1, dtype=dtype)
    y = module(x, offsets)
    y.backward(grad_out)
    if m == 0:  # no tokens at all: empty output, zero weight gradient
        assert y.shape == (0, n) and not module.weight.grad.any()
        return
    y_ref, dx_ref, dw_ref = grouped_steps(x.detach(), module.weight.detach(), offsets,
                                          grad_out, pow2)
    assert torch.equal(y, y_ref.to(dtype)) and torch.equal(x.grad, dx_ref.to(dtype))
    assert torch.equal(module.weight.grad, dw_ref.to(dtype))
    for e, b in enumerate(blocks):  # experts without tokens get zero weight gradients
        if b == 0:
            assert not module.weight.grad[e].any()
    xr = x.detach().float().requires_grad_()
    ref.weight.data.copy_(module.weight.float())
    y32 = ref(xr, offsets)
    y32.backward(grad_out.float())
    for got, want in ((y, y32), (x.grad, xr.grad), (module.weight.grad, ref.weight.grad)):
        assert rel_err(got, want) < 0.06


@pytest.mark.parametrize("name", ["wgrad_hp", "fprop_only"])
def test_fp8_grouped_linear_high_precision_paths(name):
    offsets = torch.tensor([0, 128, 128, 384], dtype=torch.int32)
    ref = GroupedLinear(3, 128, 256)
    module = FP8GroupedLinear.from_grouped(copy.deepcopy(ref), FP8Recipe.from_name(name))
    x, grad_out = rand(384, 128, seed=1), rand(384, 256, seed=2)
    results = []
    for mod in (module, ref):
        xi = x.clone().requires_grad_()
        mod(xi, offsets).backward(grad_out)
        results.append((xi.grad, mod.weight.grad))
    (dx, dw), (dx_ref, dw_ref) = results
    assert torch.allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
    assert (rel_err(dx, dx_ref) < 1e-6) == (name == "fprop_only")


def test_fp8_grouped_linear_main_grad():
    offsets = torch.tensor([0, 256, 384], dtype=torch.int32)
    plain = FP8GroupedLinear(2, 128, 128)
    fused = FP8GroupedLinear.from_grouped(copy.deepcopy(plain),
                                          FP8Recipe(accumulate_into_main_grad=True))
    fused.weight.main_grad = torch.ones(2, 128, 128)
    x, grad_out = rand(384, 128, seed=3), rand(384, 128, seed=4)
    plain(x, offsets).backward(grad_out)
    fused(x, offsets).backward(grad_out)
    assert fused.weight.grad is None
    assert torch.equal(fused.weight.main_grad, plain.weight.grad + 1)


def count_permutations(monkeypatch) -> list:
    """Records each permuted high-precision copy the grouped layers make ("gather") and
    each cast with the permutation fused ("cast", colwise)."""
    import fp8train.nn.grouped_linear as grouped_linear
    import fp8train.quant.moe_casts as moe_casts

    calls = []
    gather, cast = grouped_linear.gather_rows, moe_casts.per_token_cast_permuted
    monkeypatch.setattr(grouped_linear, "gather_rows",
                        lambda *a: calls.append(("gather",)) or gather(*a))
    monkeypatch.setattr(moe_casts, "per_token_cast_permuted", lambda *a, **kw: calls.append(
        ("cast", kw.get("colwise", False))) or cast(*a, **kw))
    return calls


FUSED_RECIPES = [FP8Recipe(), FP8Recipe(pow2_scale=True, save_fp8_weight=True),
                 FP8Recipe.from_name("wgrad_hp"), FP8Recipe.from_name("fprop_only"),
                 FP8Recipe(fprop_fp8=False), FP8Recipe(dgrad_fp8=False)]


@pytest.mark.parametrize("recipe", FUSED_RECIPES, ids=str)
def test_grouped_linear_with_src_tokens_equals_permute_then_layer(recipe, monkeypatch):
    """FP8GroupedLinear(x, offsets, src_tokens) fuses the permutation into its casts: the
    same bits as permute() and the layer, and the permuted high-precision copy is made only
    for a high-precision GEMM (fprop in forward, wgrad in backward)."""
    torch.manual_seed(0)
    t, e, k = 150, 4, 3
    layout = build_moe_layout(torch.stack([torch.randperm(e)[:k] for _ in range(t)]), e)
    fused = FP8GroupedLinear(e, 256, 128, dtype=torch.bfloat16, recipe=recipe)
    unfused = copy.deepcopy(fused)
    x = rand(t, 256, seed=1, dtype=torch.bfloat16)
    grad_out = rand(layout.num_rows, 128, seed=2, dtype=torch.bfloat16)
    calls = count_permutations(monkeypatch)
    x_fused = x.clone().requires_grad_()
    y = fused(x_fused, layout.group_offsets, layout.src_tokens)
    y.backward(grad_out)
    expected = [("cast", recipe.wgrad_fp8)] if recipe.fprop_fp8 else [("gather",)]
    if not recipe.wgrad_fp8:
        expected.append(("gather",))  # the rows for the high-precision wgrad, in backward
    assert calls == expected
    x_unfused = x.clone().requires_grad_()
    y_ref = unfused(permute(x_unfused, layout), layout.group_offsets)
    y_ref.backward(grad_out)
    assert torch.equal(y, y_ref) and torch.equal(x_fused.grad, x_unfused.grad)
    assert torch.equal(fused.weight.grad, unfused.weight.grad)
    with torch.no_grad():  # inference: the row-wise cast alone
        calls.clear()
        assert torch.equal(fused(x, layout.group_offsets, layout.src_tokens), y)
        assert calls == ([("cast", False)] if recipe.fprop_fp8 else [("gather",)])


@pytest.mark.parametrize("recipe", FUSED_RECIPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_linear_with_swiglu_equals_silu_gate_times_up_then_layer(recipe, dtype, monkeypatch):
    """FP8GroupedLinear(h, offsets, swiglu=True) fuses SwiGLU into its input casts: the same
    bits as F.silu(gate) * up and the layer (output and every gradient), and the product is
    made in high precision only where a high-precision GEMM reads it."""
    from fp8train.quant import casts

    products = []
    original = casts.swiglu_cast
    monkeypatch.setattr(casts, "swiglu_cast", lambda *a, **kw: products.append("fused") or original(*a, **kw))
    torch.manual_seed(0)
    e, rows, k = 3, 384, 128
    offsets = torch.tensor([0, 128, 128, 384], dtype=torch.int32)
    fused = FP8GroupedLinear(e, k, 256, dtype=dtype, recipe=recipe)
    unfused = copy.deepcopy(fused)
    h = rand(rows, 2 * k, seed=1, dtype=dtype)
    grad_out = rand(rows, 256, seed=2, dtype=dtype)
    h_fused = h.clone().requires_grad_()
    y = fused(h_fused, offsets, swiglu=True)
    y.backward(grad_out)
    h_unfused = h.clone().requires_grad_()
    gate, up = h_unfused.chunk(2, dim=-1)
    y_ref = unfused(torch.nn.functional.silu(gate) * up, offsets)
    y_ref.backward(grad_out)
    assert torch.equal(y, y_ref) and torch.equal(h_fused.grad, h_unfused.grad)
    assert torch.equal(fused.weight.grad, unfused.weight.grad)
    assert products == (["fused"] if recipe.fprop_fp8 and recipe.wgrad_fp8 else [])
    assert torch.equal(GroupedLinear.forward(fused, h, offsets, swiglu=True).to(dtype),
                       GroupedLinear.forward(unfused, torch.nn.functional.silu(h[:, :k]) * h[:, k:], offsets))


def test_swiglu_input_checks():
    grouped = FP8GroupedLinear(2, 128, 128)
    offsets = torch.tensor([0, 0, 128], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x: expected shape \[M, 256\] \(\[gate \| up\]\), got \(128, 128\)"):
        grouped(torch.ones(128, 128), offsets, swiglu=True)
    with pytest.raises(ValueError, match="src_tokens: a SwiGLU input"):
        grouped(torch.ones(128, 256), offsets, torch.zeros(128, dtype=torch.int64), swiglu=True)
    with pytest.raises(TypeError, match="swiglu"):
        grouped(torch.ones(128, 256), offsets, swiglu=1)


def test_fp8_moe_step_casts_tokens_with_the_permutation_fused(monkeypatch):
    """One training step: the gate_up input is cast once, row-wise and column-wise, straight
    from the tokens; no permuted BF16 copy is made."""
    calls = count_permutations(monkeypatch)
    moe = FP8MoE(256, 128, 4, 2, dtype=torch.bfloat16)
    x = rand(90, 256, seed=3, dtype=torch.bfloat16).requires_grad_()
    moe(x).float().square().sum().backward()
    assert calls == [("cast", True)]
    with pytest.raises(ValueError, match="src_tokens"):
        moe.experts_gate_up(x, torch.tensor([0, 0, 0, 0, 100], dtype=torch.int32),
                            torch.zeros(100, dtype=torch.int64))


@settings(max_examples=8)
@given(t=st.integers(1, 160), e=st.sampled_from([1, 4, 8]), k=st.integers(1, 2),
       shared=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_moe_close_to_fp32_moe(t, e, k, shared, seed, dtype):
    torch.manual_seed(seed)
    k = min(k, e)
    ref = MoE(256, 128, e, k, shared_expert_dim=128 if shared else 0)
    fp8 = FP8MoE.from_moe(copy.deepcopy(ref).to(dtype))
    ref.load_state_dict({key: v.float() for key, v in fp8.state_dict().items()})
    x = rand(2, t, 256, seed=seed, dtype=dtype)
    grad_out = rand(2, t, 256, seed=seed + 1, dtype=dtype)
    router_scale = router_error_scale(ref, x.float(), grad_out.float())
    results = []
    for module, xi in ((fp8, x.clone()), (ref, x.float())):
        xi.requires_grad_()
        y = module(xi)
        y.backward(grad_out.to(y.dtype))
        results.append([y, xi.grad] + [p.grad for p in module.parameters()])
    assert results[0][0].dtype == dtype
    names = ["y", "dx"] + [name for name, _ in ref.named_parameters()]
    for name, got, want in zip(names, *results):
        assert got.dtype == dtype
        if "shared_expert" in name:  # untouched nn.Linear: only the inputs differ
            continue
        if name == "router.weight" and k == 1:
            # One renormalised expert weight is identically 1: its gradient is zero up to
            # float32 noise in both modules, so only its smallness is comparable.
            assert got.abs().max() < 1e-4 and want.abs().max() < 1e-4
            continue
        if name == "router.weight":
            # The router's gradient is a difference of expert outputs (dL/dw_j = y_j . g):
            # FP8 errors in the y_j do not cancel where the y_j . g do, so it is bounded
            # against the size of the terms, not of their difference.
            assert (got.double() - want.double()).norm() <= MOE_REL_BOUND * router_scale
            continue
        assert rel_err(got, want) < MOE_REL_BOUND, name


def router_error_scale(moe: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """What the router gradient's error scales with when each expert output y_tj carries
    an independent relative error: the error of y_tj . g_t is ~ ||y_tj|| ||g_t|| / sqrt(H),
    and the gradient adds x_t times those over tokens and slots (root sum of squares)."""
    captured = {}
    hooks = [moe.router.register_forward_hook(lambda m, i, o: captured.__setitem__("route", o)),
             moe.experts_down.register_forward_hook(lambda m, i, o: captured.__setitem__("y", o))]
    try:
        with torch.no_grad():
            moe(x)
    finally:
        for hook in hooks:
            hook.remove()
    _, ids = captured["route"]
    layout = build_moe_layout(ids, moe.num_experts)
    x_t, g_t = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    y_norms = captured["y"][layout.dest_rows].double().norm(dim=-1).view(ids.shape)  # [T, k]
    terms = x_t.double().norm(dim=-1, keepdim=True) * y_norms * g_t.double().norm(dim=-1, keepdim=True)
    return (terms.square().sum().sqrt() / x.shape[-1] ** 0.5).item()


def test_fp8_moe_compiles_fullgraph():
    torch.manual_seed(0)
    module = FP8MoE(128, 128, 4, 2)
    x = rand(3, 40, 128, seed=5).requires_grad_()

    def step(inp):
        return module(inp).square().sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    assert torch.equal(step(x), loss)
    step(x).backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in module.parameters()]):
        assert torch.equal(a, b)


def test_moe_argument_checks():
    with pytest.raises(ValueError, match="top_k"):
        MoE(128, 128, 2, 3)
    with pytest.raises(TypeError, match="num_experts"):
        MoE(128, 128, 2.0, 1)
    with pytest.raises(ValueError, match="hidden_size"):
        FP8MoE(100, 128, 2, 1)
    with pytest.raises(ValueError, match="moe"):
        FP8MoE.from_moe(MoE(128, 64, 2, 1))
    with pytest.raises(TypeError, match="moe"):
        FP8MoE.from_moe(GroupedLinear(2, 128, 128))
    with pytest.raises(TypeError, match="recipe"):
        FP8MoE(128, 128, 2, 1, recipe="fp8")
    with pytest.raises(ValueError, match="x"):
        MoE(128, 128, 2, 1)(torch.ones(3, 64))
    with pytest.raises(ValueError, match="out_features"):
        FP8GroupedLinear(2, 128, 100)
    grouped = FP8GroupedLinear(2, 128, 128)
    with pytest.raises(ValueError, match="group_offsets"):
        grouped(torch.ones(128, 128), torch.tensor([0, 128], dtype=torch.int32))
    with pytest.raises(TypeError, match="group_offsets"):
        grouped(torch.ones(128, 128), torch.tensor([0, 0, 128]))
    with pytest.raises(ValueError, match="x"):
        grouped(torch.ones(100, 128), torch.tensor([0, 0, 100], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_experts"):
        build_moe_layout(torch.zeros(2, 1, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="topk_ids"):
        build_moe_layout(torch.zeros(2, 1), 2)
    layout = build_moe_layout(torch.zeros(2, 1, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="topk_weights"):
        unpermute(torch.ones(layout.num_rows, 4), layout, torch.ones(3, 1))


def test_experts_with_enough_rows_get_256_row_segments():
    """256-row segments (the grouped GEMMs' 256-row tiles) from an average of
    TALL_SEGMENT_MIN_ROWS rows an expert; the layout's offsets keep the promise."""
    assert segment_rows_for(TALL_SEGMENT_MIN_ROWS * 8, 8) == 256
    assert segment_rows_for(TALL_SEGMENT_MIN_ROWS * 8 - 1, 8) == 128
    assert segment_rows_for(0, 1) == 128
    ids = torch.randint(0, 3, (700, 2), generator=torch.Generator().manual_seed(0))
    layout = build_moe_layout(ids, 3, align=256)
    assert layout.align == 256 and layout.num_rows % 256 == 0
    assert all(int(o) % 256 == 0 for o in layout.group_offsets)
    with pytest.raises(ValueError, match="align: expected a positive multiple of 128, got 64"):
        build_moe_layout(ids, 3, align=64)
    grouped = FP8GroupedLinear(2, 128, 128)
    with pytest.raises(ValueError, match="segment_rows: expected 128 or 256, got 512"):
        grouped(torch.ones(512, 128), torch.tensor([0, 0, 512], dtype=torch.int32), segment_rows=512)
    with pytest.raises(ValueError, match="x: expected rows padded to a multiple of segment_rows = 256"):
        grouped(torch.ones(384, 128), torch.tensor([0, 128, 384], dtype=torch.int32), segment_rows=256)


def test_fp8_moe_on_256_row_segments_gives_the_bits_of_128_row_ones(monkeypatch):
    """Where its experts average enough rows the FP8 MoE lays them out in 256-row segments
    and its m-grouped GEMMs are told so; padding rows are zeros, so the output and every
    gradient are bit for bit those of the 128-row layout."""
    from fp8train.ops import gemm as gemm_module

    seen = []
    original = gemm_module.m_grouped_fp8_gemm_nt_contiguous

    def spy(*args, segment_rows=128, **kwargs):
        seen.append(segment_rows)
        return original(*args, segment_rows=segment_rows, **kwargs)

    monkeypatch.setattr(gemm_module, "m_grouped_fp8_gemm_nt_contiguous", spy)
    torch.manual_seed(0)
    moe = FP8MoE(128, 128, 2, 1)
    x = rand(2 * TALL_SEGMENT_MIN_ROWS, 128, seed=1)
    results = []
    for rule in (segment_rows_for, lambda assignments, experts: 128):
        monkeypatch.setattr(moe_module, "segment_rows_for", rule)
        seen.clear()
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.square().sum().backward()
        results.append([y, xi.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
        assert seen == ([256, 256, 256, 256] if rule is segment_rows_for else [128] * 4), seen
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpermute_gives_autograds_bits_and_keeps_the_rows_not_their_fp32_copy(dtype):
    """unpermute's Function against the same sum written as plain autograd ops: the output
    and both gradients bit for bit; what backward keeps is y (the padded rows in y's dtype),
    not the FP32 gathered rows autograd's multiply would keep."""
    from test_nn_linear import saved_bytes

    torch.manual_seed(0)
    t, k, h = 2048, 4, 128  # padding: at most 127 rows for each of 8 experts against 8192
    layout = build_moe_layout(torch.stack([torch.randperm(8)[:k] for _ in range(t)]), 8)
    y = rand(layout.num_rows, h, seed=1, dtype=dtype)
    weights = torch.rand(t, k)
    grad_out = rand(t, h, seed=2, dtype=dtype)

    def plain(y, weights):
        rows = y[layout.dest_rows].view(t, k, h)
        return (rows.float() * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)

    results, kept = [], []
    for fn in (lambda a, b: unpermute(a, layout, b), plain):
        yi, wi = y.clone().requires_grad_(), weights.clone().requires_grad_()
        kept.append(saved_bytes(lambda: fn(yi, wi))[0])
        out = fn(yi, wi)
        out.backward(grad_out)
        results.append((out, yi.grad, wi.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)
    if dtype == torch.bfloat16:
        assert kept[0] <= 0.65 * kept[1], kept


def test_layout_rejects_expert_ids_out_of_range():
    from fp8train.nn.moe_layout import build_moe_layout

    for bad in ([[0, 4]], [[-1, 2]]):
        with pytest.raises(ValueError, match=r"topk_ids: expected expert ids in \[0, 4\)"):
            build_moe_layout(torch.tensor(bad), 4)


def dense_loop_moe(moe, x):
    """The MoE written independently of its layout, kernels and router module: per token, a
    softmax over the router logits, its top-k, and each chosen expert as dense matmuls."""
    w_router = moe.router.weight
    w_gate_up, w_down = moe.experts_gate_up.weight, moe.experts_down.weight
    probs = (x.float() @ w_router.float().t()).softmax(-1)
    weights, ids = probs.topk(moe.top_k, dim=-1)
    if moe.router.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(moe.top_k):
            e = int(ids[t, j])
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            acc = acc + weights[t, j] * (w_down[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(acc)
    out = torch.stack(rows)
    if moe.shared_expert is not None:
        out = out + moe.shared_expert(x)
    return out


@pytest.mark.parametrize("fp8", [False, True])
def test_router_and_expert_gradients_match_an_independent_dense_loop(fp8):
    """The router's gradient (and every other) against a MoE that shares no code with the
    layer: a router gradient lost on the way (zeroed, detached) fails here."""
    torch.manual_seed(0)
    moe = MoE(128, 128, num_experts=4, top_k=2, shared_expert_dim=128)
    model = FP8MoE.from_moe(moe) if fp8 else moe
    x = torch.randn(64, 128, requires_grad=True)
    model(x).square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    got_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    dense_loop_moe(moe, x).square().mean().backward()
    bound = 0.1 if fp8 else 1e-5  # FP8: e4m3 rounding of the expert GEMMs' operands
    for name, p in moe.named_parameters():
        assert p.grad.norm() > 0, name
        assert rel_err(got[name], p.grad) < bound, name
    assert rel_err(got_x, x.grad) < bound


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
def test_fp8_moe_experts_as_one_function_give_the_bits_of_two_layers(dtype, autocast, monkeypatch):
    """The experts' two projections as one Function (SwiGLU's gradient made inside the
    gate_up projection's casts): output and every gradient the bits of the two layers."""
    from fp8train.nn.grouped_swiglu import FP8GroupedSwiGLUFunction

    torch.manual_seed(0)
    moe = FP8MoE(256, 128, 4, 2, shared_expert_dim=128, dtype=dtype)
    x = rand(2, 45, 256, seed=3, dtype=dtype)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(moe_module, "fuses_expert_block", lambda *args: False)
        seen = []
        original = FP8GroupedSwiGLUFunction.apply
        monkeypatch.setattr(FP8GroupedSwiGLUFunction, "apply", lambda *a: seen.append(1) or original(*a))
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = moe(xi)
        y.float().square().sum().backward()
        assert seen == ([1] if fused else [])
        results.append([y, xi.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_fp8_moe_experts_run_as_two_layers_where_one_function_does_not_fit():
    """Inference, a frozen expert weight, another recipe or a hook on an expert layer: the two
    layers run (their results)."""
    from fp8train.nn.grouped_swiglu import fuses_expert_block

    moe = FP8MoE(256, 128, 4, 2)
    x = rand(45, 256, seed=3).requires_grad_()
    w_gu, w_down = moe.experts_gate_up.weight, moe.experts_down.weight
    assert fuses_expert_block(x, w_gu, w_down, FP8Recipe())
    assert not fuses_expert_block(x.detach(), w_gu, w_down, FP8Recipe())
    assert not fuses_expert_block(x, w_gu, w_down, FP8Recipe(save_fp8_weight=True))
    assert not fuses_expert_block(x, w_gu, w_down, FP8Recipe.from_name("wgrad_hp"))
    with torch.no_grad():
        assert not fuses_expert_block(x, w_gu, w_down, FP8Recipe())
    seen = []
    moe.experts_down.register_forward_hook(lambda *args: seen.append(1))
    moe(x).sum().backward()
    assert seen == [1]
