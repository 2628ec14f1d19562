"""convert_to_fp8 on a tiny Llama-style model (dense and MoE): what is swapped, what is
kept and why, idempotence, shared parameters, and a few CPU training steps that lower the
loss."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8train
from fp8train.nn import FP8Linear, FP8MoE, FP8Recipe, MoE, convert_to_fp8

warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, S, hs)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, moe):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim), RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.mlp = MoE(dim, hidden, 4, 2, shared_expert_dim=hidden) if moe else MLP(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=200, dim=128, heads=2, hidden=256, layers=2, moe=False, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden, moe) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.odd = nn.Linear(dim, 96)  # a layer whose dims rule FP8 out
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x)) + 0 * self.odd(x).sum()


def test_convert_swaps_eligible_layers_and_reports_the_rest():
    model = TinyLlama(vocab=256, moe=True)
    params_before = {name: p for name, p in model.named_parameters()}
    report = convert_to_fp8(model)
    converted = dict(report.converted)
    skipped = dict(report.skipped)
    # per layer: q/k/v/o (4) + the MoE block + its shared expert's 3 linears
    assert report.num_converted == 2 * (4 + 1 + 3)
    assert converted["layers.0.mlp"] == "FP8MoE"
    assert converted["layers.1.self_attn.q_proj"] == "FP8Linear"
    assert isinstance(model.layers[0].mlp, FP8MoE)
    assert isinstance(model.layers[0].mlp.shared_expert.down_proj, FP8Linear)
    assert "vocabulary" in skipped["lm_head"] and "out_features=96" in skipped["odd"]
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    # Parameters are the same objects, under the same names.
    assert {name: p for name, p in model.named_parameters()} == params_before
    text = str(report)
    assert "converted  layers.0.mlp -> FP8MoE" in text and "kept       lm_head" in text
    # Idempotent: a second call swaps nothing and lists what is already FP8.
    again = convert_to_fp8(model)
    assert again.num_converted == 0 and len(again.already_fp8) == report.num_converted


def test_head_detection_filter_and_keep_head():
    tied = TinyLlama(vocab=256, tied=True)
    report = convert_to_fp8(tied)
    assert "tied" in dict(report.skipped)["lm_head"]
    named = TinyLlama(vocab=256, layers=1)
    named.embed_tokens = nn.Embedding(300, 128)  # vocab no longer matches: the name decides
    assert "named 'lm_head'" in dict(convert_to_fp8(named).skipped)["lm_head"]
    model = TinyLlama(vocab=256, layers=1)
    report = convert_to_fp8(model, FP8Recipe(pow2_scale=True), keep_head=False,
                            filter_fn=lambda module, name: "k_proj" not in name)
    assert isinstance(model.lm_head, FP8Linear) and model.lm_head.recipe.pow2_scale
    assert dict(report.skipped)["layers.0.self_attn.k_proj"] == "filter_fn returned False"


def test_convert_checks_its_arguments():
    with pytest.raises(TypeError, match="model"):
        convert_to_fp8("model")
    with pytest.raises(TypeError, match="recipe"):
        convert_to_fp8(TinyLlama(), recipe="deepseek_v3")
    with pytest.raises(TypeError, match="filter_fn"):
        convert_to_fp8(TinyLlama(), filter_fn=3)
    with pytest.raises(ValueError, match="model"):
        convert_to_fp8(nn.Linear(128, 128))


class Sub(nn.Linear):
    pass


def test_subclasses_of_linear_are_left_alone():
    model = nn.Sequential(Sub(128, 128), nn.Linear(128, 128))
    report = convert_to_fp8(model)
    assert type(model[0]) is Sub and isinstance(model[1], FP8Linear)
    assert "subclass" in dict(report.skipped)["0"]


@pytest.mark.parametrize("moe", [False, True])
def test_converted_model_trains_on_cpu(moe):
    torch.manual_seed(0)
    model = TinyLlama(vocab=64, moe=moe, layers=1).to(torch.bfloat16)
    report = fp8train.convert_to_fp8(model)
    assert report.num_converted >= 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable sequence: each token predicts the next of a fixed random permutation.
    perm = torch.randperm(64)
    start = torch.randint(0, 64, (8, 1))
    tokens = (start + torch.arange(33)) % 64
    tokens = perm[tokens]
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 64), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
