"""llama.cpp's names for the MoE families, as data: GGUF tensor names <-> the Hugging Face checkpoint names the
family specs use, and GGUF metadata keys <-> config.json keys.

A GGUF file names tensors `blk.{i}.{name}.weight` and keeps its config as `{arch}.{key}` metadata. ream-lite reads a
GGUF as the Hugging Face checkpoint it was converted from (checkpoint/gguf.py): every tensor under its transformers
name, the fused expert tensors `ffn_{gate,up,down}_exps` split into per-expert tensors (one byte range each), and a
config.json built from the metadata. The writer maps the names back. Nothing here reads a file.

Where llama.cpp's converter changed a tensor on the way in, the entry says so and the reader undoes it: the `llama`
architecture (Mixtral) stores attn_q / attn_k with the rows of each head permuted for llama.cpp's rotary layout
(`rope_permuted`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# tensors outside the decoder layers (every family)
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_QK_NORM = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_QKV_BIAS = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias"}
_SHARED_EXPERT = {
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# the config keys every family reads from `{arch}.{key}` metadata
_COMMON_CONFIG = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "expert_feed_forward_length": "moe_intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
}


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture (`general.architecture`) read as a transformers model type."""

    arch: str
    model_type: str
    layer_tensors: dict[str, str]  # `blk.{i}.` + GGUF name -> `model.layers.{i}.` + HF name
    # fused expert tensors: GGUF name -> the HF per-expert name with `{e}` for the expert ([E, rows, cols] on disk)
    expert_tensors: dict[str, str]
    router: str = "ffn_gate_inp.weight"  # rows = experts (sliced to the kept experts)
    config_keys: dict[str, str] = field(default_factory=lambda: dict(_COMMON_CONFIG))
    # config values llama.cpp's graph for this architecture hard-codes (so they are not in the metadata)
    fixed_config: dict = field(default_factory=dict)
    rope_permuted: bool = False  # attn_q / attn_k rows permuted per head by the converter (llama)
    num_experts_key: str = "num_experts"  # the HF config key of the routed expert count


_EXPERTS = {
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
}

ARCHES: dict[str, GGUFArch] = {
    a.arch: a
    for a in (
        GGUFArch(
            arch="qwen3moe",
            model_type="qwen3_moe",
            layer_tensors={**_ATTENTION, **_QK_NORM, "ffn_gate_inp.weight": "mlp.gate.weight"},
            expert_tensors=_EXPERTS,
            # llama.cpp's qwen3moe graph always renormalises the top-k weights (Qwen3-MoE releases say so too)
            fixed_config={"norm_topk_prob": True, "hidden_act": "silu", "attention_bias": False,
                          "decoder_sparse_step": 1, "mlp_only_layers": []},
        ),
        GGUFArch(
            arch="qwen2moe",
            model_type="qwen2_moe",
            layer_tensors={**_ATTENTION, **_QKV_BIAS, **_SHARED_EXPERT, "ffn_gate_inp.weight": "mlp.gate.weight"},
            expert_tensors=_EXPERTS,
            config_keys={**_COMMON_CONFIG,
                         "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
            # llama.cpp's qwen2moe graph never renormalises (Qwen1.5-MoE / Qwen2-57B-A14B: norm_topk_prob false)
            fixed_config={"norm_topk_prob": False, "hidden_act": "silu", "qkv_bias": True,
                          "decoder_sparse_step": 1, "mlp_only_layers": []},
        ),
        GGUFArch(
            arch="llama",  # Mixtral (llama.cpp converts it as llama with experts)
            model_type="mixtral",
            layer_tensors={**_ATTENTION, "ffn_gate_inp.weight": "block_sparse_moe.gate.weight"},
            expert_tensors={
                "ffn_gate_exps.weight": "block_sparse_moe.experts.{e}.w1.weight",
                "ffn_up_exps.weight": "block_sparse_moe.experts.{e}.w3.weight",
                "ffn_down_exps.weight": "block_sparse_moe.experts.{e}.w2.weight",
            },
            config_keys={k: ("num_local_experts" if v == "num_experts" else v) for k, v in _COMMON_CONFIG.items()
                         if k != "expert_feed_forward_length"},
            fixed_config={"hidden_act": "silu"},
            rope_permuted=True,
            num_experts_key="num_local_experts",
        ),
    )
}

# architectures llama.cpp converts MoE models to that ream-lite does not read yet, and why
REFUSED: dict[str, str] = {
    "deepseek2": "DeepSeek-V2/V3/Kimi-K2 GGUFs store MLA's kv_b split and transposed (attn_k_b / attn_v_b); reading "
    "them back is not implemented yet: compress the safetensors release",
    "glm4moe": "GLM-4.5 GGUFs are not mapped yet: compress the safetensors release",
    "gpt-oss": "gpt-oss GGUFs are not mapped yet (its experts are fused with biases in transformers): compress the "
    "safetensors release",
    "mixtral": "an old GGUF layout (per-expert ffn_*.{e} tensors, before llama.cpp fused them): re-convert it",
}


def rope_unpermute(rows: int, heads: int) -> list[int]:
    """The order of a `rope_permuted` tensor's rows as transformers holds them: llama.cpp's converter stores each
    head's rows [2, d/2] transposed to [d/2, 2] (interleaved rotary pairs), so transformers' row (h, i, j) is stored
    at (h, j, i); `stored[perm]` gives transformers' rows."""
    d = rows // heads
    half = d // 2
    return [h * d + j * 2 + i for h in range(heads) for i in range(2) for j in range(half)]
