"""Saved layer statistics (`compress --save-stats DIR`), so plans at other ratios need no new calibration pass.

DIR holds `stats.json` (what the statistics were collected from and how) and one `layer-NNNNN.safetensors` per MoE
layer with the accumulators of `LayerStats` (counts, REAP / EAN sums, logit Gram, dense output sums). They are
reusable (`compress --from-stats DIR`) when they describe the original model at every layer, i.e. were collected
with `--no-sequential`: sequential statistics depend on how the earlier layers were compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ream_lite.errors import ReamLiteError
from ream_lite.methods.stats import LayerStats

INFO_NAME = "stats.json"
TENSOR_FIELDS = ("count", "reap_sum", "reap2_sum", "ean_sum", "logit_gram", "gated_out_sum", "out_sum")


def layer_file(directory: Path, layer: int) -> Path:
    return Path(directory) / f"layer-{layer:05d}.safetensors"


def save_layer_stats(directory: str | Path, stats: LayerStats) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f: getattr(stats, f).contiguous() for f in TENSOR_FIELDS if getattr(stats, f) is not None}
    meta = {"layer": str(stats.layer), "num_experts": str(stats.num_experts), "tokens": str(stats.tokens)}
    tmp = layer_file(d, stats.layer).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(layer_file(d, stats.layer))


def load_layer_stats(directory: str | Path, layer: int, num_experts: int) -> LayerStats:
    path = layer_file(Path(directory), layer)
    if not path.exists():
        raise ReamLiteError(f"{directory}: no statistics for layer {layer} ({path.name})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    if t["count"].shape[0] != num_experts:
        raise ReamLiteError(f"{path}: statistics of {t['count'].shape[0]} experts, the model has {num_experts}")
    return LayerStats(layer, num_experts, int(meta["tokens"]), *(t.get(f) for f in TENSOR_FIELDS))


def write_stats_info(directory: str | Path, info: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / INFO_NAME).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_stats_info(directory: str | Path) -> dict:
    p = Path(directory) / INFO_NAME
    if not p.exists():
        raise ReamLiteError(f"{directory}: not a statistics directory (no {INFO_NAME}); write one with --save-stats")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise ReamLiteError(f"{p}: corrupt statistics record") from None


def check_reusable(info: dict, inputs: dict, saliency_gate: str, needs_dense: bool, needs_gram: bool) -> None:
    """Refuse statistics that cannot stand for this run: other model, sequential, other gate, missing fields."""
    if info.get("inputs") != inputs:
        raise ReamLiteError("the statistics were collected on another model (or the model changed)")
    if info.get("sequential", True):
        raise ReamLiteError("the statistics were collected sequentially (they depend on how earlier layers were "
                            "compressed); collect reusable ones with --no-sequential --save-stats")
    gate = {"twice": "model"}.get(saliency_gate, saliency_gate)
    if info.get("saliency_gate") != gate:
        raise ReamLiteError(f"the statistics' REAP gate is '{info.get('saliency_gate')}', this run asks for "
                            f"'{saliency_gate}'")
    if needs_dense and not info.get("dense"):
        raise ReamLiteError("this method needs every expert's output statistics; collect them with a merging method "
                            "(--method ream / hc-smoe) and --save-stats")
    if needs_gram and not info.get("gram"):
        raise ReamLiteError("this method needs the router-logit Gram; the saved statistics lack it")
