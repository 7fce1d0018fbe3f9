"""Saved layer statistics (`compress --save-stats DIR`), so plans at other ratios need no new calibration pass.

DIR holds `stats.json` (what the statistics were collected from and how) and one `layer-NNNNN.safetensors` per MoE
layer with the accumulators of `LayerStats` (counts, REAP / EAN sums, logit Gram, dense output sums). They are
reusable (`compress --from-stats DIR`) when they describe the original model at every layer, i.e. were collected
with `--no-sequential`: sequential statistics depend on how the earlier layers were compressed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ream_lite.errors import ReamLiteError
from ream_lite.methods.stats import LayerStats, collected_gate

INFO_NAME = "stats.json"
TENSOR_FIELDS = ("count", "reap_sum", "reap2_sum", "ean_sum", "logit_gram", "gated_out_sum", "out_sum")


def layer_file(directory: Path, layer: int) -> Path:
    return Path(directory) / f"layer-{layer:05d}.safetensors"


def save_layer_stats(directory: str | Path, stats: LayerStats, run_id: str) -> None:
    """One layer's accumulators, stamped with the run that collected them (see `start_stats_dir`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f: getattr(stats, f).contiguous() for f in TENSOR_FIELDS if getattr(stats, f) is not None}
    meta = {"layer": str(stats.layer), "num_experts": str(stats.num_experts), "tokens": str(stats.tokens),
            "run": run_id}
    tmp = layer_file(d, stats.layer).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(layer_file(d, stats.layer))


def load_layer_stats(directory: str | Path, layer: int, num_experts: int, run_id: str) -> LayerStats:
    path = layer_file(Path(directory), layer)
    if not path.exists():
        raise ReamLiteError(f"{directory}: no statistics for layer {layer} ({path.name}); was the run that saved "
                            "them interrupted?")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not safetensors
        raise ReamLiteError(f"{path}: unreadable statistics ({type(e).__name__}); save them again") from None
    if meta.get("run") != run_id:
        raise ReamLiteError(f"{path}: statistics of another run than {INFO_NAME} describes; save them again into an "
                            "empty directory")
    if t["count"].shape[0] != num_experts:
        raise ReamLiteError(f"{path}: statistics of {t['count'].shape[0]} experts, the model has {num_experts}")
    return LayerStats(layer, num_experts, int(meta["tokens"]), *(t.get(f) for f in TENSOR_FIELDS))


def start_stats_dir(directory: str | Path, info: dict, resume: bool) -> str:
    """Write `stats.json` for this run and return the run id every layer file is stamped with. A fresh run clears
    the layer files of any earlier run there (a directory mixing two runs' layers must never be re-planned from);
    a resumed run keeps them: its id is the same."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    if not resume:
        for p in d.glob("layer-*.safetensors"):
            p.unlink()
    (d / INFO_NAME).write_text(json.dumps({**info, "run": run_id}, indent=1, sort_keys=True) + "\n")
    return run_id


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
    # (statistics saved before the fingerprint sampled shard contents lack those samples: compared without them)
    older = {**inputs, "shards": {n: {k: v for k, v in rec.items() if k != "content_sample"}
                                  for n, rec in inputs.get("shards", {}).items()}}
    if info.get("inputs") not in (inputs, older):
        raise ReamLiteError("the statistics were collected on another model (or the model changed)")
    if info.get("sequential", True):
        raise ReamLiteError("the statistics were collected sequentially (they depend on how earlier layers were "
                            "compressed); collect reusable ones with --no-sequential --save-stats")
    gate = collected_gate(saliency_gate)
    if info.get("saliency_gate") != gate:
        raise ReamLiteError(f"the statistics' REAP gate is '{info.get('saliency_gate')}', this run asks for "
                            f"'{saliency_gate}'")
    if needs_dense and not info.get("dense"):
        raise ReamLiteError("this method needs every expert's output statistics; collect them with a merging method "
                            "(--method ream / hc-smoe) and --save-stats")
    if needs_gram and not info.get("gram"):
        raise ReamLiteError("this method needs the router-logit Gram; the saved statistics lack it")
