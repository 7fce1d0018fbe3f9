"""Writing a compressed checkpoint: the order of tensors, one layer as a plan says, the edited config.

Shared by `compress` (layer by layer, as each plan is decided), `apply` (plans read from ream_plan.json) and
`compress --from-stats` (plans from saved statistics), so every path writes the same bytes for the same plan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ream_lite.arch.layout import LayerLayout, ModelLayout
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.errors import ReamLiteError
from ream_lite.methods.apply import build_merged_experts
from ream_lite.methods.plan import LayerPlan


def validate_output_path(layout: ModelLayout, output: str) -> None:
    """The input directory is never written: the output must be neither it, inside it, nor around it."""
    out, src = Path(output).resolve(), layout.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ReamLiteError("the output directory must not be the input directory, inside it, or contain it")


def compression_steps(layout: ModelLayout, drop_mtp: bool) -> list[LayerLayout]:
    """The layers in the order they are compressed and written: decoder layers, then MTP layers (unless dropped)."""
    return layout.decoder_layers + ([] if drop_mtp else [x for x in layout.layers if x.is_mtp])


def copy_non_layer_tensors(writer: CheckpointWriter, layout: ModelLayout) -> None:
    """Embeddings, final norm, lm_head, ...: unchanged, copied first (the order every output is written in)."""
    layer_prefix = f"{layout.spec.layers_prefix}."
    for k in layout.reader.keys():
        if not k.startswith(layer_prefix):
            writer.copy_from(layout.reader, k)


def write_layer(writer: CheckpointWriter, layout: ModelLayout, layer: int, plan: LayerPlan | None, merged: dict,
                stored_experts: Callable[[int], tuple[torch.Tensor, ...]] | None = None) -> None:
    """Write one decoder layer: unchanged tensors copied as stored; router rows and experts of the kept experts
    (`stored_experts(e)`: expert e's tensors as stored, already in memory, written instead of read again)."""
    r, spec = layout.reader, layout.spec
    keys = layout.layer_keys(layer)
    if plan is None:
        for k in keys:
            writer.copy_from(r, k)
        return
    kept = plan.kept
    idx = torch.tensor(kept)
    router_keys = {layout.moe_key(layer, spec.router_weight)}
    if spec.router_bias:
        router_keys.add(layout.moe_key(layer, spec.router_bias))
    expert_keys = set(layout.expert_keys(layer))
    for k in keys:
        if k in router_keys:
            writer.add(k, r.get(k)[idx].contiguous())
        elif k not in expert_keys:
            writer.copy_from(r, k)
    info = layout.layers[layer]
    if info.expert_storage == "per_expert":
        for pos, e in enumerate(kept):
            old, new = layout.per_expert_keys(layer, e), layout.per_expert_keys(layer, pos)
            if e in merged:
                for name, o, t in zip(new, old, merged[e]):
                    writer.add(name, t.to(r.entry(o).torch_dtype).cpu())
            elif stored_experts is not None:  # the same bytes, from the layer's expert cache
                for name, t in zip(new, stored_experts(e)):
                    writer.add(name, t)
            else:
                for o, n in zip(old, new):
                    writer.copy_from(r, o, n)
        return
    gu_key, down_key = layout.fused_keys(layer)
    gu_dtype, down_dtype = r.entry(gu_key).torch_dtype, r.entry(down_key).torch_dtype
    gu_out = torch.empty((len(kept), *r.shape(gu_key)[1:]), dtype=gu_dtype)
    down_out = torch.empty((len(kept), *r.shape(down_key)[1:]), dtype=down_dtype)
    for pos, e in enumerate(kept):
        if e in merged:
            g, u, d = merged[e]
            gu_out[pos].copy_(torch.cat([g, u]))
            down_out[pos].copy_(d)
        else:
            gu_out[pos].copy_(r.get(gu_key, rows=(e, e + 1))[0])
            down_out[pos].copy_(r.get(down_key, rows=(e, e + 1))[0])
    writer.add(gu_key, gu_out)
    del gu_out
    writer.add(down_key, down_out)


def output_config(layout: ModelLayout, n_keep: int, drop_mtp: bool) -> dict:
    out = dict(layout.config)
    for key in layout.spec.num_experts_keys:
        if key in out:
            out[key] = n_keep
    if drop_mtp and layout.spec.mtp_layers_key:
        out[layout.spec.mtp_layers_key] = 0
    return out


def write_planned(
    layout: ModelLayout, plans: dict[int, LayerPlan], n_keep: int, drop_mtp: bool, writer: CheckpointWriter,
    device: torch.device, progress: bool, side_files: Callable[[Path], None],
) -> Path:
    """A whole compressed checkpoint from decided plans (MoE layer index -> plan): merged experts from the weights
    alone (the plans carry their alignments), written in compress's order; `side_files(dir)` adds the plan,
    report and card before the output is moved into place."""
    try:
        copy_non_layer_tensors(writer, layout)
        for info in tqdm(compression_steps(layout, drop_mtp), desc="write", disable=not progress):
            plan = plans.get(info.index)
            merged = build_merged_experts(layout, plan, None, device) if plan is not None else {}
            write_layer(writer, layout, info.index, plan, merged)
        side_files(writer.tmp_dir)
        return writer.finish(output_config(layout, n_keep, drop_mtp), source_dir=layout.path)
    except BaseException:
        writer.abort()
        raise
