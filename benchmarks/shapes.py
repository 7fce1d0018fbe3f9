"""Real layer shapes of released MoE models, as transformers configs with a chosen number of layers."""

from __future__ import annotations


def qwen3_30b_a3b(num_layers: int):
    """Qwen3-30B-A3B: hidden 2048, 128 experts x 768, top-8, 32 q / 4 kv heads of 128, vocab 151936."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


SHAPES = {"qwen3-30b-a3b": qwen3_30b_a3b}
