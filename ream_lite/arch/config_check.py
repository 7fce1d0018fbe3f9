"""config.json checked before anything is built from it: counts are whole numbers in range, and agree with the
tensors the checkpoint really holds.

A config.json from a stranger can say anything: `num_hidden_layers: 1e30` would have ream-lite loop (and
allocate) for ever, a negative count crashes deep inside transformers, a hidden size that disagrees with the
embedding crashes at the first matrix product, hours of reading later on a big model. Each is refused here in one
line that names the key, before any work.
"""

from __future__ import annotations

import re

from ream_lite.arch.spec import ArchSpec
from ream_lite.errors import ReamLiteError

# integer counts ream-lite or transformers build modules from: key -> the least valid value (0: may be absent as 0)
COUNTS = {
    "num_hidden_layers": 1, "hidden_size": 1, "vocab_size": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "shared_expert_intermediate_size": 0, "max_position_embeddings": 1, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 0, "first_k_dense_replace": 0, "decoder_sparse_step": 1, "num_nextn_predict_layers": 0,
    "mtp_num_hidden_layers": 0, "kv_lora_rank": 1, "q_lora_rank": 1, "qk_rope_head_dim": 1, "qk_nope_head_dim": 1,
    "v_head_dim": 1, "moe_topk": 1, "num_local_experts": 1, "num_experts": 1, "n_routed_experts": 1,
    "num_experts_per_tok": 1,
}
REQUIRED = ("num_hidden_layers", "hidden_size", "vocab_size")


def check_config(config: dict, spec: ArchSpec, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse (ReamLiteError, one line) a config whose counts are not whole numbers in range or disagree with the
    checkpoint's tensors (`shapes`: key -> logical shape)."""
    minimum = dict(COUNTS)
    minimum[spec.num_layers_key] = 1
    minimum.update({k: 1 for k in spec.num_experts_keys})
    minimum[spec.top_k_key] = 1
    if spec.moe_intermediate_key:
        minimum[spec.moe_intermediate_key] = 1
    if spec.mtp_layers_key:
        minimum[spec.mtp_layers_key] = 0
    for key in (spec.num_layers_key, *REQUIRED[1:]):
        if config.get(key) is None:
            raise ReamLiteError(f"{where}: config.json lacks {key}")
    if not any(config.get(k) is not None for k in spec.num_experts_keys):
        raise ReamLiteError(f"{where}: config.json lacks the expert count ({' or '.join(spec.num_experts_keys)})")
    if config.get(spec.top_k_key) is None:
        raise ReamLiteError(f"{where}: config.json lacks {spec.top_k_key}")
    per_layer = {*spec.num_experts_keys, spec.top_k_key}  # (may be one value per layer: spec._uniform)
    for key, least in minimum.items():
        if key in config and config[key] is not None:
            _check_count(config[key], key, least, where, key in per_layer)
    _check_against_tensors(config, spec, shapes, where)


def _check_count(value, key: str, least: int, where: str, listed: bool) -> None:
    values = value if isinstance(value, list) and listed and value else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            shown = repr(v) if not isinstance(value, list) else f"{v!r} in {key}'s list"
            raise ReamLiteError(f"{where}: config.json {key} is {shown}; expected a whole number >= {least}")


def _check_against_tensors(config: dict, spec: ArchSpec, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    embed = shapes.get(spec.embed_key)
    if embed is not None and len(embed) == 2:
        if config["hidden_size"] != embed[1]:
            raise ReamLiteError(f"{where}: config.json hidden_size is {config['hidden_size']}, the embedding "
                                f"({spec.embed_key}) has {embed[1]} columns")
        if config["vocab_size"] != embed[0]:
            raise ReamLiteError(f"{where}: config.json vocab_size is {config['vocab_size']}, the embedding "
                                f"({spec.embed_key}) has {embed[0]} rows")
    pattern = re.compile(re.escape(spec.layers_prefix) + r"\.(\d+)\.")
    present = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    n = config[spec.num_layers_key]
    missing = next((i for i in range(min(n, len(present) + 1)) if i not in present), None)
    if n > len(present) or missing is not None:
        raise ReamLiteError(f"{where}: config.json {spec.num_layers_key} is {n}, the checkpoint holds "
                            f"{len(present)} numbered layers" + (f" (layer {missing} is missing)"
                                                                 if missing is not None and missing < n else ""))
