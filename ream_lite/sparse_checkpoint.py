"""Checkpoints of any size that take no disk space: real safetensors headers over sparse (all-zero) data.

For what reads headers only — `ream-lite inspect`, `ream-lite plan`, their tests — at the size of released models
(a 61-layer DeepSeek-V3 has 1.3 TB of weights). Names, shapes and dtypes are those `testing.write_random_checkpoint`
writes; every tensor reads as zeros, so such a checkpoint is not for running.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ream_lite.arch.families import FAMILIES
from ream_lite.arch.skeleton import causal_lm_skeleton
from ream_lite.checkpoint.format import DTYPE_NAMES, encode_header
from ream_lite.checkpoint.fp8 import scale_shape
from ream_lite.checkpoint.reader import SINGLE_NAME
from ream_lite.testing import _disk_names, fp8_quantization_config, int4_quantization_config, is_fp8_release_weight


def write_sparse_checkpoint(config, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                            fp8_block: tuple[int, int] | None = None, model_type: str | None = None,
                            mxfp4: bool = False, int4_group: int | None = None) -> Path:
    """One sparse `model.safetensors` + config.json for a transformers `config` (no tokenizer). `fp8_block`: as an
    FP8 block-scaled release (DeepSeek-V3, Kimi-K2): Linear weights of the layers in float8_e4m3fn with float32
    `weight_scale_inv` blocks, and the quantization_config. `model_type`: the name config.json gives (an alias
    such as kimi_k2). `mxfp4`: the fused routed experts as gpt-oss releases them (`*_blocks` + `*_scales`, the
    transpose of the [E, in, out] tensor in blocks of 32 along `in`). `int4_group`: the routed experts
    compressed-tensors pack-quantized INT4 as the Kimi-K2-Thinking / K2.5 releases store them (`weight_packed`
    int32 [out, in/8], bf16 `weight_scale` [out, in/group], `weight_shape`)."""
    with torch.device("meta"):
        skeleton = causal_lm_skeleton(config)
    entries, offset = {}, 0
    for name, t in skeleton.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        for disk_name, shape, part in _disk_names(config.model_type, name, tuple(t.shape)):
            # as write_random_checkpoint: DeepSeek-style selection biases stay float32
            d = torch.float32 if "e_score_correction_bias" in disk_name else dtype
            d = d if t.dtype.is_floating_point else t.dtype  # (a hash-routed layer's int64 table)
            parts = [(disk_name, d, shape)]
            if mxfp4 and disk_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                e, k, n = shape  # [E, in, out]
                parts = [(disk_name + "_blocks", torch.uint8, (e, n, k // 32, 16)),
                         (disk_name + "_scales", torch.uint8, (e, n, k // 32))]
            elif int4_group is not None and part in ("gate", "up", "down"):
                base = disk_name[: -len(".weight")]
                parts = [(base + ".weight_packed", torch.int32, (shape[0], shape[1] // 8)),
                         (base + ".weight_scale", torch.bfloat16, (shape[0], shape[1] // int4_group)),
                         (base + ".weight_shape", torch.int32, (2,))]
            elif fp8_block is not None and is_fp8_release_weight(FAMILIES[config.model_type], disk_name, len(shape)):
                parts = [(disk_name, torch.float8_e4m3fn, shape),
                         (disk_name + "_scale_inv", torch.float32, scale_shape(shape, fp8_block))]
            for key, d, shp in parts:
                nbytes = d.itemsize * int(torch.Size(shp).numel())
                entries[key] = {"dtype": DTYPE_NAMES[d], "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = encode_header(entries, {"format": "pt"})
    with open(out / SINGLE_NAME, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.truncate(8 + len(header) + offset)  # a hole: no blocks are allocated for the data
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    if fp8_block is not None:
        cfg["quantization_config"] = fp8_quantization_config(fp8_block)
    if mxfp4:
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if int4_group is not None:
        cfg["quantization_config"] = int4_quantization_config(FAMILIES[config.model_type], int4_group)
    if model_type is not None:
        cfg["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out
