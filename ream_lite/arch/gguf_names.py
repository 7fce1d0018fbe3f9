"""llama.cpp's names for the MoE families, as data: GGUF tensor names <-> the Hugging Face checkpoint names the
family specs use, and GGUF metadata keys <-> config.json keys.

A GGUF file names tensors `blk.{i}.{name}.weight` and keeps its config as `{arch}.{key}` metadata. ream-lite reads a
GGUF as the Hugging Face checkpoint it was converted from (checkpoint/gguf.py): every tensor under its transformers
name, the fused expert tensors `ffn_{gate,up,down}_exps` split into per-expert tensors (one byte range each), and a
config.json built from the metadata. The writer maps the names back. Nothing here reads a file.

Where llama.cpp's converter changed a tensor on the way in, the entry says so and the reader undoes it:
- the `llama` architecture (Mixtral) stores attn_q / attn_k with the rows of each head permuted for llama.cpp's
  rotary layout (`rope_permuted`);
- `deepseek2` (multi-head latent attention) stores transformers' `kv_b_proj` as two tensors, `attn_k_b` (the key
  rows of every head, transposed) and `attn_v_b` (the value rows), for llama.cpp's absorbed attention
  (`split_tensors`, a `HeadSplit`); older GGUFs keep it whole as `attn_kv_b`;
- `gpt-oss` stores transformers' fused experts, gate_up_proj [E, H, 2I] with gate and up interleaved along 2I (and
  its bias [E, 2I]) and down_proj [E, I, H], as llama.cpp's separate output-major ffn_gate_exps / ffn_up_exps /
  ffn_down_exps [E, I, H] / [E, H, I] and their biases (`split_tensors`, an `Interleave`).
A transformers tensor held by several GGUF tensors (or by one stored transposed) is one logical tensor whose stored
parts are those GGUF tensors: the first is its main part, each other one the part `PART_SEP + its GGUF name`
(`part_name`), so a writer that copies every part of a tensor copies each GGUF tensor's bytes unchanged, and one that
writes new values (a merged expert) cuts them into the parts (`cut`) and writes each in its own type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# tensors outside the decoder layers (every family)
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# the suffix of the non-main parts of a transformers tensor llama.cpp stores as several tensors (`HeadSplit`,
# `Interleave`)
PART_SEP = ":"

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
# DeepSeek-V3's MoE block as GLM-4.5 and DeepSeek-V2/V3 name it: the router, dense layers (first_k_dense_replace) and
# ungated shared experts (`mlp.shared_experts`)
_DEEPSEEK_MLP = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
# NextN / MTP layers (blk.{num_hidden_layers + k}): their own tensors beside a decoder layer's
_NEXTN = {
    "nextn.eh_proj.weight": "eh_proj.weight",
    "nextn.enorm.weight": "enorm.weight",
    "nextn.hnorm.weight": "hnorm.weight",
    "nextn.embed_tokens.weight": "embed_tokens.weight",
    "nextn.shared_head_head.weight": "shared_head.head.weight",
    "nextn.shared_head_norm.weight": "shared_head.norm.weight",
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
# DeepSeek-V3's router and MoE layout as llama.cpp's metadata says it (GLM-4.5, DeepSeek-V2/V3)
_DEEPSEEK_MOE_CONFIG = {
    "expert_count": "n_routed_experts",
    "expert_shared_count": "n_shared_experts",
    "leading_dense_block_count": "first_k_dense_replace",
    "expert_weights_scale": "routed_scaling_factor",
    "expert_weights_norm": "norm_topk_prob",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
    "nextn_predict_layers": "num_nextn_predict_layers",
}
# what llama.cpp's graph does when those keys are absent (its hparams' defaults): no renormalisation, no scaling,
# no groups, no dense layers, no MTP layers (transformers' config classes default to DeepSeek-V3's values instead)
_DEEPSEEK_MOE_DEFAULTS = {"norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                          "first_k_dense_replace": 0, "num_nextn_predict_layers": 0}
# metadata value types other than UINT32
FLOAT_KEYS = frozenset({"attention.layer_norm_rms_epsilon", "expert_weights_scale", "rope.freq_base",
                        "rope.scaling.factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast",
                        "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_attn_factor"})
BOOL_KEYS = frozenset({"expert_weights_norm"})
STRING_KEYS = frozenset({"rope.scaling.type"})
# llama.cpp's expert_gating_func values (LLAMA_EXPERT_GATING_FUNC_TYPE_*)
GATING_SOFTMAX, GATING_SIGMOID = 1, 2


@dataclass(frozen=True)
class HeadSplit:
    """A transformers tensor llama.cpp's converter stores as several GGUF tensors, cut by attention head: its rows
    are per head [H, r_1 + r_2 + ..., cols]; part i holds rows r_i of every head, [H, r_i, cols], or transposed
    [H, cols, r_i] where `transposed[i]` (torch shapes; llama.cpp's dimensions are the reverse).

    MLA's kv_b_proj [H * (nope + v), kv_lora_rank] is attn_k_b [H, kv_lora_rank, nope] (transposed: the absorbed
    attention multiplies q_nope by it) and attn_v_b [H, v, kv_lora_rank]."""

    parts: tuple[str, ...]  # GGUF names relative to `blk.{i}.`, in row order
    transposed: tuple[bool, ...]
    rows_keys: tuple[str, ...]  # the config key of each part's rows per head
    heads_key: str = "num_attention_heads"

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """transformers' tensor from its parts as stored (the reader)."""
        per_head = [p.transpose(1, 2) if t else p for p, t in zip(parts, self.transposed)]
        x = torch.cat(per_head, dim=1)
        return x.reshape(-1, x.shape[-1])

    def cut(self, x: torch.Tensor, config: dict) -> list[torch.Tensor]:
        """The parts, as llama.cpp's converter stores them, of transformers' tensor `x` (the exporter)."""
        rows = [int(config[k]) for k in self.rows_keys]
        heads = int(config[self.heads_key])
        per_head = torch.split(x.reshape(heads, sum(rows), x.shape[-1]), rows, dim=1)
        return [(p.transpose(1, 2) if t else p).contiguous() for p, t in zip(per_head, self.transposed)]

    def part_shapes(self, cols: int, config: dict) -> list[tuple[int, int, int]]:
        """The parts' (torch) shapes for a transformers tensor of `cols` columns of a model configured by
        `config`."""
        heads = int(config[self.heads_key])
        return [(heads, cols, int(config[k])) if t else (heads, int(config[k]), cols)
                for k, t in zip(self.rows_keys, self.transposed)]

    def shape(self, part_shapes: list[tuple[int, ...]]) -> tuple[int, int]:
        """transformers' shape from the parts' (torch) shapes (ValueError if they do not fit together)."""
        if len(part_shapes) != len(self.parts) or any(len(s) != 3 for s in part_shapes):
            raise ValueError(part_shapes)
        heads = {s[0] for s in part_shapes}
        cols = {s[1] if t else s[2] for s, t in zip(part_shapes, self.transposed)}
        if len(heads) != 1 or len(cols) != 1:
            raise ValueError(part_shapes)
        return heads.pop() * sum(s[2] if t else s[1] for s, t in zip(part_shapes, self.transposed)), cols.pop()

    experts = False  # (its parts have no expert axis: never cut to the kept experts, never read by expert rows)

    def stored_shapes(self, shape: tuple[int, ...], config: dict) -> list[tuple[int, ...]]:
        """The parts' (torch) shapes for transformers' tensor of `shape` (`part_shapes` by the whole shape)."""
        return self.part_shapes(shape[-1], config)


@dataclass(frozen=True)
class Interleave:
    """A fused expert tensor of transformers llama.cpp's converter stores as several GGUF tensors with the experts on
    their outermost axis, interleaved row by row: part i holds rows i::k (k parts) of every expert's [k * R, C]
    matrix ([E, R, C] each; biases [E, R] -> [E, k * R]); with `transposed`, transformers' tensor is that matrix
    transposed ([E, C, k * R]: input-major, y = x @ W). One part alone is the tensor itself (transposed or not).

    gpt-oss's gate_up_proj [E, H, 2I] (gate at 0::2, up at 1::2) is ffn_gate_exps + ffn_up_exps [E, I, H]
    (transposed), its gate_up_proj_bias [E, 2I] is ffn_gate_exps.bias + ffn_up_exps.bias [E, I], its down_proj
    [E, I, H] is ffn_down_exps [E, H, I] (transposed)."""

    parts: tuple[str, ...]  # GGUF names relative to `blk.{i}.`, in interleave order
    transposed: bool = False
    experts = True  # every part is [E, ...]: cut to the kept experts, read by expert rows

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """transformers' tensor from its parts as stored (the reader; any leading run of experts)."""
        x = parts[0] if len(parts) == 1 else torch.stack(parts, dim=2).flatten(1, 2)
        return (x.transpose(1, 2) if self.transposed else x).contiguous()

    def cut(self, x: torch.Tensor, config: dict | None = None) -> list[torch.Tensor]:
        """The parts, as llama.cpp's converter stores them, of transformers' tensor `x` ([n, ...], any n)."""
        x = x.transpose(1, 2) if self.transposed else x
        k = len(self.parts)
        return [x[:, i::k].contiguous() for i in range(k)]

    def stored_shapes(self, shape: tuple[int, ...], config: dict | None = None) -> list[tuple[int, ...]]:
        """The parts' (torch) shapes for transformers' tensor of `shape`."""
        if self.transposed:
            shape = (shape[0], shape[2], shape[1])
        k = len(self.parts)
        if len(shape) < 2 or shape[1] % k:
            raise ValueError(shape)
        return [(shape[0], shape[1] // k, *shape[2:])] * k

    def shape(self, part_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """transformers' shape from the parts' (torch) shapes (ValueError if they do not fit together)."""
        if len(part_shapes) != len(self.parts) or len(set(part_shapes)) != 1:
            raise ValueError(part_shapes)
        s = part_shapes[0]
        if len(s) != 3 and (self.transposed or len(s) != 2):  # [E, R, C] matrices, or [E, R] biases
            raise ValueError(part_shapes)
        e, r, *rest = s
        return (e, rest[0], r * len(self.parts)) if self.transposed else (e, r * len(self.parts), *rest)


def part_name(name: str, gguf_rel: str, index: int) -> str:
    """The name ream-lite reads part `index` (GGUF name `gguf_rel`) of the split transformers tensor `name` under."""
    return name if index == 0 else f"{name}{PART_SEP}{gguf_rel}"


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture (`general.architecture`) read as a transformers model type."""

    arch: str
    model_type: str
    layer_tensors: dict[str, str]  # `blk.{i}.` + GGUF name -> `model.layers.{i}.` + HF name
    # tensors with one slice per routed expert on their outermost axis (llama.cpp's last dimension), which the
    # writer cuts to the kept experts: GGUF name -> HF name. With `{e}` in the HF name, a fused expert tensor
    # [E, rows, cols] read as one logical tensor per expert; without, one tensor read whole (the router's selection
    # bias exp_probs_b.bias [E]; gpt-oss's router bias [E] and down biases [E, H]). The router weight (`router`) is
    # cut alike.
    expert_tensors: dict[str, str]
    router: str = "ffn_gate_inp.weight"  # rows = experts (sliced to the kept experts)
    config_keys: dict[str, str] = field(default_factory=lambda: dict(_COMMON_CONFIG))
    # config values llama.cpp's graph for this architecture hard-codes (so they are not in the metadata)
    fixed_config: dict = field(default_factory=dict)
    # config values llama.cpp's graph assumes where the metadata leaves their key out
    config_defaults: dict = field(default_factory=dict)
    rope_permuted: bool = False  # attn_q / attn_k rows permuted per head by the converter (llama)
    num_experts_key: str = "num_experts"  # the HF config key of the routed expert count
    # HF name (relative to the layer) -> the GGUF tensors that hold it (deepseek2's attn_k_b / attn_v_b, gpt-oss's
    # fused experts)
    split_tensors: dict[str, HeadSplit | Interleave] = field(default_factory=dict)
    # other transformers model types the metadata may make of this architecture (deepseek2: deepseek_v2)
    other_model_types: tuple[str, ...] = ()

    @property
    def fused_experts(self) -> dict[str, str]:
        """The fused [E, rows, cols] expert tensors (GGUF name -> per-expert HF name with `{e}`)."""
        return {k: v for k, v in self.expert_tensors.items() if "{e}" in v}

    @property
    def cut_tensors(self) -> frozenset[str]:
        """GGUF names (relative to `blk.{i}.`) of the tensors with one slice per routed expert on their outermost
        axis, which a compressed output cuts to the kept experts (the router weight aside): `expert_tensors` and
        the parts of expert tensors held by several GGUF tensors (gpt-oss's `Interleave`s)."""
        parts = {p for split in self.split_tensors.values() if split.experts for p in split.parts}
        return frozenset(self.expert_tensors) | parts


_EXPERTS = {
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
}
_DEEPSEEK_EXPERTS = {**_EXPERTS, "exp_probs_b.bias": "mlp.gate.e_score_correction_bias"}

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
        GGUFArch(
            # GLM-4.5 / GLM-4.5-Air (and GLM-4.6): grouped-query attention with q/k/v biases and optional q/k
            # norms, rotary on the first half of each head in transformers' layout (NeoX: no permutation); the
            # post-attention norm is llama.cpp's post_attention_norm; DeepSeek-V3's router (sigmoid + selection
            # bias, groups, scaling); dense leading layers; NextN layers after the decoder layers
            arch="glm4moe",
            model_type="glm4_moe",
            layer_tensors={**{k: v for k, v in _ATTENTION.items() if k != "ffn_norm.weight"}, **_QKV_BIAS,
                           **_QK_NORM, "post_attention_norm.weight": "post_attention_layernorm.weight",
                           **_DEEPSEEK_MLP, **_NEXTN},
            expert_tensors=_DEEPSEEK_EXPERTS,
            config_keys={**_COMMON_CONFIG, **_DEEPSEEK_MOE_CONFIG},
            fixed_config={"hidden_act": "silu"},
            config_defaults=_DEEPSEEK_MOE_DEFAULTS,
            num_experts_key="n_routed_experts",
        ),
        GGUFArch(
            # DeepSeek-V2 / V2-Lite (softmax gating: transformers' deepseek_v2) and DeepSeek-V3 / R1 / Kimi-K2 /
            # GLM-4.7-Flash (sigmoid gating: deepseek_v3), told apart by expert_gating_func (gguf.py); multi-head
            # latent attention with or without a q LoRA (attn_q_a / attn_q_b, or attn_q); rotary on interleaved
            # pairs as the releases store them (no permutation)
            arch="deepseek2",
            model_type="deepseek_v3",
            layer_tensors={
                "attn_norm.weight": "input_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight",
                "attn_q_a.weight": "self_attn.q_a_proj.weight",
                "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
                "attn_q_b.weight": "self_attn.q_b_proj.weight",
                "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
                "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                "attn_kv_b.weight": "self_attn.kv_b_proj.weight",  # (GGUFs converted before the split)
                "attn_output.weight": "self_attn.o_proj.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                **_DEEPSEEK_MLP, **_NEXTN,
            },
            expert_tensors=_DEEPSEEK_EXPERTS,
            # (attention.key_length / value_length are MLA's compressed sizes here: gguf.py reads the head sizes)
            config_keys={**{k: v for k, v in _COMMON_CONFIG.items()
                            if k not in ("attention.key_length", "attention.head_count_kv")},
                         **_DEEPSEEK_MOE_CONFIG, "attention.q_lora_rank": "q_lora_rank",
                         "attention.kv_lora_rank": "kv_lora_rank", "rope.dimension_count": "qk_rope_head_dim"},
            fixed_config={"hidden_act": "silu", "attention_bias": False},
            config_defaults={**_DEEPSEEK_MOE_DEFAULTS, "q_lora_rank": None},
            num_experts_key="n_routed_experts",
            other_model_types=("deepseek_v2",),
            split_tensors={"self_attn.kv_b_proj.weight": HeadSplit(
                parts=("attn_k_b.weight", "attn_v_b.weight"), transposed=(True, False),
                rows_keys=("qk_nope_head_dim", "v_head_dim"))},
        ),
        GGUFArch(
            # gpt-oss-20b / 120b (llama.cpp's LLM_ARCH_OPENAI_MOE): attention with biases and per-head sinks,
            # alternating sliding-window / full layers, NeoX rotary (no permutation) with YaRN; the biased router
            # (top-k of the logits, softmax over the k); experts with biases and the clamped SwiGLU, whose alpha and
            # limit llama.cpp's graph hard-codes (1.702, 7.0); experts stored as separate gate / up / down tensors
            arch="gpt-oss",
            model_type="gpt_oss",
            layer_tensors={
                "attn_norm.weight": "input_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight",
                **_QKV_BIAS,
                "attn_output.weight": "self_attn.o_proj.weight",
                "attn_output.bias": "self_attn.o_proj.bias",
                "attn_sinks.weight": "self_attn.sinks",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "ffn_gate_inp.weight": "mlp.router.weight",
            },
            # (the router's bias and the down projections' biases: [E] and [E, H], cut to the kept experts)
            expert_tensors={"ffn_gate_inp.bias": "mlp.router.bias", "ffn_down_exps.bias": "mlp.experts.down_proj_bias"},
            config_keys={
                **{k: v for k, v in _COMMON_CONFIG.items() if k not in ("expert_feed_forward_length", "expert_count")},
                # (the converter writes intermediate_size as both; llama.cpp's experts read the second)
                "expert_feed_forward_length": "intermediate_size",
                "expert_count": "num_local_experts",
                "attention.sliding_window": "sliding_window",
            },
            fixed_config={"hidden_act": "silu", "attention_bias": True, "swiglu_alpha": 1.702, "swiglu_limit": 7.0},
            num_experts_key="num_local_experts",
            split_tensors={
                "mlp.experts.gate_up_proj": Interleave(("ffn_gate_exps.weight", "ffn_up_exps.weight"), True),
                "mlp.experts.gate_up_proj_bias": Interleave(("ffn_gate_exps.bias", "ffn_up_exps.bias")),
                "mlp.experts.down_proj": Interleave(("ffn_down_exps.weight",), True),
            },
        ),
    )
}

# architectures llama.cpp converts MoE models to that ream-lite does not read yet, and why
REFUSED: dict[str, str] = {
    "mixtral": "an old GGUF layout (per-expert ffn_*.{e} tensors, before llama.cpp fused them): re-convert it",
}


def rope_unpermute(rows: int, heads: int) -> list[int]:
    """The order of a `rope_permuted` tensor's rows as transformers holds them: llama.cpp's converter stores each
    head's rows [2, d/2] transposed to [d/2, 2] (interleaved rotary pairs), so transformers' row (h, i, j) is stored
    at (h, j, i); `stored[perm]` gives transformers' rows."""
    d = rows // heads
    half = d // 2
    return [h * d + j * 2 + i for h in range(heads) for i in range(2) for j in range(half)]
