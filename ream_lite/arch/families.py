"""The supported MoE families. Adding one is adding a spec here plus a tiny test model."""

from __future__ import annotations

from dataclasses import replace

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

QWEN3_NEXT = ArchSpec(
    model_type="qwen3_next",
    num_experts_keys=("num_experts", "num_local_experts"),
    shared_expert_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    mask_by_layer_type=True,
    detached_mtp_prefix="mtp.",
    detached_mtp_key="mtp_num_hidden_layers",
    mtp_layers_key="mtp_num_hidden_layers",
    mtp_layers_prefix="mtp.layers",
    mtp_enorm="/mtp.pre_fc_norm_embedding.weight",
    mtp_hnorm="/mtp.pre_fc_norm_hidden.weight",
    mtp_proj="/mtp.fc.weight",
    mtp_head_norm="/mtp.norm.weight",
    notes="Qwen2-MoE routing (softmax -> top-k -> norm_topk_prob) plus a sigmoid-gated shared expert; hybrid "
    "layers per layer_types: Gated DeltaNet linear attention (no cache, whole sequences) and gated full attention "
    "with partial rotary; dense layers where mlp_only_layers / decoder_sparse_step say. The released MTP block "
    "(mtp.* keys, which transformers drops): fc(cat(pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h_t))) "
    "through one full-attention MoE layer (mtp.layers.0) and mtp.norm, compressed like the decoder layers on the "
    "hidden states it sees (--drop-mtp leaves it out)",
)

QWEN3_5_MOE_TEXT = ArchSpec(
    model_type="qwen3_5_moe_text",
    num_experts_keys=("num_experts", "num_local_experts"),
    shared_expert_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    renormalize_key=None,
    always_renormalize=True,
    mask_by_layer_type=True,
    detached_mtp_prefix="mtp.",
    detached_mtp_key="mtp_num_hidden_layers",
    mtp_layers_key="mtp_num_hidden_layers",
    mtp_layers_prefix="mtp.layers",
    mtp_enorm="/mtp.pre_fc_norm_embedding.weight",
    mtp_hnorm="/mtp.pre_fc_norm_hidden.weight",
    mtp_proj="/mtp.fc.weight",
    mtp_head_norm="/mtp.norm.weight",
    notes="Qwen3.5 MoE text model: Qwen3-Next's layout (hybrid Gated DeltaNet / gated attention, sigmoid-gated "
    "shared expert) with top-k weights always renormalised and multimodal rotary (text positions: all three "
    "sections equal); every layer MoE; its mtp.* block kept and compressed as Qwen3-Next's",
)

QWEN3_VL_MOE_TEXT = ArchSpec(
    model_type="qwen3_vl_moe_text",
    num_experts_keys=("num_experts", "num_local_experts"),
    renormalize_key=None,
    always_renormalize=True,
    fused_orientation_from_shapes=True,
    notes="Qwen3-VL-MoE text model (compressed inside its multimodal qwen3_vl_moe release): Qwen3-MoE's router with "
    "top-k weights always renormalised, q/k norms, multimodal rotary (text positions: all three sections equal; "
    "DeepStack visual features enter only with images); experts fused, input-major as released ([E, H, 2I] / "
    "[E, I, H]) or output-major as transformers' save_pretrained writes them: read and written as the checkpoint "
    "stores them",
)

QWEN3_OMNI_MOE_TEXT = replace(
    QWEN3_MOE, model_type="qwen3_omni_moe_text",
    notes="Qwen3-Omni's thinker text model (compressed inside its qwen3_omni_moe release, config at "
    "thinker_config.text_config): Qwen3-MoE's router and experts, multimodal rotary (text positions: all sections "
    "equal); the audio and vision towers, the talker (an MoE of its own, trained on the thinker's hidden states) "
    "and code2wav copied unchanged",
)

LLAMA4_TEXT = ArchSpec(
    model_type="llama4_text",
    num_experts_keys=("num_local_experts",),
    router_kind="topk_sigmoid_input",
    moe_attr="feed_forward",
    moe_disk="feed_forward",
    router_weight="router.weight",
    shared_expert_attr="shared_expert",
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    mask_by_layer_type=True,
    fused_input_major=True,
    moe_returns_tuple=True,
    notes="top-k of the raw logits, weight = sigmoid(chosen logit) multiplying the expert INPUT; shared expert "
    "always added; MoE layers per moe_layers / interleave_moe_layer_step (the others dense, intermediate_size_mlp); "
    "chunked-attention layers with their own mask, NoPE layers with temperature tuning (run by transformers' own "
    "attention); experts fused input-major on disk (gate_up_proj [E, H, 2I], down_proj [E, I, H])",
)

GPT_OSS = ArchSpec(
    model_type="gpt_oss",
    num_experts_keys=("num_local_experts", "num_experts"),
    router_kind="topk_softmax",
    router_weight="router.weight",
    router_bias="router.bias",
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    mask_by_layer_type=True,
    fused_input_major=True,
    fused_interleaved=True,
    fused_bias_names=("gate_up_proj_bias", "down_proj_bias"),
    expert_act="clamped_swiglu",
    moe_returns_tuple=True,
    attn_implementation="eager",
    notes="router with a logit bias: top-k of the logits, softmax over the k chosen; experts with biases and a "
    "clamped SwiGLU ((clamp(up) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)); fused input-major on "
    "disk with gate and up interleaved (gate_up_proj [E, H, 2I], columns 0::2 gate, 1::2 up; gate_up_proj_bias "
    "[E, 2I] likewise; down_proj [E, I, H], down_proj_bias [E, H]); attention sinks, alternating sliding-window "
    "and full layers (layer_types), run eagerly",
)

ERNIE4_5_MOE = ArchSpec(
    model_type="ernie4_5_moe",
    num_experts_keys=("moe_num_experts",),
    router_bias="moe_statics.e_score_correction_bias",
    shared_expert_attr="shared_experts",
    top_k_key="moe_k",
    renormalize_key=None,
    always_renormalize=True,
    router_fp32=True,
    renorm_min_key="moe_norm_min",
    notes="float32 router: softmax over all experts; top-k chosen on softmax + e_score_correction_bias (stored "
    "[1, E] as mlp.moe_statics.e_score_correction_bias), weighted by the softmax alone, renormalised with the sum "
    "clamped to moe_norm_min; ungated shared experts; dense layers outside moe_layer_start/end_index and "
    "moe_layer_interval",
)

PHIMOE = ArchSpec(
    model_type="phimoe",
    num_experts_keys=("num_local_experts",),
    router_kind="sparsemixer",
    moe_disk="block_sparse_moe",
    expert_proj_names=("w1", "w3", "w2"),
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    jitter_key="router_jitter_noise",
    notes="sparsemixer in eval mode: two experts picked one after the other, each weighted by a softmax over the "
    "logits within 2 * router_jitter_noise (relative) of it (always top-2, whatever num_experts_per_tok says); "
    "input jitter and sampling are training-only; on disk block_sparse_moe.gate / experts.N.w1/w3/w2",
)

GRANITEMOE = ArchSpec(
    model_type="granitemoe",
    num_experts_keys=("num_local_experts",),
    router_kind="topk_softmax",
    moe_attr="block_sparse_moe",
    moe_disk="block_sparse_moe",
    router_weight="router.layer.weight",
    experts_prefix="",
    fused_gate_up="input_linear.weight",
    fused_down="output_linear.weight",
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    moe_output_scale_key="residual_multiplier",
    embedding_scale_key="embedding_multiplier",
    logits_divisor_key="logits_scaling",
    notes="top-k of the logits, softmax over the k chosen; experts fused on disk as block_sparse_moe.input_linear "
    "[E, 2I, H] (gate rows then up rows) and output_linear [E, H, I]; embeddings times embedding_multiplier, each "
    "residual update times residual_multiplier, logits divided by logits_scaling",
)

GRANITEMOESHARED = replace(
    GRANITEMOE,
    model_type="granitemoeshared",
    notes="GraniteMoE plus an ungated shared MLP (shared_mlp) that is an attribute of the decoder layer, not of the "
    "MoE block: it runs with the attention phase, and the MoE block output the methods see excludes it",
)

GRANITEMOEHYBRID = replace(
    GRANITEMOE,
    model_type="granitemoehybrid",
    mask_by_layer_type=True,
    notes="Granite-4.0: GraniteMoE-Shared's MoE (shared_mlp on the decoder layer, run with the mixer phase) in "
    "layers whose mixer is Mamba-2 (layer_types linear_attention, run by transformers' own module without a cache, "
    "whole sequences) or attention, with or without rotary (position_embedding_type)",
)

HUNYUAN_V1_MOE = ArchSpec(
    model_type="hunyuan_v1_moe",
    num_experts_keys=("num_experts",),
    router_weight="gate.wg.weight",
    shared_expert_attr="shared_mlp",
    top_k_key="moe_topk",
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    always_renormalize=True,
    router_fp32=True,
    notes="float32 router (gate.wg): softmax -> top-k -> always renormalised; one ungated shared MLP (shared_mlp); "
    "moe_topk may be a per-layer list (it must hold one value)",
)

MINIMAX_M2 = ArchSpec(
    model_type="minimax_m2",
    num_experts_keys=("num_local_experts",),
    router_kind="sigmoid_grouped_topk",
    moe_disk="block_sparse_moe",
    router_bias="e_score_correction_bias",
    expert_proj_names=("w1", "w3", "w2"),
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    always_renormalize=True,
    router_fp32=False,
    scaling_key=None,
    notes="sigmoid of the logits (computed in the router weight's dtype), top-k of sigmoid + e_score_correction_bias "
    "(stored on the block: block_sparse_moe.e_score_correction_bias), no groups, always renormalised, never scaled; "
    "on disk block_sparse_moe.gate / experts.N.w1/w3/w2",
)

MINIMAX = ArchSpec(
    model_type="minimax",
    num_experts_keys=("num_local_experts",),
    moe_disk="block_sparse_moe",
    expert_proj_names=("w1", "w3", "w2"),
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    always_renormalize=True,
    mask_by_layer_type=True,
    moe_output_scale_key="mlp_beta_factor",
    notes="MiniMax-Text-01: Mixtral routing; lightning (linear) attention layers per layer_types run by transformers' "
    "own module without a cache; the layer output is mlp_alpha_factor * h + mlp_beta_factor * MoE(h) with h the "
    "post-attention-normed state; the lightning layers' decay buffers must be in the checkpoint (save_pretrained "
    "writes them)",
)

# DeepSeek-V3's router, shared experts and MTP layers under other attention (the decoder layer's own modules run it);
# configs name the expert count n_routed_experts (transformers maps num_local_experts onto it)
_DEEPSEEK_MOE = replace(DEEPSEEK_V3, num_experts_keys=("n_routed_experts", "num_local_experts"), aliases=())

DOTS1 = replace(
    _DEEPSEEK_MOE, model_type="dots1", mtp_layers_key=None,
    notes="dots.llm1: DeepSeek-V3's router (float32 sigmoid + e_score_correction_bias, group-limited top-k, "
    "renormalised, routed_scaling_factor) and shared experts under Qwen3-style attention (q/k norms); "
    "first_k_dense_replace dense layers; no MTP",
)

GLM4_MOE_LITE = replace(
    _DEEPSEEK_MOE, model_type="glm4_moe_lite",
    notes="GLM-4.7-Flash: DeepSeek-V3's router and shared experts under multi-head latent attention; dense layers "
    "where mlp_layer_types says (default: the first); MTP layers as DeepSeek-V3's",
)

DEEPSEEK_V32 = replace(
    _DEEPSEEK_MOE, model_type="deepseek_v32", materialised_mask=True,
    notes="DeepSeek-V3.2: DeepSeek-V3's MoE and MTP layers; its sparse attention (a lightning indexer choosing "
    "index_topk keys per query) is run by transformers' own module, the indexer's weights copied unchanged",
)

GLM_MOE_DSA = replace(
    _DEEPSEEK_MOE, model_type="glm_moe_dsa", materialised_mask=True,
    notes="GLM-5: DeepSeek-V3's router and shared experts under DeepSeek sparse attention (transformers' module, the "
    "indexer copied unchanged); dense layers per mlp_layer_types / first_k_dense_replace; MTP layers as DeepSeek-V3's",
)

DEEPSEEK_V2 = ArchSpec(
    model_type="deepseek_v2",
    num_experts_keys=("n_routed_experts", "num_experts"),
    shared_expert_attr="shared_experts",
    renormalize_key=None,
    router_fp32=True,
    softmax_scaled=True,
    topk_method_key="topk_method",
    notes="DeepSeek-V2 / V2-Lite: float32 softmax over all experts, top-k (topk_method greedy) or top-k within the "
    "topk_group groups with the best expert (group_limited_greedy), weights times routed_scaling_factor and never "
    "renormalised (as transformers runs it); shared experts; first_k_dense_replace dense layers; latent attention",
)

EXAONE_MOE = replace(
    _DEEPSEEK_MOE, model_type="exaone_moe", num_experts_keys=("num_experts", "num_local_experts"), mtp_layers_key=None,
    mask_by_layer_type=True, router_bias="e_score_correction_bias",
    notes="EXAONE MoE (K-EXAONE): DeepSeek-V3's router (float32 sigmoid + e_score_correction_bias, stored on the "
    "block as mlp.e_score_correction_bias, group-limited top-k, routed_scaling_factor) and a shared expert; sliding-window and global attention per layer_types, dense "
    "layers per mlp_layer_types",
)

SOLAR_OPEN = replace(
    _DEEPSEEK_MOE, model_type="solar_open", mtp_layers_key=None,
    notes="Solar Open: DeepSeek-V3's router and shared experts under grouped-query attention; every layer MoE",
)

KIMI_LINEAR = replace(
    _DEEPSEEK_MOE, model_type="kimi_linear", num_experts_keys=("num_experts", "num_local_experts"),
    moe_disk="block_sparse_moe", expert_proj_names=("w1", "w3", "w2"), top_k_key="num_experts_per_token",
    renormalize_key="moe_renormalize", n_group_key="num_expert_group", mtp_layers_key=None,
    mask_by_layer_type=True,
    disk_renames=((".mlp.", ".block_sparse_moe."), (".forget_gate.", ".")),
    disk_concat=(("self_attn.conv1d.weight",
                  ("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight", "self_attn.v_conv1d.weight")),),
    notes="Kimi-Linear: DeepSeek-V3's router (float32 sigmoid + e_score_correction_bias, renormalised per "
    "moe_renormalize, routed_scaling_factor) and shared experts; Kimi Delta Attention (linear) and latent attention "
    "layers per layer_types (linear_attn_config); as released, block_sparse_moe.* (dense MLPs too) with experts "
    "w1 / w3 / w2, the KDA forget-gate tensors beside the attention's and its q / k / v convolutions apart (read "
    "renamed and stacked as transformers loads them, written as released)",
)

FLEX_OLMO = ArchSpec(
    model_type="flex_olmo",
    num_experts_keys=("num_experts", "num_local_experts"),
    moe_intermediate_key="intermediate_size",
    moe_post_norm="post_feedforward_layernorm",
    notes="FlexOlmo: OLMoE's router (softmax -> top-k -> optional norm_topk_prob) in an OLMo-2 post-norm decoder: "
    "the MoE block sees the raw residual and its whole output is RMS-normed (post_feedforward_layernorm) before "
    "the residual add, so the engine sums every expert chunk of a layer before the norm",
)

BAILING_HYBRID = replace(
    _DEEPSEEK_MOE, model_type="bailing_hybrid", num_experts_keys=("num_experts", "num_local_experts"),
    embed_key="model.word_embeddings.weight", router_bias="gate.expert_bias", top_k_key="num_experts_per_token",
    renormalize_key="moe_renormalize", n_group_key="num_expert_group", mtp_layers_key="num_nextn_predict_layers",
    mask_by_layer_type=True, expert_act="swiglu_layer_clamp", expert_limits_key="swiglu_limits",
    disk_renames=((".forget_gate.", "."), (".self_attn.o_proj.", ".attention.dense."), (".self_attn.", ".attention.")),
    disk_concat=(("attention.conv1d.weight",
                  ("attention.q_conv1d.weight", "attention.k_conv1d.weight", "attention.v_conv1d.weight")),),
    notes="Ling 2.5 (bailing_hybrid): DeepSeek-V3's router (float32 sigmoid + selection bias gate.expert_bias, "
    "group-limited top-k, moe_renormalize, routed_scaling_factor) and shared experts; routed experts clamped after "
    "the activation with a limit per layer (expert_swiglu_limit_list; the shared experts' own list is run by their "
    "transformers module); Kimi-Delta-style linear attention and latent attention per layer_types; dense layers per "
    "mlp_layer_types; read and written under the release names (word_embeddings, attention.*, dense, q/k/v "
    "convolutions apart, stacked on read as transformers loads them); MTP layers as DeepSeek-V3's where present",
)

NEMOTRON_H = replace(
    _DEEPSEEK_MOE, model_type="nemotron_h", num_experts_keys=("n_routed_experts", "num_local_experts"),
    layers_prefix="backbone.layers", embed_key="backbone.embeddings.weight", final_norm_key="backbone.norm_f.weight",
    moe_attr="mixer", moe_disk="mixer", expert_proj_names=(None, "up_proj", "down_proj"), expert_act="ungated",
    hidden_act_key="mlp_hidden_act", mtp_layers_key=None, mask_by_layer_type=True, derived_keys=("num_hidden_layers",),
    disk_renames=(("model.", "backbone."),),
    latent_projections=("fc1_latent_proj", "fc2_latent_proj"),
    notes="Nemotron-H / Nemotron-3 Nano: DeepSeek-V3's router (float32 sigmoid + e_score_correction_bias, "
    "group-limited top-k, renormalised, routed_scaling_factor) over UNGATED experts, down(act(up x)) with "
    "mlp_hidden_act (ReLU^2), and an ungated shared expert; Mamba-2, attention (no rotary), MLP and MoE layers per "
    "layers_block_type (each a pre-normed `mixer` with a residual), under the release's backbone.* names; "
    "Nemotron-3 Super's latent MoE (moe_latent_size): the experts run on fc1_latent_proj(x) and their weighted sum "
    "goes through fc2_latent_proj (statistics, alignment and merges in the latent space; no refit)",
)

LONGCAT_FLASH = ArchSpec(
    model_type="longcat_flash",
    num_experts_keys=("n_routed_experts",),
    router_weight="router.classifier.weight",
    router_bias="router.e_score_correction_bias",
    top_k_key="moe_topk",
    moe_intermediate_key="expert_ffn_hidden_size",
    renormalize_key=None,
    router_fp32=True,
    softmax_scaled=True,
    num_layers_key="num_layers",
    zero_experts_key="zero_expert_num",
    unsupported_keys=(("router_bias", "a router with a logit bias (router.classifier.bias) is not run"),),
    notes="LongCat-Flash: float32 softmax over the routed AND zero-computation experts (zero_expert_num identity "
    "experts: a token's weight on them multiplies its own input), top-k on probabilities + e_score_correction_bias, "
    "weights times routed_scaling_factor, never renormalised; only the routed experts are pruned or merged (the "
    "router keeps the zero experts' rows); each of its num_layers layers runs two attention + dense-MLP sublayers "
    "with the MoE as a shortcut from the first (transformers' own modules)",
)

DBRX = ArchSpec(
    model_type="dbrx",
    num_experts_keys=("moe_num_experts",),
    layers_prefix="transformer.blocks",
    embed_key="transformer.wte.weight",
    final_norm_key="transformer.norm_f.weight",
    decoder_layers_attr="blocks",
    moe_attr="ffn",
    moe_disk="ffn",
    router_weight="router.layer.weight",
    experts_prefix="experts.mlp",
    fused_gate_up="w1",
    fused_up="v1",
    fused_down="w2",
    fused_down_input_major=True,
    top_k_key="moe_top_k",
    moe_intermediate_key="ffn_hidden_size",
    renormalize_key="moe_normalize_expert_weights",
    renorm_p_key="moe_normalize_expert_weights",
    hidden_act_key="ffn_config.ffn_act_fn.name",
    lifted_keys=(("moe_num_experts", "ffn_config.moe_num_experts"), ("moe_top_k", "ffn_config.moe_top_k"),
                 ("ffn_hidden_size", "ffn_config.ffn_hidden_size"),
                 ("moe_normalize_expert_weights", "ffn_config.moe_normalize_expert_weights")),
    derived_keys=("num_hidden_layers", "hidden_size", "num_attention_heads"),
    notes="DBRX: softmax -> top-k -> divided by the moe_normalize_expert_weights-norm of the k weights (none if "
    "null); expert settings nested in ffn_config (read and written there); experts as three tensors w1 (gate), v1 "
    "(up), w2 (down, input-major), each flattened to [E * I, H]; decoder blocks transformer.blocks.N with the MoE "
    "as ffn",
)

STEP3P5 = ArchSpec(
    model_type="step3p5",
    num_experts_keys=("n_routed_experts", "moe_num_experts", "num_local_experts"),
    router_kind="sigmoid_grouped_topk",
    moe_disk="moe",
    router_bias="router_bias",
    shared_expert_attr="shared_experts",
    experts_prefix="",
    fused_gate_up="gate_proj.weight",
    fused_up="up_proj.weight",
    fused_down="down_proj.weight",
    renormalize_key=None,
    always_renormalize=True,
    router_fp32=False,
    scaling_key="moe_router_scaling_factor",
    mtp_layers_key="num_nextn_predict_layers",
    mask_by_layer_type=True,
    expert_act="swiglu_layer_clamp",
    expert_limits_key="swiglu_limits",
    disk_renames=((".moe.shared_experts.", ".share_expert."),),
    derived_keys=("num_experts_per_tok",),
    unsupported_keys=(("use_bidirectional_attention", "its bidirectional attention masks are not built"),),
    notes="Step-3.5-Flash (step3p5) and the text model of Step-3.7 (step3p7, compressed as released): sigmoid router "
    "(logits in the router weight's dtype) with a selection bias (moe.router_bias), top-k, renormalised, times "
    "moe_router_scaling_factor; a shared expert (share_expert, run by its transformers module with its own clamp); "
    "routed experts clamped after the activation per layer (swiglu_limits) and stored as three [E, ...] tensors "
    "moe.gate_proj / up_proj / down_proj.weight; sliding and full attention per layer_types, each with its own "
    "rotary and per-layer head counts; dense layers per mlp_layer_types; MTP layers as DeepSeek-V3's where present",
)

JAMBA = ArchSpec(
    model_type="jamba",
    num_experts_keys=("num_experts", "num_local_experts"),
    final_norm_key="model.final_layernorm.weight",
    moe_attr="feed_forward",
    moe_disk="feed_forward",
    router_weight="router.weight",
    moe_intermediate_key="intermediate_size",
    renormalize_key=None,
    mask_by_layer_type=True,
    notes="Jamba: softmax -> top-k, never renormalised; Mamba and attention layers per attn_layer_period / offset "
    "(Mamba run by transformers' own module without a cache, whole sequences, no positions), MoE feed-forward per "
    "expert_layer_period / offset, the others dense",
)

# DeepSeek-V4's layer tensors as stored (the release's names, which transformers' save_pretrained writes back) for the
# names transformers holds in memory: (in-memory substring, on-disk substring), applied in order
_DEEPSEEK_V4_RENAMES = (
    ("lm_head.", "head."),
    (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
    (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
    (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
    (".self_attn.", ".attn."), (".sinks", ".attn_sink"), (".position_bias", ".ape"),
    (".q_a_proj.", ".wq_a."), (".q_a_norm.", ".q_norm."), (".q_b_proj.", ".wq_b."), (".kv_proj.", ".wkv."),
    (".kv_norm.", ".norm."), (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."), (".compressor.gate_proj.", ".compressor.wgate."),
    (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ffn_norm."),
    (".attn_hc.", ".hc_attn_"), (".ffn_hc.", ".hc_ffn_"), (".mlp.", ".ffn."),
    (".shared_experts.gate_proj.", ".shared_experts.w1."), (".shared_experts.up_proj.", ".shared_experts.w3."),
    (".shared_experts.down_proj.", ".shared_experts.w2."), (".gate.e_score_correction_bias", ".gate.bias"),
)

DEEPSEEK_V4 = ArchSpec(
    model_type="deepseek_v4",
    num_experts_keys=("n_routed_experts", "num_local_experts"),
    router_kind="sigmoid_grouped_topk",
    lm_head_key="head.weight",
    moe_disk="ffn",
    router_bias="gate.bias",
    expert_proj_names=("w1", "w3", "w2"),
    shared_expert_attr="shared_experts",
    renormalize_key=None,
    always_renormalize=True,
    router_fp32=False,
    expert_act="swiglu_clamp",
    expert_limits_key="swiglu_limit",
    attn_implementation="eager",
    disk_renames=_DEEPSEEK_V4_RENAMES,
    residual_streams_key="hc_mult",
    moe_stream_weights_attr="ffn_hc",
    stream_head=("hc_head", "model.hc_head"),
    rotary_types=("main", "compress"),
    hash_table="gate.tid2eid",
    score_fn_key="scoring_func",
    release_names=(("layers_prefix", "layers"), ("embed_key", "embed.weight"), ("final_norm_key", "norm.weight"),
                   ("stream_head", ("hc_head", "hc_head")),
                   ("disk_renames", (*_DEEPSEEK_V4_RENAMES, ("hc_head.hc_", "hc_head_")))),
    detached_mtp_prefix="mtp.",
    detached_mtp_key="num_nextn_predict_layers",
    mtp_unsupported="DeepSeek-V4's MTP block (mtp.*) is not modelled by transformers, so ream-lite cannot compress "
    "it with the layers",
    notes="DeepSeek-V4 (Flash / Pro): scoring_func (sqrt(softplus), sigmoid or softmax) of the logits + selection "
    "bias (gate.bias), top-k, always renormalised, times routed_scaling_factor; the first layers (mlp_layer_types "
    "hash_moe) choose their experts by a [vocab, k] table of the token id (gate.tid2eid), remapped when experts go "
    "(engine/hash_routing.py); routed experts clamp gate and up before the activation (swiglu_limit); a shared "
    "expert; manifold-constrained hyper-connections (hc_mult residual streams: the MoE block's input is their "
    "weighted sum, its output enters each stream scaled by the layer's ffn_hc weights, which the engine keeps "
    "beside the input); compressed sparse / heavily compressed attention run by transformers' own modules; read "
    "and written under the release names (layers.N.attn.*, ffn.experts.N.w1/w2/w3; embed, norm, head and hc_head_* "
    "at the top, or under model. as transformers' save_pretrained writes them)",
)

FAMILIES: dict[str, ArchSpec] = {}
for _spec in (QWEN3_MOE, QWEN2_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3, GLM4_MOE, QWEN3_NEXT, QWEN3_5_MOE_TEXT,
              QWEN3_VL_MOE_TEXT, QWEN3_OMNI_MOE_TEXT, LLAMA4_TEXT, GPT_OSS, ERNIE4_5_MOE, PHIMOE, GRANITEMOE,
              GRANITEMOESHARED, GRANITEMOEHYBRID,
              HUNYUAN_V1_MOE, MINIMAX_M2, MINIMAX, DOTS1, GLM4_MOE_LITE, DEEPSEEK_V32, GLM_MOE_DSA, DEEPSEEK_V2, JAMBA,
              EXAONE_MOE, SOLAR_OPEN, KIMI_LINEAR, FLEX_OLMO,
              BAILING_HYBRID, NEMOTRON_H, LONGCAT_FLASH, DBRX, STEP3P5, DEEPSEEK_V4):
    FAMILIES[_spec.model_type] = _spec
    for _alias in _spec.aliases:
        FAMILIES[_alias] = _spec
