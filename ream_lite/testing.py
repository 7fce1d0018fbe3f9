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
) -> Path:
    """Random weights for a transformers `config`, written one tensor at a time (memory: one tensor). Drawn
    directly in `dtype` on `device` ("cuda" makes a checkpoint of tens of GB in seconds of drawing)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = Path(out)
    w = CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    for name, t in skeleton.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        for disk_name, shape, _ in _disk_names(config.model_type, name, tuple(t.shape)):
            if "norm" in disk_name:
                value = torch.ones(shape, dtype=dtype)
            elif "e_score_correction_bias" in disk_name:
                value = torch.zeros(shape, dtype=torch.float32)
            else:
                value = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
            w.add(disk_name, value)
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    w.finish(json.loads(json.dumps(cfg, default=str)))
    if tokenizer:
        save_char_tokenizer(out, config.vocab_size)
    return out
