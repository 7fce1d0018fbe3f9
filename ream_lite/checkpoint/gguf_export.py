"""A Hugging Face checkpoint written as a GGUF llama.cpp loads: the inverse of checkpoint/gguf.py's names.

Tensors are laid out first (names, types, shapes: the header), then each is read, converted and written in turn, so
memory holds one tensor. Types: norms, biases and routers stay F32 (as llama.cpp's own converter and llama-quantize
keep them); the routed experts get `expert_type`, everything else `other_type`; a tensor whose rows are not whole
blocks of its type falls back to F16 (as llama-quantize falls back). The tokenizer is written as llama.cpp's "gpt2"
(byte-level BPE) vocabulary when the checkpoint's tokenizer is one; otherwise its tokens are listed without merges
(enough for ream-lite, which can be given the tokenizer with --tokenizer; llama.cpp would not tokenize text with it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ream_lite.arch.gguf_names import (
    ARCHES,
    BOOL_KEYS,
    FLOAT_KEYS,
    GATING_SIGMOID,
    GATING_SOFTMAX,
    GLOBAL_TENSORS,
    PART_SEP,
    STRING_KEYS,
    GGUFArch,
    Interleave,
    part_name,
    rope_unpermute,
)
from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)

F32, F16 = 0, 1


def arch_for(model_type: str) -> GGUFArch:
    for a in ARCHES.values():
        if a.model_type == model_type or model_type in a.other_model_types:
            return a
    names = ", ".join(sorted(m for a in ARCHES.values() for m in (a.model_type, *a.other_model_types)))
    raise ReamLiteError(f"model_type '{model_type}' has no GGUF mapping in ream-lite yet; GGUF output supports {names}")


def gguf_tensor_plan(layout, arch: GGUFArch, legacy_kv_b: bool = False
                     ) -> list[tuple[str, list[str], tuple[int, ...]]]:
    """(GGUF name, the transformers tensors it holds (one per expert for fused experts; for one part of a
    transformers tensor llama.cpp stores as several, that part's name, `gguf_names.part_name`), torch shape).

    MLA's kv_b_proj is written as llama.cpp's converter writes it now (attn_k_b + attn_v_b), or with `legacy_kv_b`
    whole, as attn_kv_b (the layout of GGUFs converted before the split, which llama.cpp still runs)."""
    inverse_global = {v: k for k, v in GLOBAL_TENSORS.items()}
    inverse_layer = {v: k for k, v in arch.layer_tensors.items()}
    inverse_whole = {v: k for k, v in arch.expert_tensors.items() if "{e}" not in v}  # (the selection bias)
    cfg = {**layout.hf_config().to_dict(), **layout.config} if arch.split_tensors and not legacy_kv_b else {}
    r = layout.reader
    out = []
    for k in r.keys():  # noqa: SIM118 (a reader, not a dict)
        if k in inverse_global:
            out.append((inverse_global[k], [k], r.shape(k)))
    for x in layout.layers:
        prefix = f"model.layers.{x.index}."
        experts = set(layout.expert_keys(x.index))
        for k in layout.layer_keys(x.index):
            rel = k[len(prefix):]
            split = _split_of(arch, rel, legacy_kv_b)
            if split is not None:  # (MLA's kv_b_proj; gpt-oss's fused experts, de-interleaved)
                for i, (gname, shape) in enumerate(zip(split.parts, split.stored_shapes(r.shape(k), cfg))):
                    out.append((f"blk.{x.index}.{gname}", [part_name(k, gname, i)], shape))
                experts.discard(k)
            elif rel in inverse_layer:
                out.append((f"blk.{x.index}.{inverse_layer[rel]}", [k], r.shape(k)))
            elif rel in inverse_whole:
                out.append((f"blk.{x.index}.{inverse_whole[rel]}", [k], r.shape(k)))
                experts.discard(k)
            elif k not in experts:
                raise ReamLiteError(f"{k}: no llama.cpp name for this tensor of a {arch.model_type} model")
        if x.is_moe:
            if x.expert_storage == "fused" and not experts:  # (every fused tensor written above: gpt-oss)
                continue
            if x.expert_storage != "per_expert":
                raise ReamLiteError(f"layer {x.index}: fused {arch.model_type} expert tensors cannot be written as "
                                    "GGUF yet")
            for gname, template in arch.fused_experts.items():
                names = [prefix + template.format(e=e) for e in range(x.num_experts)]
                out.append((f"blk.{x.index}.{gname}", names, (x.num_experts, *r.shape(names[0]))))
    return out


def _split_of(arch: GGUFArch, rel: str, legacy_kv_b: bool):
    """How llama.cpp stores the layer tensor `rel` as several GGUF tensors (None: as one), `legacy_kv_b` keeping
    MLA's kv_b_proj whole."""
    split = arch.split_tensors.get(rel)
    return None if legacy_kv_b and not isinstance(split, Interleave) else split


def choose_type(gname: str, shape: tuple[int, ...], expert_type: int, other_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2 or "norm" in gname or gname.endswith((".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
        return F32
    want = expert_type if "_exps." in gname else other_type
    block = GGML_QUANT_SIZES[GGMLQuantizationType(want)][0]
    return want if shape[-1] % block == 0 else F16


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, expert_type: int = 8, other_type: int = F16,
                progress: bool = False, legacy_kv_b: bool = False) -> Path:
    """Write the checkpoint directory `src` as the GGUF file `out` (types: GGMLQuantizationType values; 8 = Q8_0)
    with the names, transforms and metadata llama.cpp's converter writes (`legacy_kv_b`: MLA's kv_b_proj whole, as
    converters before the attn_k_b / attn_v_b split wrote it)."""
    from gguf import GGUFValueType, GGUFWriter

    from ream_lite.arch.layout import ModelLayout
    from ream_lite.checkpoint.ggml_blocks import encode

    layout = ModelLayout(str(src))
    try:
        arch = arch_for(layout.spec.model_type)
        plan = gguf_tensor_plan(layout, arch, legacy_kv_b)
        out = Path(out)
        w = GGUFWriter(out, arch.arch)
        _write_metadata(w, layout, arch, GGUFValueType, legacy_kv_b)
        types = [choose_type(g, s, expert_type, other_type) for g, _, s in plan]
        from ream_lite.checkpoint.gguf_writer import nbytes_of

        for (gname, _, shape), qtype in zip(plan, types):
            w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes_of(qtype, tuple(reversed(shape))), qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        cfg = {**layout.hf_config().to_dict(), **layout.config}
        heads = {"self_attn.q_proj.weight": cfg.get("num_attention_heads"),
                 "self_attn.k_proj.weight": cfg.get("num_key_value_heads")}
        for (gname, names, shape), qtype in tqdm(list(zip(plan, types)), desc="gguf", disable=not progress):
            x = _value(layout, arch, gname, names, cfg, legacy_kv_b)
            rel = names[0].split(".", 3)[-1]
            if arch.rope_permuted and rel in heads:  # llama.cpp's rotary layout: the inverse of the reader's
                perm = torch.tensor(rope_unpermute(x.shape[0], int(heads[rel])))
                x = torch.empty_like(x).index_copy_(0, perm, x)
            data = encode(qtype, x) if qtype not in (F32, F16) else x.to(torch.float16 if qtype == F16 else x.dtype)
            w.write_tensor_data(data.contiguous().numpy())
        w.close()
        return out
    finally:
        layout.close()


def _value(layout, arch: GGUFArch, gname: str, names: list[str], cfg: dict, legacy_kv_b: bool) -> torch.Tensor:
    """The float32 values of GGUF tensor `gname` (before any rotary permutation): the transformers tensor(s) it
    holds, stacked for fused experts, or its part of a transformers tensor llama.cpp stores as several."""
    r = layout.reader
    if len(names) > 1:
        return torch.stack([r.get(n, dtype=torch.float32) for n in names])
    name = names[0].split(PART_SEP)[0]
    split = _split_of(arch, name.split(".", 3)[-1], legacy_kv_b)
    if split is None:
        return r.get(name, dtype=torch.float32)
    return split.cut(r.get(name, dtype=torch.float32), cfg)[split.parts.index(gname.split(".", 2)[-1])]


def _write_metadata(w, layout, arch: GGUFArch, T, legacy_kv_b: bool = False) -> None:
    """The metadata llama.cpp's converter writes for this architecture (conversion/*.py set_gguf_parameters)."""
    cfg = {**layout.hf_config().to_dict(), **layout.config}
    w.add_string("general.name", Path(layout.path).name)
    rc = layout.router_config
    n_mtp = sum(1 for x in layout.layers if x.is_mtp)
    meta: dict[str, object] = {}
    for key, hf in arch.config_keys.items():
        if key == "block_count":  # (NextN layers are blocks after the decoder layers)
            v = cfg[hf] + n_mtp
        elif key == "nextn_predict_layers":
            v = n_mtp or None
        else:
            v = {"expert_count": rc.num_experts, "expert_used_count": rc.top_k}.get(key, cfg.get(hf))
        if v is not None and not isinstance(v, (list, dict)):
            meta[key] = v
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        meta["rope.freq_base"] = theta
    factor = rope.get("factor")
    if rope.get("rope_type") in ("linear", "yarn") and factor is not None:
        meta["rope.scaling.type"] = rope["rope_type"]
        meta["rope.scaling.factor"] = factor
        if rope["rope_type"] == "yarn":
            for hf, key in (("original_max_position_embeddings", "original_context_length"),
                            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                if rope.get(hf) is not None:
                    meta[f"rope.scaling.{key}"] = rope[hf]
    _ARCH_METADATA.get(arch.arch, _default_metadata)(meta, cfg, legacy_kv_b)
    for key, v in meta.items():
        if isinstance(v, list):  # (gpt-oss's sliding layers: a flag per layer)
            w.add_key_value(f"{arch.arch}.{key}", [bool(x) for x in v], T.ARRAY, T.BOOL)
        elif key in BOOL_KEYS:
            w.add_key_value(f"{arch.arch}.{key}", bool(v), T.BOOL)
        elif key in STRING_KEYS:
            w.add_key_value(f"{arch.arch}.{key}", str(v), T.STRING)
        elif key in FLOAT_KEYS:
            w.add_key_value(f"{arch.arch}.{key}", float(v), T.FLOAT32)
        else:
            w.add_key_value(f"{arch.arch}.{key}", int(v), T.UINT32)
    w.add_key_value("general.file_type", 1, T.UINT32)
    _write_tokenizer(w, layout, cfg, T)


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _default_metadata(meta: dict, cfg: dict, legacy_kv_b: bool) -> None:
    meta["rope.dimension_count"] = _head_dim(cfg)
    meta["attention.value_length"] = _head_dim(cfg)


def _glm4moe_metadata(meta: dict, cfg: dict, legacy_kv_b: bool) -> None:
    """conversion/glm.py Glm4MoeModel: rotary on head_dim * partial_rotary_factor dimensions; sigmoid gating."""
    head_dim = _head_dim(cfg)
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    meta["attention.value_length"] = head_dim
    meta["rope.dimension_count"] = int(head_dim * partial)
    meta["expert_gating_func"] = GATING_SIGMOID


def _deepseek2_metadata(meta: dict, cfg: dict, legacy_kv_b: bool) -> None:
    """conversion/deepseek.py DeepseekV2Model: latent attention as llama.cpp's absorbed multi-query attention (one
    kv head of kv_lora_rank + rope, the per-head sizes as *_mla), or, for the legacy kv_b layout, as plain
    multi-head attention; expert_weights_norm only when true; YaRN's mscale_all_dim times 0.1."""
    rope, nope, v = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    meta["vocab_size"] = cfg["vocab_size"]
    if legacy_kv_b:
        meta.update({"attention.head_count_kv": cfg["num_attention_heads"], "attention.key_length": nope + rope,
                     "attention.value_length": v})
    else:
        meta.update({"attention.head_count_kv": 1, "attention.key_length": cfg["kv_lora_rank"] + rope,
                     "attention.value_length": cfg["kv_lora_rank"], "attention.key_length_mla": nope + rope,
                     "attention.value_length_mla": v})
    meta.setdefault("leading_dense_block_count", 0)
    if not meta.get("expert_weights_norm"):
        meta.pop("expert_weights_norm", None)
    scoring = cfg.get("scoring_func") or ("softmax" if cfg["model_type"] == "deepseek_v2" else "sigmoid")
    meta["expert_gating_func"] = {"softmax": GATING_SOFTMAX, "sigmoid": GATING_SIGMOID}[scoring]
    mscale_all = (cfg.get("rope_parameters") or {}).get("mscale_all_dim")
    if mscale_all is not None:
        meta["rope.scaling.yarn_log_multiplier"] = 0.1 * mscale_all


def _gpt_oss_metadata(meta: dict, cfg: dict, legacy_kv_b: bool) -> None:
    """conversion/gpt_oss.py GptOssModel: the sliding window; the layers that slide when they are not llama.cpp's
    default (even layers, as the releases alternate them) as a flag per layer. llama.cpp's graph hard-codes the
    clamped SwiGLU's alpha and limit (refused when they differ) and truncates YaRN's correction range (gpt-oss's
    config says not to: llama.cpp runs such a GGUF so, as it does the converter's)."""
    _default_metadata(meta, cfg, legacy_kv_b)
    for key, want in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
        v = cfg.get(key, want)
        if v is None or abs(float(v) - want) > 1e-6:
            raise ReamLiteError(f"gpt_oss with {key} = {v}: llama.cpp's gpt-oss graph hard-codes {want}, so no GGUF "
                                "holds this model")
    n = int(cfg["num_hidden_layers"])
    sliding = [t == "sliding_attention" for t in (cfg.get("layer_types") or [])]
    if sliding and sliding != [i % 2 == 0 for i in range(n)]:
        meta["attention.sliding_window_pattern"] = sliding
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        log.warning("gpt_oss: YaRN without truncation (truncate: false); llama.cpp truncates the correction range, so "
                    "the GGUF runs YaRN as transformers does with truncate: true (as llama.cpp's converter's does)")


_ARCH_METADATA = {"glm4moe": _glm4moe_metadata, "deepseek2": _deepseek2_metadata, "gpt-oss": _gpt_oss_metadata}


def _write_tokenizer(w, layout, cfg: dict, T) -> None:
    path = Path(layout.path) / "tokenizer.json"
    vocab_size = int(cfg["vocab_size"])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [1] * vocab_size
    merges: list[str] = []
    if path.exists():
        tok = json.loads(path.read_text())
        model = tok.get("model", {})
        for t, i in model.get("vocab", {}).items():
            if i < vocab_size:
                tokens[i] = t
        for a in tok.get("added_tokens", []):
            if a["id"] < vocab_size:
                tokens[a["id"]] = a["content"]
                types[a["id"]] = 3 if a.get("special") else 4
        if model.get("type") == "BPE":
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:  # a byte-level BPE vocabulary (Qwen's, GPT-2's): llama.cpp's "gpt2" model
        w.add_key_value("tokenizer.ggml.model", "gpt2", T.STRING)
        pre = "qwen2" if layout.spec.model_type.startswith("qwen") else \
            "gpt-4o" if layout.spec.model_type == "gpt_oss" else "default"  # (o200k_harmony: GPT-4o's pre-tokenizer)
        w.add_key_value("tokenizer.ggml.pre", pre, T.STRING)
        w.add_key_value("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING)
        w.add_key_value("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)
        w.add_key_value("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)
    else:  # any other vocabulary (the test models' characters) as a SentencePiece-style list: it loads, and ids are
        # ids, but llama.cpp's and transformers' tokenizers of it are not the checkpoint's (pass --tokenizer)
        w.add_key_value("tokenizer.ggml.model", "llama", T.STRING)
        w.add_key_value("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING)
        w.add_key_value("tokenizer.ggml.scores", [0.0] * len(tokens), T.ARRAY, T.FLOAT32)
        w.add_key_value("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)
    for hf, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = cfg.get(hf)
        if isinstance(v, int):
            w.add_key_value(f"tokenizer.ggml.{key}", v, T.UINT32)
