"""Tiny transformers models built from configs (no download) for the tests/test_hf_* files:
every GEMM dim a multiple of 128 except DeepSeek-V3's kv_a_proj_with_mqa (kv_lora_rank +
qk_rope_head_dim = 192), which conversion must keep in high precision and report."""
import torch

from numerics import rel_err  # noqa: F401  (the HF tests import it from here)

ARCHS = {
    "llama": dict(intermediate_size=256, head_dim=64),
    "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                      num_experts_per_tok=2, head_dim=64, decoder_sparse_step=1),
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=64),
    "deepseek_v3": dict(intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64),
}
# Experts stored transposed ([E, H, 2I]) with biases and a clamped, interleaved gate:
# the is_transposed / has_bias paths of the "fp8train" experts implementation.
ARCHS_EXTRA = {
    "gpt_oss": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=64, layer_types=["full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
VOCAB = 256


def tiny_config(arch: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                max_position_embeddings=64,
                                **{**ARCHS, **ARCHS_EXTRA}[arch])


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


def batch(seed: int = 0, batch_size: int = 2, seq_len: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)


