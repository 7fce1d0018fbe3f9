"""The supported MoE families. Adding one is adding a spec here plus a tiny test model."""

from __future__ import annotations

from ream_lite.arch.spec import ArchSpec

QWEN3_MOE = ArchSpec(
    model_type="qwen3_moe",
    num_experts_keys=("num_experts", "num_local_experts"),
    notes="softmax over all experts -> top-k -> optional renormalisation (norm_topk_prob)",
)

QWEN2_MOE = ArchSpec(
    model_type="qwen2_moe",
    num_experts_keys=("num_experts", "num_local_experts"),
    shared_expert_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    notes="Qwen3-MoE routing plus one shared expert scaled by sigmoid(shared_expert_gate(x))",
)

MIXTRAL = ArchSpec(
    model_type="mixtral",
    num_experts_keys=("num_local_experts",),
    moe_disk="block_sparse_moe",
    expert_proj_names=("w1", "w3", "w2"),
    renormalize_key=None,
    always_renormalize=True,
    notes="softmax -> top-k -> always renormalised; on disk block_sparse_moe.experts.N.w1/w3/w2",
)

OLMOE = ArchSpec(
    model_type="olmoe",
    num_experts_keys=("num_experts", "num_local_experts"),
    moe_intermediate_key="intermediate_size",
    notes="softmax -> top-k -> optional renormalisation (norm_topk_prob, off in OLMoE-1B-7B)",
)

DEEPSEEK_V3 = ArchSpec(
    model_type="deepseek_v3",
    num_experts_keys=("n_routed_experts",),
    router_kind="sigmoid_grouped_topk",
    router_bias="gate.e_score_correction_bias",
    shared_expert_attr="shared_experts",
    mtp_layers_key="num_nextn_predict_layers",
    aliases=("kimi_k2",),
    notes="sigmoid scores + e_score_correction_bias for selection, group-limited top-k, "
    "weights renormalised (norm_topk_prob) and scaled by routed_scaling_factor; shared experts; "
    "first_k_dense_replace dense layers; MTP layers after the last decoder layer",
)

GLM4_MOE = ArchSpec(
    model_type="glm4_moe",
    num_experts_keys=("n_routed_experts",),
    router_kind="sigmoid_grouped_topk",
    router_bias="gate.e_score_correction_bias",
    shared_expert_attr="shared_experts",
    mtp_layers_key="num_nextn_predict_layers",
    notes="DeepSeek-V3 router family (GLM-4.5 / GLM-4.5-Air)",
)

FAMILIES: dict[str, ArchSpec] = {}
for _spec in (QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3, GLM4_MOE):
    FAMILIES[_spec.model_type] = _spec
    for _alias in _spec.aliases:
        FAMILIES[_alias] = _spec
