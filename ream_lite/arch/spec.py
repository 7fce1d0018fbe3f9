"""What the tensors of an MoE family mean: a small declarative description per family.

A spec names things relative to a decoder layer (`{layers_prefix}.{i}.`) and to its MoE block on disk. It says
nothing about how statistics are computed; the engine reads a spec, the methods never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RouterKind = Literal["softmax_topk", "sigmoid_grouped_topk"]


@dataclass(frozen=True)
class RouterConfig:
    """Everything needed to route a token exactly as the model does."""

    kind: RouterKind
    num_experts: int
    top_k: int
    renormalize: bool  # divide the top-k weights by their sum
    scaling: float = 1.0  # routed_scaling_factor (DeepSeek-V3 / GLM-4.5)
    n_group: int = 1  # group-limited routing: experts form n_group contiguous groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # config.json "model_type"
    # config keys that may hold the routed expert count (first present wins; all present are rewritten on
    # compression). Released Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts.
    num_experts_keys: tuple[str, ...]
    router_kind: RouterKind = "softmax_topk"
    layers_prefix: str = "model.layers"
    embed_key: str = "model.embed_tokens.weight"
    final_norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"
    moe_attr: str = "mlp"  # attribute of the transformers decoder layer that holds the MoE block
    moe_disk: str = "mlp"  # name of that block in checkpoint keys (Mixtral: block_sparse_moe)
    router_weight: str = "gate.weight"  # relative to the MoE block
    router_bias: str | None = None  # e_score_correction_bias (selection-only bias), relative to the block
    experts_prefix: str = "experts"
    # per-expert on-disk projection names: (gate, up, down), keys `{experts_prefix}.{e}.{name}.weight`
    expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # fused on-disk layout: `{experts_prefix}.gate_up_proj` [E, 2I, H] (gate rows then up rows) and
    # `{experts_prefix}.down_proj` [E, H, I], as transformers holds them in memory
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    shared_expert_attr: str | None = None  # shared expert submodule of the MoE block (same name on disk)
    shared_gate_attr: str | None = None  # Qwen2-MoE: sigmoid gate of the shared expert
    top_k_key: str = "num_experts_per_tok"
    moe_intermediate_key: str = "moe_intermediate_size"
    renormalize_key: str | None = "norm_topk_prob"  # None: family always renormalises (Mixtral)
    always_renormalize: bool = False
    mtp_layers_key: str | None = None  # DeepSeek-V3 / GLM: extra next-token-prediction layers after the last one
    # an MTP layer k (index num_hidden_layers + k) computes eh_proj(cat(enorm(embed(t+1)), hnorm(h_t))) and runs a
    # decoder block on it; h_t is the main model's final-normed output (the previous MTP layer's, normed by its
    # shared_head.norm, for k > 0). Names relative to the MTP layer.
    mtp_embed: str = "embed_tokens.weight"
    mtp_enorm: str = "enorm.weight"
    mtp_hnorm: str = "hnorm.weight"
    mtp_proj: str = "eh_proj.weight"
    mtp_head_norm: str = "shared_head.norm.weight"
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def num_experts(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                return int(config[key])
        raise KeyError(f"config has none of {self.num_experts_keys}")

    def router_config(self, config: dict) -> RouterConfig:
        if self.always_renormalize:
            renorm = True
        else:
            renorm = bool(config.get(self.renormalize_key, False)) if self.renormalize_key else False
        return RouterConfig(
            kind=self.router_kind,
            num_experts=self.num_experts(config),
            top_k=int(config[self.top_k_key]),
            renormalize=renorm,
            scaling=float(config.get("routed_scaling_factor", 1.0) or 1.0)
            if self.router_kind == "sigmoid_grouped_topk"
            else 1.0,
            n_group=int(config.get("n_group", 1) or 1),
            topk_group=int(config.get("topk_group", 1) or 1),
        )
