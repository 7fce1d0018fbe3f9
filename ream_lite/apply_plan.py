"""`ream-lite apply PLAN MODEL OUT`: re-apply a recorded compression (ream_plan.json) without calibrating again.

The plan holds, per MoE layer, the kept experts, each merged group with its weights, and the neuron permutation
of every merged member, so the merged experts are recomputed from the weights alone, by the same code path
`compress` uses: on the same device type the output is byte for byte the one `compress` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint import files
from ream_lite.checkpoint.lock import OutputLock
from ream_lite.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES
from ream_lite.errors import ReamLiteError
from ream_lite.methods.plan import LayerPlan
from ream_lite.report import PLAN_NAME, dumps
from ream_lite.write_output import (
    compression_steps,
    make_output_format,
    open_writer,
    record_of,
    refit_used,
    validate_output_path,
    write_planned,
)


def read_plan(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / PLAN_NAME
    try:
        plan = json.loads(p.read_text())
        plan["layers"], plan["experts"]["after"]  # noqa: B018  (the keys apply needs)
    except FileNotFoundError:
        raise ReamLiteError(f"{path}: no such plan (expected a ream_plan.json or a directory holding one)") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise ReamLiteError(f"{p}: not a ream-lite plan (ream_plan.json)") from None
    return plan


def layer_plans(plan: dict, layout: ModelLayout) -> dict[int, LayerPlan]:
    """The plan's layers, checked against MODEL: the same MoE layers, expert counts, expert ids and neuron counts."""
    drop_mtp = bool(plan.get("drop_mtp", False))
    try:
        plans = {int(L["layer"]): LayerPlan.from_json(L) for L in plan["layers"]}
    except (KeyError, ValueError, TypeError) as e:
        raise ReamLiteError(f"malformed layer in the plan ({e})") from None
    moe = [x for x in compression_steps(layout, drop_mtp) if x.is_moe]
    if sorted(plans) != [x.index for x in moe]:
        raise ReamLiteError(f"the plan covers MoE layers {sorted(plans)}, the model has {[x.index for x in moe]}; "
                            "was it made for another model?")
    after = int(plan["experts"]["after"])
    for x in moe:
        p = plans[x.index]
        if p.num_experts != x.num_experts:
            raise ReamLiteError(f"layer {x.index}: the plan is for {p.num_experts} experts, the model has "
                                f"{x.num_experts}")
        members = [e for g in p.groups.values() for e in g]
        if len(p.kept) != after or not all(0 <= e < x.num_experts for e in members):
            raise ReamLiteError(f"layer {x.index}: malformed plan (keeps {len(p.kept)} of {after} experts, or names "
                                f"an expert beyond {x.num_experts - 1})")
        inter = expert_intermediate_size(layout, x.index)
        for c, g in p.merged_groups().items():
            for m in g[1:]:
                perm = p.perms.get((c, m))
                if p.align != "none" and perm is None:
                    raise ReamLiteError(f"layer {x.index}: the plan lacks the alignment of expert {m} onto {c} "
                                        "(written by an older ream-lite?); compress again")
                if perm is not None and sorted(perm.tolist()) != list(range(inter)):
                    raise ReamLiteError(f"layer {x.index}: the plan's permutation of expert {m} is not one of the "
                                        f"model's {inter} expert neurons; was it made for another model?")
    return plans


def expert_intermediate_size(layout: ModelLayout, layer: int) -> int:
    """Neurons per routed expert, from the stored tensors (gate rows; the fused gate_up holds gate and up)."""
    if layout.layers[layer].expert_storage == "fused":
        from ream_lite.arch import fused

        key = layout.fused_keys(layer)[0]
        return fused.gate_up_dims(layout.spec, layout.fused_slab_shape(layer, key))[0]
    return layout.reader.shape(layout.per_expert_keys(layer, 0)[0])[0]


def apply_plan(plan_path: str, model: str, output: str, overwrite: bool = False, device: str = "cpu",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
               trust_remote_code: bool = False) -> Path:
    plan = read_plan(plan_path)
    layout = ModelLayout(model, trust_remote_code=trust_remote_code)
    try:
        layout.require_decodable()
        validate_output_path(layout, output)
        if plan["experts"]["before"] != layout.router_config.num_experts:
            raise ReamLiteError(f"the plan compresses {plan['experts']['before']} experts per layer, the model has "
                                f"{layout.router_config.num_experts}")
        plans = layer_plans(plan, layout)
        # the output format compress wrote (ream_plan.json "output"), so that apply writes the same bytes
        fmt = plan.get("output") or {}
        n_keep = int(plan["experts"]["after"])
        output_format = make_output_format(layout, n_keep, fmt.get("out_dtype", "stored"), fmt.get("quantize"),
                                           bool(fmt.get("double_quant", False)),
                                           fmt.get("gguf_type") if fmt.get("out_format") == "gguf" else None)
        with OutputLock(output, "ream-lite apply"):  # (one run per output, as compress)
            writer = open_writer(layout, output, n_keep, output_format, max_shard_bytes=max_shard_bytes,
                                 overwrite=overwrite, record=record_of(str(plan.get("method", "")),
                                                                       str(plan.get("guard", "")), layout, n_keep))

            def side_files(d: Path) -> None:
                files.write_file(d / PLAN_NAME, dumps(plan), PLAN_NAME)

            source = refit_source(plan_path, plans, trust_remote_code)
            try:
                return write_planned(layout, plans, int(plan["experts"]["after"]), bool(plan.get("drop_mtp", False)),
                                     writer, torch.device(device), progress, side_files, source)
            finally:
                if source is not None:
                    source.close()
    finally:
        layout.close()


def refit_source(plan_path: str, plans: dict[int, LayerPlan], trust_remote_code: bool) -> ModelLayout | None:
    """The compressed output the plan was read from, when its layers were refit (their fitted experts are copied
    from it); None when nothing was refit."""
    if not any(refit_used(p) for p in plans.values()):
        return None
    d = Path(plan_path)
    d = d if d.is_dir() else d.parent
    if not (d / "config.json").exists() and len(list(d.glob("*.gguf"))) == 1:  # a GGUF output: its one file
        d = next(d.glob("*.gguf"))
    try:
        return ModelLayout(str(d), trust_remote_code=trust_remote_code)
    except ReamLiteError as e:
        raise ReamLiteError(f"the plan refit experts to calibration tokens; apply copies them from the compressed "
                            f"output the plan belongs to, but {d} is not one ({e})") from None
