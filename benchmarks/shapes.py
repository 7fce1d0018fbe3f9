"""Real layer shapes of released MoE models, as transformers configs with a chosen number of layers.

Each builder takes the number of decoder layers (and, where the model starts with dense layers, how many of them to
keep: by default the released count, but always leaving at least one MoE layer). Shapes from the models' released
config.json files.
"""

from __future__ import annotations


def qwen3_30b_a3b(num_layers: int, dense_layers: int | None = None):
    """Qwen3-30B-A3B: hidden 2048, 128 experts x 768, top-8, 32 q / 4 kv heads of 128, vocab 151936."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def qwen3_next_80b(num_layers: int, dense_layers: int | None = None):
    """Qwen3-Next-80B-A3B's MoE blocks: hidden 2048, 512 experts x 512, top-10, one shared expert of 512 behind a
    sigmoid gate, vocab 151936. Its hybrid attention (Gated DeltaNet in 3 of 4 layers) is not a supported family
    yet, so the layers are written in the Qwen2-MoE format, which has the same MoE block (router, 512 routed
    experts, gated shared expert) with full attention (16 q / 2 kv heads of 128): the expert work, the bytes and
    the memory of the MoE phase are the model's; the attention is a stand-in."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_hidden_layers=num_layers, num_attention_heads=16,
        num_key_value_heads=2, num_experts=512, num_experts_per_tok=10, norm_topk_prob=True,
        max_position_embeddings=262144, rope_theta=10000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False, bos_token_id=1, eos_token_id=2,
    )


def _dense(released: int, num_layers: int, dense_layers: int | None) -> int:
    k = released if dense_layers is None else dense_layers
    return max(0, min(k, num_layers - 1))


def deepseek_v3(num_layers: int, dense_layers: int | None = None):
    """DeepSeek-V3 / R1 (Kimi-K2 has the same layer shapes with 384 experts): hidden 7168, MLA attention, 256
    experts x 2048, top-8 of 8 groups (4 chosen), one shared expert, sigmoid router with correction bias, first 3
    layers dense (18432), vocab 129280. The release is FP8 block-scaled (synth.py --fp8 writes it so)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=num_layers, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=_dense(3, num_layers, dense_layers), norm_topk_prob=True,
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1,
    )


def kimi_k2(num_layers: int, dense_layers: int | None = None):
    """Kimi-K2 (Instruct / Thinking): DeepSeek-V3's architecture (config model_type kimi_k2) with 384 experts x 2048,
    top-8, one routing group, 64 heads, first layer dense (18432), routed scaling 2.827, vocab 163840; released in
    FP8 with 128 x 128 blocks (its experts: 16.9 GB per layer in FP8, 33.8 GB decoded to bf16)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=num_layers, num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1,
        n_routed_experts=384, routed_scaling_factor=2.827, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=8,
        first_k_dense_replace=_dense(1, num_layers, dense_layers), norm_topk_prob=True,
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=163584,
        eos_token_id=163585,
    )


def nemotron_3_nano(num_layers: int, dense_layers: int | None = None):
    """Nemotron-3 Nano 30B-A3B (nemotron_h): hidden 2688, 52 layers as released (23 Mamba-2, 23 MoE, 6 attention),
    128 ungated (ReLU^2) experts of 1856 + one shared of 3712, top-6, sigmoid routing scaled 2.5, attention 32 q / 2
    kv heads of 128 without rotary, Mamba-2 64 heads of 64 (state 128, 8 groups), vocab 131072. `num_layers` takes
    the first layers of the release's pattern (Mamba, MoE, Mamba, MoE, ...: `dense_layers` is not used; the first MoE
    layer is layer 1)."""
    from transformers import NemotronHConfig

    pattern = ("linear_attention", "moe") * 2 + ("full_attention",)
    return NemotronHConfig(
        vocab_size=131072, hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        intermediate_size=1856, n_routed_experts=128, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128,
        n_groups=8, expand=2, conv_kernel=4, layers_block_type=[pattern[i % len(pattern)] for i in range(num_layers)],
        max_position_embeddings=262144, tie_word_embeddings=False,
    )


def longcat_flash(num_layers: int, dense_layers: int | None = None):
    """LongCat-Flash (560B): hidden 6144, 28 layers of two MLA attention + dense-MLP (12288) sublayers with a shortcut
    MoE of 512 experts x 2048 beside 256 zero-computation (identity) experts, top-12 over both, routed scaling 6.0,
    64 heads (q rank 1536, kv rank 512, 128 + 64 qk dims, v 128), vocab 131072 (`dense_layers`: not used)."""
    from transformers import LongcatFlashConfig

    return LongcatFlashConfig(
        vocab_size=131072, hidden_size=6144, num_layers=num_layers, num_attention_heads=64, num_key_value_heads=64,
        ffn_hidden_size=12288, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, head_dim=64, moe_topk=12, n_routed_experts=512, zero_expert_num=256,
        expert_ffn_hidden_size=2048, routed_scaling_factor=6.0, max_position_embeddings=131072,
        tie_word_embeddings=False,
    )


def gpt_oss_120b(num_layers: int, dense_layers: int | None = None):
    """gpt-oss-120b: hidden 2880, 128 experts x 2880 (biases, clamped SwiGLU), top-4, 64 q / 8 kv heads of 64 with
    sinks, sliding window 128 on every other layer, vocab 201088; released with MXFP4 experts (synth: --mxfp4 is
    for the sparse plan checkpoints only)."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=num_layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
    )


def glm_45_air(num_layers: int, dense_layers: int | None = None):
    """GLM-4.5-Air: hidden 4096, 128 experts x 1408, top-8, one shared expert, sigmoid router with correction
    bias (one group), first layer dense (10944), 96 q / 8 kv heads of 128 with biases, vocab 151552."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=num_layers, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        n_shared_experts=1, n_routed_experts=128, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        num_experts_per_tok=8, first_k_dense_replace=_dense(1, num_layers, dense_layers), norm_topk_prob=True,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )


def glm_5(num_layers: int, dense_layers: int | None = None):
    """GLM-5 (glm_moe_dsa): hidden 6144, DeepSeek sparse attention (MLA with a lightning indexer of 32 heads of 128
    keeping 2048 keys per query), 256 experts x 2048, top-8, one shared expert, sigmoid router with correction bias
    (one group), routed scaling 2.5, first 3 layers dense (12288), vocab 154880: transformers' defaults for it."""
    from transformers import GlmMoeDsaConfig

    dense = _dense(3, num_layers, dense_layers)
    return GlmMoeDsaConfig(num_hidden_layers=num_layers, first_k_dense_replace=dense,
                           mlp_layer_types=["dense"] * dense + ["sparse"] * (num_layers - dense),
                           tie_word_embeddings=False)


def deepseek_v4_flash(num_layers: int, dense_layers: int | None = None):
    """DeepSeek-V4-Flash: hidden 4096, 256 experts x 2048, top-6, one shared expert, sqrt-softplus router with a
    selection bias, routed scaling 1.5; the first 3 layers hash-routed (a [129280, 6] table per layer); 4 residual
    streams (hyper-connections); 64 heads of 512 sharing one KV head (q rank 1024), grouped output projection
    (8 x 1024), sliding / compressed-sparse / heavily-compressed attention with a lightning indexer (64 heads of 128,
    top 512); vocab 129280: transformers' defaults for it (`dense_layers`: how many layers are hash-routed)."""
    from transformers import DeepseekV4Config

    hashed = min(3 if dense_layers is None else dense_layers, num_layers)
    return DeepseekV4Config(num_hidden_layers=num_layers, mlp_layer_types=["hash_moe"] * hashed +
                            ["moe"] * (num_layers - hashed), tie_word_embeddings=False)


SHAPES = {
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-next-80b": qwen3_next_80b,
    "deepseek-v3": deepseek_v3,
    "kimi-k2": kimi_k2,
    "gpt-oss-120b": gpt_oss_120b,
    "glm-4.5-air": glm_45_air,
    "glm-5": glm_5,
    "nemotron-3-nano": nemotron_3_nano,
    "longcat-flash": longcat_flash,
    "deepseek-v4-flash": deepseek_v4_flash,
}

# the released models' decoder layer counts, for projections to the full model
FULL_LAYERS = {"qwen3-30b-a3b": 48, "qwen3-next-80b": 48, "deepseek-v3": 61, "kimi-k2": 61, "gpt-oss-120b": 36,
               "glm-4.5-air": 46, "glm-5": 78, "nemotron-3-nano": 52, "longcat-flash": 28,
               "deepseek-v4-flash": 43}
