"""Tiny randomly initialised models of every supported family, built from transformers config classes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ream_lite.testing import save_char_tokenizer

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def family_config(family: str):
    import transformers as tf

    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48,
                                   moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=2, n_group=4,
                                   topk_group=2, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                                   kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if family == "glm4_moe":
        return tf.Glm4MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.5)
    if family in ("qwen3_next", "qwen3_5_moe_text"):
        # hybrid: layer 0 Gated DeltaNet, 1 gated full attention, 2 Gated DeltaNet; partial rotary
        hybrid = dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=8,
                      linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "full_attention", "linear_attention"])
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        if family == "qwen3_next":  # layer 0 dense (mlp_only_layers)
            return tf.Qwen3NextConfig(**COMMON, **hybrid, intermediate_size=48, norm_topk_prob=True,
                                      mlp_only_layers=[0], rope_parameters=rope)
        return tf.Qwen3_5MoeTextConfig(**COMMON, **hybrid, rope_parameters={**rope, "mrope_section": [1, 1, 0]})
    if family == "llama4_text":
        # layers 1 and 3 MoE (interleave step 2), 0 and 2 dense; layers 0 and 2 chunked attention with rope (chunk
        # of 6 tokens), 1 and 3 NoPE full attention with temperature tuning (floor_scale 4: it varies within a
        # sequence); 2I = 24 != H = 32 so the fused orientation cannot be guessed from shapes
        return tf.Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=8, intermediate_size=12,
                                   intermediate_size_mlp=40, num_local_experts=8, num_experts_per_tok=2,
                                   interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=6,
                                   attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, use_qk_norm=True)
    if family == "gpt_oss":
        # I = 24 != H / 2 and 2I != H, so neither the orientation nor the interleave can be guessed from shapes;
        # sliding window 6 < the test sequences (layers 0, 2 sliding, 1 full); swiglu_limit 1.0 so the clamps bite;
        # yarn rotary as released, scaled to this context
        rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 32}
        return tf.GptOssConfig(**COMMON, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                               sliding_window=6, swiglu_limit=1.0, rope_parameters=rope)
    if family == "step3p5":  # only inside its multimodal step3p7 wrapper here (no causal-LM class); layer 0 dense;
        # sliding (2 heads) / full (4 heads) / sliding attention, each its own rotary; layer 1's experts clamped
        c = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"}
        return tf.Step3p7TextConfig(**c, num_hidden_layers=3, head_dim=8, intermediate_size=48,
                                    moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, share_expert_dim=24,
                                    mlp_layer_types=["dense", "sparse", "sparse"],
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                    sliding_window=6, num_sliding_attention_heads=2, moe_router_scaling_factor=2.0,
                                    swiglu_limits=[0, 0.5, 0], swiglu_limits_shared=[0, 0.7, 0])
    if family == "qwen3_vl_moe_text":  # only inside its multimodal wrapper (no causal-LM class); layer 0 dense;
        # 2I = 24 != H = 32 so the stored orientation shows in the shapes
        return tf.Qwen3VLMoeTextConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=12,
                                       num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [1, 1, 2]})
    more = _more_family_config(tf, family)
    if more is not None:
        return more
    raise ValueError(family)


def _more_family_config(tf, family: str):
    """ernie4_5_moe, phimoe, granitemoe(shared), hunyuan_v1_moe, minimax(_m2): non-default multipliers and
    thresholds so each family-specific step shows in the streamed-vs-transformers comparison."""
    if family == "ernie4_5_moe":  # layer 0 dense (moe_layer_start_index), one shared expert
        return tf.Ernie4_5_MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                                     moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)
    if family == "phimoe":  # a wide jitter band: the sparsemixer's masking changes the weights of most tokens
        return tf.PhimoeConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                               router_jitter_noise=0.2, attention_bias=True)
    if family in ("granitemoe", "granitemoeshared"):
        scales = dict(embedding_multiplier=1.7, residual_multiplier=0.6, logits_scaling=2.5, attention_multiplier=0.3)
        if family == "granitemoe":
            return tf.GraniteMoeConfig(**COMMON, **scales, intermediate_size=16, num_local_experts=8,
                                       num_experts_per_tok=2)
        return tf.GraniteMoeSharedConfig(**COMMON, **scales, intermediate_size=16, num_local_experts=8,
                                         num_experts_per_tok=2, shared_intermediate_size=24)
    if family == "granitemoehybrid":  # Mamba-2, attention (NoPE, as Granite-4.0), Mamba-2
        return tf.GraniteMoeHybridConfig(**COMMON, embedding_multiplier=1.7, residual_multiplier=0.6,
                                         logits_scaling=2.5, attention_multiplier=0.3, intermediate_size=16,
                                         num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24,
                                         position_embedding_type="nope", mamba_n_heads=4, mamba_d_head=16,
                                         mamba_d_state=8, mamba_d_conv=3, mamba_chunk_size=8, mamba_n_groups=1,
                                         layer_types=["linear_attention", "full_attention", "linear_attention"])
    if family == "hunyuan_v1_moe":
        return tf.HunYuanMoEV1Config(**COMMON, head_dim=8, intermediate_size=16, num_experts=8, moe_topk=2)
    if family == "minimax_m2":
        return tf.MiniMaxM2Config(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=8,
                                  num_experts_per_tok=2)
    if family == "jamba":  # Mamba (MoE), attention (dense), Mamba (MoE)
        return tf.JambaConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                              attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
                              mamba_d_state=8, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=4,
                              use_mamba_kernels=False)
    if family == "minimax":  # lightning blocks of 8 tokens: test sequences span several
        return tf.MiniMaxConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                layer_types=["linear_attention", "full_attention", "linear_attention"], block_size=8,
                                mlp_alpha_factor=1.3, mlp_beta_factor=0.7, linear_attn_alpha_factor=0.9,
                                linear_attn_beta_factor=1.1, full_attn_alpha_factor=1.2, full_attn_beta_factor=0.8)
    if family == "bailing_hybrid":  # linear, latent (MLA) and linear attention; layer 0 dense; layer 1's routed
        # experts clamped at 0.5 and its shared expert at 0.7 (the clamps bite at these weights), layer 2 unclamped
        return tf.BailingHybridConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48,
                                      moe_intermediate_size=16, num_local_experts=16, num_experts_per_tok=2, n_group=4,
                                      topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                                      first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                      qk_nope_head_dim=8, v_head_dim=8, head_dim=8, layer_group_size=2,
                                      short_conv_kernel_size=3, swiglu_limits=[0, 0.5, 0],
                                      swiglu_limits_shared=[0, 0.7, 0])
    if family == "nemotron_h":  # Mamba-2, MoE, attention, MoE, MLP: ungated (ReLU^2) experts, group-limited sigmoid
        c = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"}
        return tf.NemotronHConfig(**c, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                  moe_shared_expert_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=2,
                                  n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                                  norm_topk_prob=True, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                                  n_groups=1, conv_kernel=3, chunk_size=8, expand=2,
                                  layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"])
    if family == "longcat_flash":  # 8 routed + 2 zero-computation (identity) experts; two layers of two sublayers
        c = {k: v for k, v in COMMON.items() if k not in ("num_hidden_layers", "num_key_value_heads")}
        return tf.LongcatFlashConfig(**c, num_layers=2, num_key_value_heads=4, ffn_hidden_size=48, q_lora_rank=24,
                                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
                                     moe_topk=3, n_routed_experts=8, zero_expert_num=2, expert_ffn_hidden_size=16,
                                     routed_scaling_factor=2.0)
    if family == "dbrx":  # experts as w1 / v1 / w2 flattened [E * I, H]; p = 1 renormalisation
        return tf.DbrxConfig(d_model=32, n_heads=4, n_layers=3, max_seq_len=128, vocab_size=VOCAB,
                             attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                             ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2,
                                         "moe_normalize_expert_weights": 1.0},
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "flex_olmo":  # post-norm: the MoE output is normed before the residual add
        return tf.FlexOlmoConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    return _deepseek_like_config(tf, family)


def _deepseek_like_config(tf, family: str):
    """dots1, glm4_moe_lite, deepseek_v32, glm_moe_dsa: DeepSeek-V3's MoE (4 groups of 4 experts, 2 groups chosen,
    a selection bias, scaling) under each family's attention; layer 0 dense."""
    moe = dict(moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
               n_shared_experts=1, routed_scaling_factor=2.5, intermediate_size=48, norm_topk_prob=True)
    mla = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if family == "dots1":
        return tf.Dots1Config(**COMMON, **moe, head_dim=8, first_k_dense_replace=1)
    if family == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(**{**COMMON, "num_key_value_heads": 4}, **moe, **mla,
                                    mlp_layer_types=["dense", "sparse", "sparse"])
    # DeepSeek sparse attention: an indexer keeps index_topk keys per query (8 of up to 32: the tests see it act)
    dsa = dict(index_topk=8, index_head_dim=8, index_n_heads=2, first_k_dense_replace=1)
    if family == "deepseek_v32":
        return tf.DeepseekV32Config(**{**COMMON, "num_key_value_heads": 4}, **moe, **mla, **dsa)
    if family == "glm_moe_dsa":
        return tf.GlmMoeDsaConfig(**{**COMMON, "num_key_value_heads": 4}, **moe, **mla, **dsa)
    if family == "exaone_moe":  # a sliding-window layer, a global one, a sliding one; layer 0 dense
        return tf.ExaoneMoeConfig(**COMMON, **{k: v for k, v in moe.items() if k != "n_routed_experts"},
                                  num_experts=16, num_shared_experts=1, head_dim=8, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  mlp_layer_types=["dense", "sparse", "sparse"])
    if family == "solar_open":
        return tf.SolarOpenConfig(**COMMON, **moe, head_dim=8)
    if family == "kimi_linear":  # KDA (linear), latent attention, KDA; layer 0 dense; written as released
        return tf.KimiLinearConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48,
                                   moe_intermediate_size=16, num_experts=16, num_experts_per_token=2, num_expert_group=4,
                                   topk_group=2, num_shared_experts=1, moe_renormalize=True, routed_scaling_factor=2.5,
                                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, first_k_dense_replace=1,
                                   linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 3,
                                                       "full_attn_layers": [2], "kda_layers": [1, 3]})
    if family == "deepseek_v2":  # its softmax router, group-limited (groups scored by their best expert), scaled
        return tf.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **{**moe, "norm_topk_prob": False},
                                   **mla, topk_method="group_limited_greedy", first_k_dense_replace=1)
    return None


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5_moe_text",
            "llama4_text", "gpt_oss"]
# added together (tests/test_families_more.py covers what is special about each)
MORE_FAMILIES = ["ernie4_5_moe", "phimoe", "granitemoe", "granitemoeshared", "granitemoehybrid", "hunyuan_v1_moe",
                 "minimax_m2", "minimax", "jamba", "flex_olmo", "longcat_flash", "dbrx"]
# DeepSeek-V3's MoE under other attention (tests/test_families_deepseek_like.py)
DEEPSEEK_LIKE = ["dots1", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "deepseek_v2", "exaone_moe", "solar_open",
                 "kimi_linear", "bailing_hybrid", "nemotron_h"]
FAMILIES += MORE_FAMILIES + DEEPSEEK_LIKE


# where transformers holds the router of a family whose in-memory names differ from the checkpoint's (or whose
# selection bias is not `gate.e_score_correction_bias`): (MoE block attribute, module owning the router weight,
# selection bias relative to the block, how to call the router module for (logits, weights, indices))
_ROUTERS = {
    "ernie4_5_moe": ("mlp", "gate", "gate.moe_statics.e_score_correction_bias", "gate"),
    "phimoe": ("mlp", "router", None, "router"),
    "granitemoe": ("block_sparse_moe", "router", None, "router"),
    "granitemoeshared": ("block_sparse_moe", "router", None, "router"),
    "granitemoehybrid": ("block_sparse_moe", "router", None, "router"),
    "hunyuan_v1_moe": ("mlp", "gate.wg", None, "gate"),
    "minimax_m2": ("mlp", "gate", "e_score_correction_bias", "gate+bias"),
    "exaone_moe": ("mlp", "gate", "gate.e_score_correction_bias", "gate"),
    "bailing_hybrid": ("mlp", "gate", "gate.e_score_correction_bias", "gate"),  # (gate.expert_bias on disk)
    "longcat_flash": ("mlp", "router.classifier", "router.e_score_correction_bias", "router"),
    "dbrx": ("ffn", "router.layer", None, "dbrx"),
    "step3p5": ("mlp", "gate", "gate.e_score_correction_bias", "gate"),  # (moe.router_bias on disk)
    "deepseek_v4": ("mlp", "gate", "gate.e_score_correction_bias", "gate"),  # (gate.bias on disk; none in a hash layer)
}


def _tensor(module, name: str | None):
    """A parameter or buffer of `module` by dotted name (None for None)."""
    if name is None or (name not in dict(module.named_parameters()) and name not in dict(module.named_buffers())):
        return None
    return module.get_parameter(name) if name in dict(module.named_parameters()) else module.get_buffer(name)


def router_of(model, layer: int):
    """(module owning the router weight, that weight, the selection bias or None, a function x -> transformers'
    (logits, top-k weights, top-k indices)) of decoder layer `layer` of a transformers model."""
    from ream_lite.arch.families import FAMILIES as SPECS

    family = model.config.get_text_config().model_type  # (a multimodal wrapper: its text model's)
    spec = SPECS[family]
    layers = text_decoder_layers(model)
    if family not in _ROUTERS:  # router weight and bias are named in memory as on disk
        block = getattr(layers[layer], spec.moe_attr)
        owner = block.get_submodule(spec.router_weight.rsplit(".", 1)[0])
        return owner, owner.weight, _tensor(block, spec.router_bias), owner
    attr, owner_name, bias_name, call = _ROUTERS[family]
    block = getattr(layers[layer], attr)
    owner = block.get_submodule(owner_name)
    bias = _tensor(block, bias_name)
    if call == "gate+bias":  # MiniMax-M2's router takes the block's bias as an argument
        return owner, owner.weight, bias, lambda x: block.gate(x, bias)
    if call == "dbrx":  # DBRX's router gives logits; its FFN block routes them
        def dbrx(x):
            logits = block.router(x)
            return (logits, *block.route_tokens_to_experts(logits))
        return owner, owner.weight, bias, dbrx
    return owner, owner.weight, bias, block.get_submodule(call)


def build_model(family: str, seed: int = 0, **config_overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return _randomize(model)


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                continue
            # larger-than-default weights so routing and expert outputs are far from degenerate
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if name.endswith("norm.weight") else 0.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
        for name, p in model.named_parameters():  # Ernie-4.5 holds its selection bias as a parameter
            if name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05)
    return model


# multimodal releases of supported text families: wrapper model_type -> its text family
MULTIMODAL = {"qwen3_5_moe": "qwen3_5_moe_text", "llama4": "llama4_text", "qwen3_vl_moe": "qwen3_vl_moe_text",
              "step3p7": "step3p5"}


def multimodal_config(wrapper: str):
    """The wrapper config (ForConditionalGeneration) around the family's tiny text config, with about the smallest
    vision tower transformers builds (its output projected to the text hidden size)."""
    import transformers as tf

    text = family_config(MULTIMODAL[wrapper]).to_dict()
    if wrapper == "qwen3_5_moe":
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                      patch_size=2, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16)
        return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    if wrapper == "llama4":
        vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      vision_output_dim=16, projector_input_dim=16, projector_output_dim=COMMON["hidden_size"],
                      image_size=8, patch_size=4)
        return tf.Llama4Config(text_config=text, vision_config=vision)
    if wrapper == "step3p7":
        vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                      patch_size=4)
        return tf.Step3p7Config(text_config=text, vision_config=vision)
    if wrapper == "qwen3_vl_moe":
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                      patch_size=2, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    raise ValueError(wrapper)


def build_multimodal(wrapper: str, seed: int = 0):
    """The tiny multimodal model, randomly initialised as build_model does (vision tower included)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(multimodal_config(wrapper), dtype=torch.float32).eval()
    return _randomize(model)


def text_decoder_layers(model):
    """The decoder layers of a transformers text model, or of the text model inside a multimodal wrapper."""
    for name in ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.blocks"):
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(type(model).__name__)


def save_model(model, directory: Path, layout: str = "per_expert", max_shard_size: str | None = None) -> Path:
    """Save as transformers does (per-expert keys), or fused 3-D expert tensors as held in memory, or
    ("input_major") as save_pretrained does with fused experts transposed to [E, H, 2I] / [E, I, H], as the
    Qwen3-VL-MoE releases store them."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "per_expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
    elif layout == "input_major":
        from safetensors.torch import load_file

        model.save_pretrained(directory)
        sd = load_file(str(directory / "model.safetensors"))
        for k in sd:
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                sd[k] = sd[k].transpose(1, 2).contiguous()
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "fused":
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    save_char_tokenizer(directory, VOCAB)
    return directory


def save_mtp_model(directory: Path, family: str = "deepseek_v3") -> Path:
    """The tiny DeepSeek-V3 (or a family with its MTP layers) with one MTP layer stored after the last decoder layer,
    as released checkpoints have it (transformers' save_pretrained drops MTP layers, so they are added by hand)."""
    import json

    from safetensors.torch import load_file

    d = save_model(build_model(family), directory)
    sd = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k, v in list(sd.items()):
        if k.startswith("model.layers.2."):
            sd[k.replace("model.layers.2.", "model.layers.3.")] = v + 0.01 * torch.randn(v.shape, generator=g)
    sd["model.layers.3.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        sd[f"model.layers.3.{name}.weight"] = torch.ones(32)
    sd["model.layers.3.eh_proj.weight"] = 0.2 * torch.randn(32, 64, generator=g)
    sd["model.layers.3.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    hook = None
    if model.config.model_type == "llama4":
        # transformers 5.24's Llama4ForConditionalGeneration builds its output from a field its language model's
        # output lacks (image_outputs): supplied (None) on that output, the wrapper's forward runs unchanged
        def add_image_outputs(module, args, output):
            if not hasattr(output, "image_outputs"):
                output.image_outputs = None
            return output

        hook = model.language_model.register_forward_hook(add_image_outputs)
    try:
        with torch.no_grad():
            return model(ids).logits.float()
    finally:
        if hook is not None:
            hook.remove()
