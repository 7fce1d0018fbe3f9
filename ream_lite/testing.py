"""Builders for models that need no download: a character tokenizer and random-weight checkpoints of any shape.

Used by the tests, the offline quickstart and the benchmarks. A synthetic checkpoint is written tensor by tensor
with the streaming writer, in the on-disk names transformers' save_pretrained uses (per-expert keys; Mixtral's
block_sparse_moe names), so a checkpoint with real layer shapes can be far larger than RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ream_lite.arch.families import FAMILIES
from ream_lite.arch.skeleton import causal_lm_skeleton
from ream_lite.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter


def save_char_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """One token per character (printable ASCII + newline); <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz .,0123456789+-=*/()\n:" + "".join(map(chr, range(32, 127))):
        if len(vocab) < vocab_size:
            vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", bos_token="<bos>"
    ).save_pretrained(directory)


def _disk_names(model_type: str, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
    """In-memory parameter -> on-disk tensors (name, shape, part) as save_pretrained writes them."""
    spec = FAMILIES[model_type]
    for memory, disk in spec.disk_renames:  # (Nemotron-H's backbone.*, Kimi-Linear's block_sparse_moe ...)
        name = name.replace(memory, disk)
    if spec.fused_input_major and spec.moe_disk == spec.moe_attr:  # (Llama-4: save_pretrained keeps them fused)
        return [(name, shape, "")]
    if name.endswith(".experts.up_proj") and not spec.gated_experts:  # ungated experts: up [E, I, H]
        prefix = name[: -len(".experts.up_proj")].replace(f".{spec.moe_attr}", f".{spec.moe_disk}", 1)
        n, i, h = shape
        return [(f"{prefix}.experts.{e}.{spec.expert_proj_names[1]}.weight", (i, h), "up") for e in range(n)]
    if name.endswith(".experts.gate_up_proj"):
        prefix = name[: -len(".experts.gate_up_proj")].replace(f".{spec.moe_attr}", f".{spec.moe_disk}", 1)
        n, two_i, h = shape
        g, u, _ = spec.expert_proj_names
        return [(f"{prefix}.experts.{e}.{p}.weight", (two_i // 2, h), part) for e in range(n) for p, part in ((g, "gate"), (u, "up"))]
    if name.endswith(".experts.down_proj"):
        prefix = name[: -len(".experts.down_proj")].replace(f".{spec.moe_attr}", f".{spec.moe_disk}", 1)
        n, h, i = shape
        return [(f"{prefix}.experts.{e}.{spec.expert_proj_names[2]}.weight", (h, i), "down") for e in range(n)]
    if spec.moe_disk != spec.moe_attr:
        name = name.replace(f".{spec.moe_attr}.", f".{spec.moe_disk}.", 1)
    return [(name, shape, "")]


def write_random_checkpoint(
    config, out: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 0.02,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: bool = True, device: str = "cpu",
    fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Random weights for a transformers `config`, written one tensor at a time (memory: one tensor). Drawn
    directly in `dtype` on `device` ("cuda" makes a checkpoint of tens of GB in seconds of drawing). `fp8_block`:
    the layers' Linear weights stored FP8 block-scaled as the FP8 releases store them (`convert_to_fp8`)."""
    with torch.device("meta"):
        skeleton = causal_lm_skeleton(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = Path(out)
    w = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    for name, t in skeleton.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        for disk_name, shape, _ in _disk_names(config.model_type, name, tuple(t.shape)):
            if not t.dtype.is_floating_point:  # a hash-routed layer's [vocab, k] expert ids (DeepSeek-V4)
                value = random_hash_table(shape, FAMILIES[config.model_type].num_experts(config.to_dict()), gen)
            elif "norm" in disk_name:
                value = torch.ones(shape, dtype=dtype)
            elif "e_score_correction_bias" in disk_name:
                value = torch.zeros(shape, dtype=torch.float32)
            else:
                value = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
            if fp8_block is not None and is_fp8_release_weight(FAMILIES[config.model_type], disk_name, len(shape)):
                q, s = fp8_release_encode(value, fp8_block)
                w.add(disk_name, q)
                w.add(disk_name + "_scale_inv", s)
            else:
                w.add(disk_name, value)
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    if fp8_block is not None:
        cfg["quantization_config"] = fp8_quantization_config(fp8_block)
    w.finish(json.loads(json.dumps(cfg, default=str)))
    if tokenizer:
        save_char_tokenizer(out, config.vocab_size)
    return out


def random_hash_table(shape: tuple[int, int], num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """[vocab, k] int64: k distinct random experts for every token id (a hash-routed layer's table)."""
    rows = [torch.rand((min(4096, shape[0] - a), num_experts), generator=gen, device=gen.device).argsort(dim=1)
            [:, : shape[1]].cpu() for a in range(0, shape[0], 4096)]
    return torch.cat(rows)


def fp8_quantization_config(block: tuple[int, int]) -> dict:
    """config.json's quantization_config of an FP8 block-scaled release (as DeepSeek-V3's reads)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def fp8_release_encode(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 as the DeepSeek-V3 / Qwen3-FP8 releases quantize: scale = block amax / 448 (not a power of two), so a
    test can tell bytes copied from the input from bytes encoded by ream-lite (power-of-two scales)."""
    from ream_lite.checkpoint import fp8

    return fp8.encode(w, block, power_of_two=False)


def is_fp8_release_weight(spec, key: str, ndim: int) -> bool:
    """Whether an FP8 release of a model of family `spec` stores `key` in FP8: the Linear weights of decoder layers
    (attention, dense MLPs, routed and shared experts), not norms, routers, embeddings or the head."""
    return (key.startswith(f"{spec.layers_prefix}.") and key.endswith(".weight") and ndim in (2, 3)
            and "norm" not in key and not key.endswith(f".{spec.moe_disk}.{spec.router_weight}")
            and not key.endswith("embed_tokens.weight") and not key.endswith(".head.weight"))


def compressed_tensors_fp8_config() -> dict:
    """quantization_config of an llm-compressor FP8_DYNAMIC checkpoint (per-channel weights, dynamic activations)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
               "block_structure": None}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"]}


def convert_to_fp8(src: str | Path, out: str | Path, block: tuple[int, int] = (128, 128),
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, scheme: str = "block") -> Path:
    """An FP8 copy of checkpoint `src`, as the FP8 releases are: each weight `is_fp8_release_weight` picks written as
    float8_e4m3fn plus its scale, the rest copied; quantization_config added. `scheme` "block": `weight_scale_inv`
    per `block` (DeepSeek-V3, Qwen3-FP8, Kimi-K2); "channel": compressed-tensors' `weight_scale` per output row
    in bf16 (llm-compressor FP8_DYNAMIC). One tensor in memory at a time."""
    from ream_lite.arch.layout import ModelLayout

    layout = ModelLayout(str(src))
    r = layout.reader
    w = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    for k in list(r.keys()):
        shape = r.shape(k)
        if not is_fp8_release_weight(layout.spec, k, len(shape)):
            w.copy_from(r, k)
        elif scheme == "block":
            q, s = fp8_release_encode(r.get(k, dtype=torch.float32), block)
            w.add(k, q)
            w.add(k + "_scale_inv", s)
        else:
            q, s = fp8_release_encode(r.get(k, dtype=torch.float32), (1, shape[-1]))
            w.add(k, q)
            w.add(k + "_scale", s.to(torch.bfloat16))
    cfg = dict(layout.config)
    cfg["quantization_config"] = fp8_quantization_config(block) if scheme == "block" else \
        compressed_tensors_fp8_config()
    result = w.finish(cfg, source_dir=layout.path)
    layout.close()
    return result


def convert_to_nvfp4(src: str | Path, out: str | Path, form: str = "ct", seed: int = 0,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """An NVFP4 copy of checkpoint `src`, as llm-compressor (`form` "ct": compressed-tensors nvfp4-pack-quantized)
    or ModelOpt ("modelopt") release one: the 2-D Linear weights of the decoder layers (`is_fp8_release_weight`'s
    pick) as E2M1 codes with E4M3 block scales under a float32 tensor scale (gate and up of each expert, and q / k /
    v, sharing one, as llm-compressor fuses them for their kernels), an activation scale beside each (random: nothing
    here calibrates activations), the quantization_config added. One tensor in memory at a time (and its partner)."""
    from ream_lite.arch.layout import ModelLayout
    from ream_lite.checkpoint.nvfp4 import encode_nvfp4, global_scale

    fused = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"))
    layout = ModelLayout(str(src))
    r = layout.reader
    w = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    g = torch.Generator().manual_seed(seed)
    for k in list(r.keys()):
        shape = r.shape(k)
        if not is_fp8_release_weight(layout.spec, k, len(shape)) or len(shape) != 2 or shape[1] % 16:
            w.copy_from(r, k)
            continue
        module, proj = k[: -len(".weight")].rsplit(".", 1)
        group = next((f for f in fused if proj in f), (proj,))
        gs = torch.stack([global_scale(r.get(f"{module}.{p}.weight", dtype=torch.float32)) for p in group
                          if f"{module}.{p}.weight" in r]).amin(0)
        codes, scales = encode_nvfp4(r.get(k, dtype=torch.float32), gs, inverted=False)
        act = torch.rand(1, generator=g) * 100 + 50
        name = f"{module}.{proj}"
        if form == "ct":
            parts = {".weight_packed": codes, ".weight_scale": scales, ".weight_global_scale": gs,
                     ".input_global_scale": act}
        else:
            parts = {".weight": codes, ".weight_scale": scales, ".weight_scale_2": (1 / gs).reshape(()),
                     ".input_scale": (1 / act).reshape(())}
        for sfx, t in parts.items():
            w.add(name + sfx, t)
    cfg = dict(layout.config)
    if form == "ct":
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized", "weights": weights,
                                          "input_activations": {**weights, "dynamic": "local"}}},
            "ignore": ["lm_head", f"re:.*{layout.spec.moe_disk}.{layout.spec.router_weight.rsplit('.', 1)[0]}$"]}
    else:
        cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                      "exclude_modules": ["lm_head", f"*{layout.spec.moe_disk}.gate"]}
    result = w.finish(cfg, source_dir=layout.path)
    layout.close()
    return result


def int4_quantization_config(spec, group: int) -> dict:
    """The quantization_config of an INT4 release as the Kimi-K2-Thinking / K2.5 ones state it: compressed-tensors
    pack-quantized, symmetric 4-bit groups of `group`, the routed experts of `spec`'s family as its target."""
    names = "|".join(n for n in spec.expert_proj_names if n is not None)
    experts = f"re:.*{spec.moe_disk}\\.{spec.experts_prefix}\\.\\d+\\.({names})$"
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": [experts], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def convert_to_int4(src: str | Path, out: str | Path, group: int = 32,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """An INT4 copy of checkpoint `src` as the Kimi-K2-Thinking / K2.5 releases store theirs: the routed experts'
    weights compressed-tensors pack-quantized (symmetric, `group` values a bf16 scale, W4A16), everything else as it
    is, the quantization_config (format pack-quantized, the experts as its target) at the top of config.json."""
    from ream_lite.arch.layout import ModelLayout
    from ream_lite.checkpoint.int4_pack import encode_int4

    layout = ModelLayout(str(src))
    r = layout.reader
    experts = {k for x in layout.moe_layers for k in layout.expert_keys(x.index)}
    if any(x.expert_storage != "per_expert" for x in layout.moe_layers):
        raise ValueError("convert_to_int4: per-expert checkpoints only (the releases store their experts so)")
    w = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    for k in list(r.keys()):
        if k not in experts:
            w.copy_from(r, k)
            continue
        codes, scales = encode_int4(r.get(k, dtype=torch.float32), group, torch.bfloat16)
        name = k[: -len(".weight")]
        w.add(name + ".weight_packed", codes)
        w.add(name + ".weight_scale", scales)
        w.add(name + ".weight_shape", torch.tensor(r.shape(k), dtype=torch.int32))
    cfg = layout.wrap_config(dict(layout.config))
    cfg["quantization_config"] = int4_quantization_config(layout.spec, group)
    result = w.finish(cfg, source_dir=layout.path)
    layout.close()
    return result


def write_decoded_copy(src: str | Path, out: str | Path) -> Path:
    """A plain float32 copy of checkpoint `src` holding the values ream-lite's reader decodes, without the
    quantization_config: what transformers loads as an oracle for a quantized input's values."""
    from ream_lite.checkpoint.reader import CheckpointReader, load_config_dict

    r = CheckpointReader(src)
    w = CheckpointWriter(out, overwrite=True)
    for k in r.keys():
        w.add(k, r.get(k, dtype=torch.float32))
    cfg = load_config_dict(src)
    cfg.pop("quantization_config", None)
    r.close()
    return w.finish(cfg, source_dir=src)
