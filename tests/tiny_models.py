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
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe"]


def build_model(family: str, seed: int = 0, **config_overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                continue
            # larger-than-default weights so routing and expert outputs are far from degenerate
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if name.endswith("norm.weight") else 0.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model


def save_model(model, directory: Path, layout: str = "per_expert", max_shard_size: str | None = None) -> Path:
    """Save as transformers does (per-expert keys), or fused 3-D expert tensors as held in memory."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "per_expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
    elif layout == "fused":
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    save_char_tokenizer(directory, VOCAB)
    return directory


def save_mtp_model(directory: Path) -> Path:
    """The tiny DeepSeek-V3 with one MTP layer stored after the last decoder layer, as released checkpoints have it
    (transformers' save_pretrained drops MTP layers, so they are added to the file by hand)."""
    import json

    from safetensors.torch import load_file

    d = save_model(build_model("deepseek_v3"), directory)
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
    with torch.no_grad():
        return model(ids).logits.float()
