"""What the tensors of an MoE family mean: a small declarative description per family.

A spec names things relative to a decoder layer (`{layers_prefix}.{i}.`) and to its MoE block on disk. It says
nothing about how statistics are computed; the engine reads a spec, the methods never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# softmax_topk: softmax over all experts, then top-k; topk_softmax (gpt_oss): top-k of the (biased) logits, then a
# softmax over the k chosen ones only
# sparsemixer (PhiMoE): top-2 by two rounds of a thresholded softmax (see engine/router.py)
RouterKind = Literal["softmax_topk", "sigmoid_grouped_topk", "topk_sigmoid_input", "topk_softmax", "sparsemixer"]


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
    # router logits from float32 inputs and weights (Ernie-4.5, HunYuan); None: the kind's own default (softmax
    # kinds: the input dtype; sigmoid_grouped_topk: float32)
    fp32_logits: bool | None = None
    renorm_min: float = 0.0  # Ernie-4.5: the top-k sum is clamped to at least this before dividing (moe_norm_min)
    jitter_eps: float = 0.0  # sparsemixer: relative logit gap beyond which an expert is masked (2 * jitter_eps)
    # zero-computation experts (LongCat-Flash): router rows num_experts .. num_experts + zero_experts - 1 choose the
    # identity, weight * x; they are never pruned or merged (engine/router.py: Routing.identity)
    zero_experts: int = 0
    renorm_p: float = 1.0  # renormalisation divides by the p-norm of the top-k weights (1: their sum)
    # sigmoid_grouped_topk's per-expert score of a logit: "sigmoid", or DeepSeek-V4's "sqrtsoftplus" / "softmax"
    score_fn: str = "sigmoid"

    @property
    def scales_input(self) -> bool:
        """Whether the routing weight multiplies the expert's input (Llama-4: E(w * x)) instead of its output."""
        return self.kind == "topk_sigmoid_input"


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
    # per-expert on-disk projection names: (gate, up, down), keys `{experts_prefix}.{e}.{name}.weight`; a gate of
    # None: ungated experts, down(act(up x)) (Nemotron-H), held with a gate of zero inputs (engine/experts.py)
    expert_proj_names: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj")
    # fused on-disk layout: `{experts_prefix}.gate_up_proj` [E, 2I, H] (gate rows then up rows) and
    # `{experts_prefix}.down_proj` [E, H, I], as transformers holds them in memory
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    # fused experts whose up projection is a tensor of its own (DBRX's v1): `fused_gate_up` then holds the gate
    # alone. A fused tensor may also hold its experts flattened along dim 0 (DBRX: [E * I, H]): the rows of one
    # expert are then dim 0 / E consecutive rows (ModelLayout.fused_rows)
    fused_up: str | None = None
    # the fused down projection's orientation when it differs from gate / up's (DBRX: w2 stored [E * I, H], y = a @ W)
    fused_down_input_major: bool | None = None
    shared_expert_attr: str | None = None  # shared expert submodule of the MoE block (same name on disk)
    shared_gate_attr: str | None = None  # Qwen2-MoE: sigmoid gate of the shared expert
    top_k_key: str = "num_experts_per_tok"
    moe_intermediate_key: str = "moe_intermediate_size"
    renormalize_key: str | None = "norm_topk_prob"  # None: family always renormalises (Mixtral)
    always_renormalize: bool = False
    mtp_layers_key: str | None = None  # DeepSeek-V3 / GLM: extra next-token-prediction layers after the last one
    # an MTP layer k (index num_hidden_layers + k) computes eh_proj(cat(enorm(embed(t+1)), hnorm(h_t))) and runs a
    # decoder block on it; h_t is the main model's final-normed output (the previous MTP layer's, normed by its
    # shared_head.norm, for k > 0). Names relative to the MTP layer, or, starting with "/", keys of the checkpoint
    # (`mtp_key`): Qwen3-Next's one MTP block keeps them beside its layer (mtp.fc, mtp.pre_fc_norm_*, mtp.norm).
    mtp_embed: str = "embed_tokens.weight"
    mtp_enorm: str = "enorm.weight"
    mtp_hnorm: str = "hnorm.weight"
    mtp_proj: str = "eh_proj.weight"
    mtp_head_norm: str = "shared_head.norm.weight"
    mtp_head: str = "shared_head.head.weight"  # an MTP layer's own copy of the head (never run: the lm_head is)
    # where MTP layers are stored when not as decoder layers num_hidden_layers + k: MTP layer k at `{prefix}.{k}`
    mtp_layers_prefix: str | None = None
    # hybrid models (Qwen3-Next, Qwen3.5, Llama-4): each decoder layer gets the mask of its config.layer_types entry
    # (full / sliding / chunked / linear attention), as the transformers model builds one mask per layer type
    mask_by_layer_type: bool = False
    # the attention mask is always built as a tensor, never left to the kernel's is_causal (DeepSeek sparse
    # attention: its indexer scores keys against the mask)
    materialised_mask: bool = False
    # an MTP module stored outside the decoder layers (Qwen3-Next / Qwen3.5 `mtp.*`, which transformers drops): every
    # key under this prefix belongs to it; with --drop-mtp none is written and `detached_mtp_key` is set to 0
    detached_mtp_prefix: str | None = None
    detached_mtp_key: str | None = None
    # fused experts stored input-major, as Llama-4 holds them: gate_up_proj [E, H, 2I] (gate columns then up
    # columns), down_proj [E, I, H]; the default is transformers' [E, 2I, H] / [E, H, I]
    fused_input_major: bool = False
    # the orientation above is read from each checkpoint's shapes instead (ModelLayout): Qwen3-VL-MoE releases store
    # input-major experts, transformers' save_pretrained writes its in-memory output-major ones, and both load
    fused_orientation_from_shapes: bool = False
    # the decoder layer unpacks its MoE block's output as (output, router_logits) (Llama-4)
    moe_returns_tuple: bool = False
    # gpt_oss: the fused gate_up_proj holds gate and up INTERLEAVED along its 2I axis (gate at 0::2, up at 1::2)
    # instead of the gate half then the up half
    fused_interleaved: bool = False
    # per-expert biases of fused experts, relative to the experts prefix: (the gate_up bias [E, 2I], laid out as the
    # 2I axis of gate_up_proj, the down bias [E, H]) (gpt_oss); None: experts without biases
    fused_bias_names: tuple[str, str] | None = None
    # the experts' gated activation: "swiglu" = act(gate) * up with config.hidden_act; "clamped_swiglu" = gpt_oss's;
    # "swiglu_layer_clamp" (see engine/expert_fn.py)
    expert_act: str = "swiglu"
    # "swiglu_layer_clamp": act(gate) and up clamped by this config attribute's per-layer limit (0: none; Ling 2.5)
    expert_limits_key: str | None = None
    # an attention implementation the family requires (gpt_oss: eager; transformers' SDPA path has no sinks)
    attn_implementation: str | None = None
    # -- families added with ernie4_5_moe / phimoe / granitemoe / hunyuan_v1_moe / minimax(_m2) --
    router_fp32: bool | None = None  # RouterConfig.fp32_logits
    renorm_min_key: str | None = None  # config key of RouterConfig.renorm_min (Ernie-4.5: moe_norm_min)
    jitter_key: str | None = None  # config key of RouterConfig.jitter_eps (PhiMoE: router_jitter_noise)
    # config key of the routed scaling factor of sigmoid routers; None: the family never scales (MiniMax-M2)
    scaling_key: str | None = "routed_scaling_factor"
    # releases whose tensors transformers renames or concatenates when it loads them (its conversion mapping), as
    # data: (in-memory substring, on-disk substring) renames, applied in order, and (in-memory suffix, on-disk
    # suffixes) concatenations along dim 0 (Kimi-Linear's stacked q/k/v convolutions)
    disk_renames: tuple[tuple[str, str], ...] = ()
    disk_concat: tuple[tuple[str, tuple[str, ...]], ...] = ()
    n_group_key: str = "n_group"  # config key of RouterConfig.n_group (Kimi-Linear: num_expert_group)
    # -- DeepSeek-V2: a softmax router that also scales by scaling_key and may be group-limited --
    softmax_scaled: bool = False  # softmax_topk weights times config[scaling_key]
    # config key naming the top-k method ("greedy" | "group_limited_greedy", DeepSeek-V2's topk_method): groups
    # (n_group / topk_group, each scored by its best expert) limit the choice only for "group_limited_greedy"
    topk_method_key: str | None = None
    # config keys of scalar multipliers the decoder applies around its blocks (transformers config defaults when the
    # checkpoint's config leaves them out): the MoE block's output (Granite residual_multiplier, MiniMax
    # mlp_beta_factor; the layer's own module applies the same factor to everything else), the token embeddings
    # (Granite embedding_multiplier) and the logits (divided: Granite logits_scaling)
    moe_output_scale_key: str | None = None
    # post-norm decoders (FlexOlmo, as OLMo-2): the decoder layer's norm module (this attribute) normalises the MoE
    # block's whole output before the residual add, so a layer's experts must all be summed before it applies
    moe_post_norm: str | None = None
    embedding_scale_key: str | None = None
    logits_divisor_key: str | None = None
    # the config key of the experts' activation (Nemotron-H: mlp_hidden_act; dotted: an attribute path, DBRX's
    # ffn_config.ffn_act_fn.name)
    hidden_act_key: str = "hidden_act"
    # the attribute of the transformers decoder holding its layers (DBRX: blocks)
    decoder_layers_attr: str = "layers"
    # config keys nested in a sub-config (DBRX's ffn_config): (the flat name everything reads, its dotted path);
    # ModelLayout lifts them into its config and writes them back where they were
    lifted_keys: tuple[tuple[str, str], ...] = ()
    # config key of the norm the top-k weights are renormalised by (DBRX: moe_normalize_expert_weights, a p-norm);
    # None: the sum (p = 1)
    renorm_p_key: str | None = None
    # config key of the number of decoder layers (LongCat-Flash: num_layers, each layer two attention sublayers)
    num_layers_key: str = "num_hidden_layers"
    # config key of the number of zero-computation (identity) experts beside the routed ones (LongCat-Flash)
    zero_experts_key: str | None = None
    # config keys the transformers config class derives when config.json leaves them out (Nemotron-H:
    # num_hidden_layers from layers_block_type): read from it, never written to the output's config.json
    derived_keys: tuple[str, ...] = ()
    # latent MoE (Nemotron-3 Super): attributes of the MoE block projecting its input into the experts' space and
    # their summed output back (fc1_latent_proj, fc2_latent_proj); the experts then run on the projected input
    latent_projections: tuple[str, str] | None = None
    # -- DeepSeek-V4 --
    # config key of the number of residual streams (manifold-constrained hyper-connections: each token carries
    # hc_mult hidden vectors between layers; a block sees their weighted sum and its output enters every stream
    # scaled by a weight of its own); None: one stream
    residual_streams_key: str | None = None
    # the decoder layer's module computing those weights for its MoE block ((post, comb, collapsed) = module(h)):
    # the engine keeps `post` beside the block's input and expands the block's output with it
    moe_stream_weights_attr: str | None = None
    # the model's module collapsing the streams before the final norm, and its checkpoint prefix
    stream_head: tuple[str, str] | None = None
    # rotary embeddings the decoder layers take as a dict keyed by these rope types (DeepSeek-V4: main, compress)
    rotary_types: tuple[str, ...] = ()
    # hash-routed layers: a [vocab, k] table of expert ids per token id (relative to the MoE block; a layer routes by
    # it where the checkpoint stores it): the router's scores weight the experts the table chooses
    hash_table: str | None = None
    # config key of RouterConfig.score_fn
    score_fn_key: str | None = None
    # the names a release uses where they differ from what transformers' save_pretrained writes: field overrides
    # of this spec, applied when the checkpoint stores the release's embedding key (`embed_key` among them)
    release_names: tuple[tuple[str, object], ...] = ()
    # an MTP module ream-lite cannot run (its structure not modelled by transformers): refused unless --drop-mtp
    mtp_unsupported: str | None = None
    # config keys whose set (truthy) value describes a variant ream-lite does not run: (key, why)
    unsupported_keys: tuple[tuple[str, str], ...] = ()
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gated_experts(self) -> bool:
        return self.expert_proj_names[0] is not None

    @property
    def down_input_major(self) -> bool:
        return self.fused_input_major if self.fused_down_input_major is None else self.fused_down_input_major

    def num_experts(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                return _uniform(config[key], key)
        raise KeyError(f"config has none of {self.num_experts_keys}")

    def router_config(self, config: dict) -> RouterConfig:
        if self.always_renormalize:
            renorm = True
        else:
            renorm = bool(config.get(self.renormalize_key, False)) if self.renormalize_key else False
        scaling_key = self.scaling_key
        return RouterConfig(
            kind=self.router_kind,
            num_experts=self.num_experts(config),
            top_k=_uniform(config[self.top_k_key], self.top_k_key),
            renormalize=renorm,
            scaling=float(config.get(scaling_key, 1.0) or 1.0)
            if (self.router_kind == "sigmoid_grouped_topk" or self.softmax_scaled) and scaling_key
            else 1.0,
            n_group=int(config.get(self.n_group_key, 1) or 1) if self._grouped(config) else 1,
            topk_group=int(config.get("topk_group", 1) or 1) if self._grouped(config) else 1,
            fp32_logits=self.router_fp32,
            renorm_min=float(config.get(self.renorm_min_key) or 0.0) if self.renorm_min_key else 0.0,
            jitter_eps=float(config.get(self.jitter_key) or 0.0) if self.jitter_key else 0.0,
            zero_experts=int(config.get(self.zero_experts_key) or 0) if self.zero_experts_key else 0,
            renorm_p=float(config.get(self.renorm_p_key) or 1.0) if self.renorm_p_key else 1.0,
            score_fn=str(config.get(self.score_fn_key) or "sigmoid") if self.score_fn_key else "sigmoid",
        )

    def disk_keys(self, key: str) -> tuple[str, ...]:
        """The checkpoint key(s) holding the in-memory tensor `key` (a module's parameter name under its checkpoint
        prefix): renamed by `disk_renames`, and several keys, concatenated along dim 0, where `disk_concat` says."""
        for memory, disk in self.disk_renames:
            key = key.replace(memory, disk)
        for suffix, parts in self.disk_concat:
            if key.endswith(suffix):
                return tuple(key[: -len(suffix)] + p for p in parts)
        return (key,)

    def mtp_key(self, layer_prefix: str, name: str) -> str:
        """The checkpoint key of MTP part `name` (mtp_enorm, ...) of the MTP layer stored at `layer_prefix`."""
        return name[1:] if name.startswith("/") else f"{layer_prefix}.{name}"

    def _grouped(self, config: dict) -> bool:
        return self.topk_method_key is None or config.get(self.topk_method_key) == "group_limited_greedy"

    def config_scalar(self, config, key: str | None) -> float:
        """A multiplier named by one of the *_key fields, from a transformers config object (1.0 if no key)."""
        return 1.0 if key is None else float(getattr(config, key))


def _uniform(value, key: str) -> int:
    """A per-model integer that some configs (HunYuan's moe_topk) store as one value per layer: the engine routes
    every layer alike, so a list must hold one value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config {key} differs between layers ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)
