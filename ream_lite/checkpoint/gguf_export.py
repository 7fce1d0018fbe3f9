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

from ream_lite.arch.gguf_names import ARCHES, GLOBAL_TENSORS, GGUFArch, rope_unpermute
from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)

F32, F16 = 0, 1


def arch_for(model_type: str) -> GGUFArch:
    for a in ARCHES.values():
        if a.model_type == model_type:
            return a
    names = ", ".join(sorted(a.model_type for a in ARCHES.values()))
    raise ReamLiteError(f"model_type '{model_type}' has no GGUF mapping in ream-lite yet; GGUF output supports {names}")


def gguf_tensor_plan(layout, arch: GGUFArch) -> list[tuple[str, list[str], tuple[int, ...]]]:
    """(GGUF name, the transformers tensors it holds (one per expert for fused experts), torch shape)."""
    inverse_global = {v: k for k, v in GLOBAL_TENSORS.items()}
    inverse_layer = {v: k for k, v in arch.layer_tensors.items()}
    r = layout.reader
    out = []
    for k in r.keys():
        if k in inverse_global:
            out.append((inverse_global[k], [k], r.shape(k)))
    for x in layout.layers:
        prefix = f"model.layers.{x.index}."
        for k in layout.layer_keys(x.index):
            rel = k[len(prefix):]
            if rel in inverse_layer:
                out.append((f"blk.{x.index}.{inverse_layer[rel]}", [k], r.shape(k)))
            elif k not in set(layout.expert_keys(x.index)):
                raise ReamLiteError(f"{k}: no llama.cpp name for this tensor of a {arch.model_type} model")
        if x.is_moe:
            if x.expert_storage != "per_expert":
                raise ReamLiteError(f"layer {x.index}: fused expert tensors cannot be written as GGUF yet")
            for gname, template in arch.expert_tensors.items():
                names = [prefix + template.format(e=e) for e in range(x.num_experts)]
                out.append((f"blk.{x.index}.{gname}", names, (x.num_experts, *r.shape(names[0]))))
    return out


def choose_type(gname: str, shape: tuple[int, ...], expert_type: int, other_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2 or gname.endswith(".bias") or "norm" in gname or gname.endswith("ffn_gate_inp.weight") or \
            gname.endswith("ffn_gate_inp_shexp.weight"):
        return F32
    want = expert_type if "_exps." in gname else other_type
    block = GGML_QUANT_SIZES[GGMLQuantizationType(want)][0]
    return want if shape[-1] % block == 0 else F16


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, expert_type: int = 8, other_type: int = F16,
                progress: bool = False) -> Path:
    """Write the checkpoint directory `src` as the GGUF file `out` (types: GGMLQuantizationType values; 8 = Q8_0)."""
    from gguf import GGUFValueType, GGUFWriter

    from ream_lite.arch.layout import ModelLayout
    from ream_lite.checkpoint.ggml_blocks import encode

    layout = ModelLayout(str(src))
    try:
        arch = arch_for(layout.spec.model_type)
        plan = gguf_tensor_plan(layout, arch)
        out = Path(out)
        w = GGUFWriter(out, arch.arch)
        _write_metadata(w, layout, arch, GGUFValueType)
        types = [choose_type(g, s, expert_type, other_type) for g, _, s in plan]
        from ream_lite.checkpoint.gguf_writer import nbytes_of

        for (gname, _, shape), qtype in zip(plan, types):
            w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes_of(qtype, tuple(reversed(shape))), qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        cfg = layout.config
        heads = {"self_attn.q_proj.weight": cfg.get("num_attention_heads"),
                 "self_attn.k_proj.weight": cfg.get("num_key_value_heads")}
        for (gname, names, shape), qtype in tqdm(list(zip(plan, types)), desc="gguf", disable=not progress):
            x = torch.stack([layout.reader.get(n, dtype=torch.float32) for n in names]) if len(names) > 1 else \
                layout.reader.get(names[0], dtype=torch.float32)
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


def _write_metadata(w, layout, arch: GGUFArch, T) -> None:
    cfg = {**layout.hf_config().to_dict(), **layout.config}
    w.add_string("general.name", Path(layout.path).name)
    floats = {"attention.layer_norm_rms_epsilon"}
    rc = layout.router_config
    for key, hf in arch.config_keys.items():
        v = {"expert_count": rc.num_experts, "expert_used_count": rc.top_k}.get(key, cfg.get(hf))
        if v is None or isinstance(v, (list, dict)):
            continue
        w.add_key_value(f"{arch.arch}.{key}", float(v) if key in floats else int(v),
                        T.FLOAT32 if key in floats else T.UINT32)
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        w.add_key_value(f"{arch.arch}.rope.freq_base", float(theta), T.FLOAT32)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_value(f"{arch.arch}.rope.dimension_count", int(head_dim), T.UINT32)
    w.add_key_value(f"{arch.arch}.attention.value_length", int(head_dim), T.UINT32)
    w.add_key_value("general.file_type", 1, T.UINT32)
    _write_tokenizer(w, layout, cfg, T)


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
    w.add_key_value("tokenizer.ggml.model", "gpt2", T.STRING)
    w.add_key_value("tokenizer.ggml.pre", "qwen2" if layout.spec.model_type.startswith("qwen") else "default",
                    T.STRING)
    w.add_key_value("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING)
    w.add_key_value("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)
    if merges:
        w.add_key_value("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)
    for hf, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = cfg.get(hf)
        if isinstance(v, int):
            w.add_key_value(f"tokenizer.ggml.{key}", v, T.UINT32)
