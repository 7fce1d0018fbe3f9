"""Writing a compressed checkpoint: the order of tensors, one layer as a plan says, the edited config.

Shared by `compress` (layer by layer, as each plan is decided), `apply` (plans read from ream_plan.json) and
`compress --from-stats` (plans from saved statistics), so every path writes the same bytes for the same plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ream_lite.arch import fused
from ream_lite.arch.layout import LayerLayout, ModelLayout
from ream_lite.checkpoint import stored
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.engine.hash_routing import remap_table, similarity_order
from ream_lite.engine.streamer import checkpoint_dtype
from ream_lite.errors import ReamLiteError
from ream_lite.methods.apply import build_merged_experts
from ream_lite.methods.plan import LayerPlan

log = logging.getLogger(__name__)


def validate_output_path(layout: ModelLayout, output: str) -> None:
    """The input directory is never written: the output must be neither it, inside it, nor around it."""
    out, src = Path(output).resolve(), layout.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ReamLiteError("the output directory must not be the input directory, inside it, or contain it")


def compression_steps(layout: ModelLayout, drop_mtp: bool) -> list[LayerLayout]:
    """The layers in the order they are compressed and written: decoder layers, then MTP layers (unless dropped)."""
    return layout.decoder_layers + ([] if drop_mtp else [x for x in layout.layers if x.is_mtp])


def copy_non_layer_tensors(writer: CheckpointWriter, layout: ModelLayout, drop_mtp: bool = False) -> None:
    """Embeddings, final norm, lm_head, ...: unchanged, copied first (the order every output is written in)."""
    dropped = dropped_mtp_keys(layout, drop_mtp)
    if dropped and not drop_mtp:
        log.warning("%s: leaving out the %d tensors of the checkpoint's MTP block (%s*): its layers were not found, "
                    "and unchanged it would not match the new expert count; the output sets %s = 0",
                    layout.path, len(dropped), layout.spec.detached_mtp_prefix, layout.spec.detached_mtp_key)
    for k in non_layer_keys(layout, drop_mtp):
        writer.copy_from(layout.reader, k)


def non_layer_keys(layout: ModelLayout, drop_mtp: bool) -> list[str]:
    """The tensors outside every layer, written unchanged: embeddings, final norm, lm_head, and the parts of an MTP
    block kept apart from its layer (Qwen3-Next's mtp.fc, mtp.pre_fc_norm_*, mtp.norm) unless it is dropped."""
    spec = layout.spec
    prefixes = (f"{spec.layers_prefix}.", *((f"{spec.mtp_layers_prefix}.",) if spec.mtp_layers_prefix else ()))
    dropped = dropped_mtp_keys(layout, drop_mtp)
    return [k for k in layout.reader.keys() if not k.startswith(prefixes) and k not in dropped]


def dropped_mtp_keys(layout: ModelLayout, drop_mtp: bool) -> set[str]:
    """Keys of an MTP block stored outside the decoder layers (ArchSpec.detached_mtp_prefix) that are not written:
    all of them with --drop-mtp, or when its layers are not there to compress (config says none)."""
    prefix = layout.spec.detached_mtp_prefix
    if not prefix or not (drop_mtp or not any(x.is_mtp for x in layout.layers)):
        return set()
    return {k for k in layout.reader.keys() if k.startswith(prefix)}


def write_layer(writer: CheckpointWriter, layout: ModelLayout, layer: int, plan: LayerPlan | None, merged: dict,
                stored_experts: Callable[[int], list[dict[str, torch.Tensor]]] | None = None) -> None:
    """Write one decoder layer: unchanged tensors copied as stored; router rows and experts of the kept experts
    (`stored_experts(e)`: expert e's tensors as stored, each as its parts by suffix, already in memory, written
    instead of read again)."""
    _write_layer(writer, layout, layer, plan, merged, stored_experts)
    writer.output.layer_written()


def _write_layer(writer, layout, layer, plan, merged, stored_experts) -> None:
    r, spec = layout.reader, layout.spec
    keys = layout.layer_keys(layer)
    if plan is None:
        for k in keys:
            writer.copy_from(r, k)
        return
    kept = plan.kept
    idx = torch.tensor(layout.router_rows(layer, kept))  # (and the zero-computation experts' rows, LongCat-Flash)
    router_keys = {layout.moe_key(layer, spec.router_weight)}
    if spec.router_bias:
        router_keys.add(layout.moe_key(layer, spec.router_bias))
    expert_keys = set(layout.expert_keys(layer))
    table_key = layout.moe_key(layer, spec.hash_table) if layout.hash_routed(layer) else None
    for k in keys:
        if k == table_key:  # a hash-routed layer's [vocab, k] expert ids, remapped onto the kept experts
            order = similarity_order(r.get(layout.moe_key(layer, spec.router_weight), dtype=torch.float64))
            writer.add(k, remap_table(r.get(k), order, kept).contiguous())  # (integers: in their own dtype, always)
        elif k in router_keys:  # (an encoded router is decoded, sliced and encoded again)
            t = r.get(k)
            # the router weight is [E, H]; a selection bias has the experts on its last axis ([E], Ernie-4.5 [1, E])
            t = t[idx] if k == layout.moe_key(layer, spec.router_weight) else t[..., idx]
            writer.add_like(k, t.contiguous(), r.entry(k))
        elif k not in expert_keys:
            writer.copy_from(r, k)
    info = layout.layers[layer]
    if info.expert_storage == "per_expert":
        for pos, e in enumerate(kept):
            old, new = layout.per_expert_keys(layer, e), layout.per_expert_keys(layer, pos)
            if e in merged:
                for name, o, t in zip(new, old, layout.stored_parts(merged[e])):
                    writer.add_like(name, t, r.entry(o))
            elif stored_experts is not None:  # the stored bytes, from the layer's expert cache: not read again
                for name, o, parts in zip(new, old, stored_experts(e)):
                    like = r.entry(o)
                    if writer.output.keeps_stored(name, like):
                        for sfx, t in parts.items():
                            writer.add(like.part_name(sfx, name), t)
                    else:  # (--out-dtype, --quantize: decoded from those bytes, then written as asked)
                        writer.add_like(name, stored.decode(like, {k: t.cpu() for k, t in parts.items()}, None), like)
            else:
                for o, n in zip(old, new):
                    writer.copy_from(r, o, n)
        return
    # gate_up, down (and the biases) re-packed as the family stores them: orientation, gate/up arrangement
    # (arch/fused.py); one fused tensor at a time, the next built only after this one is written
    for n, key in enumerate([*layout.fused_keys(layer), *layout.fused_bias_keys(layer)]):
        _write_fused(writer, r, key, kept, {e: fused.stored_slab(spec, merged[e], n) for e in kept if e in merged},
                     layout.fused_rows(layer, key))


def _write_fused(writer: CheckpointWriter, r, key: str, kept: list[int], merged: dict[int, torch.Tensor],
                 rows: int = 1) -> None:
    """A fused [E, ...] expert tensor of the kept experts (flattened [E * rows, ...] where `rows` > 1, DBRX): kept
    ones as stored (row copies of every stored part), merged ones (`merged`: expert -> its slab of values) encoded as
    the output format says."""
    like = r.entry(key)
    if not writer.output.keeps_stored(key, like):  # decoded or re-encoded output: build the values, encode once
        # (in the dtype it is written in: float32 values of a gpt-oss-120b layer's gate_up would take 8.5 GB)
        fmt = writer.output
        dtype = (fmt.decode_to or fmt.compute_dtype) if like.is_encoded else like.torch_dtype
        values = torch.empty((len(kept) * rows, *like.shape[1:]), dtype=dtype)
        for pos, e in enumerate(kept):
            slab = merged[e] if e in merged else r.get(key, rows=(e * rows, (e + 1) * rows))
            values[pos * rows : (pos + 1) * rows].copy_(slab.reshape(rows, *like.shape[1:]))
        writer.add_like(key, values, like)
        return
    if rows != 1 and like.is_encoded:
        raise ReamLiteError(f"{key}: a flattened fused expert tensor in {like.encoding} is not written in kind")
    parts = {sfx: torch.empty((len(kept) * rows, *part.shape[1:]), dtype=part.torch_dtype) for sfx, part in
             like.parts.items()}
    for pos, e in enumerate(kept):
        dst = slice(pos * rows, (pos + 1) * rows)
        if e in merged:  # this expert's parts, encoded alone (its blocks and scales are its own; GGUF blocks as
            # read back: OutputFormat.encode)
            enc = writer.output.encode(key, merged[e].reshape(rows, *like.shape[1:]), like)
            for sfx in parts:
                parts[sfx][dst].copy_(enc[like.part_name(sfx, key)].reshape(parts[sfx][dst].shape))
        else:
            for sfx, part in like.parts.items():
                parts[sfx][dst].copy_(r.read_part(part, rows=(e * rows, (e + 1) * rows)))
    for sfx, t in parts.items():
        writer.add(like.part_name(sfx, key), t)


def record_of(method: str, guard: str, layout: ModelLayout, n_keep: int) -> dict[str, str | int]:
    """What a GGUF output's metadata records of the compression (`ream_lite.*` keys; ream_plan.json has the rest):
    the same for `compress` and for `apply` of its plan, so both write the same header."""
    return {"method": method, "guard": str(guard), "source": layout.path.name,
            "experts_before": layout.router_config.num_experts, "experts_after": n_keep}


def open_writer(layout: ModelLayout, out: str | Path, n_keep: int, output: OutputFormat, *, max_shard_bytes: int,
                overwrite: bool, resume: dict | None = None, record: dict | None = None):
    """The writer of the output: safetensors shards (CheckpointWriter), or, for a GGUF input, one GGUF file with the
    same metadata, tensor order and types (checkpoint/gguf_writer.py); both take the same calls."""
    if not layout.gguf and not output.gguf_types:
        return CheckpointWriter(out, max_shard_bytes, overwrite=overwrite, resume=resume, output=output)
    from ream_lite.checkpoint.gguf_writer import GGUFOutputWriter, layout_from_checkpoint, layout_from_gguf

    if resume is not None and not all(s["file"].endswith(".gguf") for s in resume["shards"]):
        raise ReamLiteError(f"{out}: the partial output is not a GGUF's; start over with --overwrite")
    if layout.gguf:
        plan = layout_from_gguf(layout.reader, n_keep, {x.index for x in layout.moe_layers}, record or {})
    else:  # --out-format gguf: the types and row orders are the output format's
        plan = layout_from_checkpoint(layout, n_keep, output.gguf_expert_type, output.gguf_other_type, record or {})[0]
    return GGUFOutputWriter(out, plan, overwrite=overwrite, resume=resume, output=output)


def output_config(layout: ModelLayout, n_keep: int, drop_mtp: bool, output: OutputFormat | None = None) -> dict:
    out = dict(layout.config)
    for key in layout.spec.num_experts_keys:
        if key in out:
            out[key] = n_keep
    if drop_mtp and layout.spec.mtp_layers_key:
        out[layout.spec.mtp_layers_key] = 0
    if layout.spec.detached_mtp_key and out.get(layout.spec.detached_mtp_key) and dropped_mtp_keys(layout, drop_mtp):
        out[layout.spec.detached_mtp_key] = 0  # its tensors are not written (copy_non_layer_tensors)
    out = layout.wrap_config(out)  # a multimodal checkpoint's: the wrapper's config, these edits in its text_config
    if output is not None:
        out = output.config(out, output.skip_modules)
        text = out.get("text_config") if layout.wrapper_config is not None else None
        if output.decode_to is not None and text:  # a dtype the text_config states itself follows the top one's
            out["text_config"] = {**text, **{k: out["torch_dtype"] for k in ("dtype", "torch_dtype") if k in text}}
    return out


OUT_DTYPES = ("stored", "bf16", "fp16", "fp32")


def make_output_format(layout: ModelLayout, n_keep: int, out_dtype: str = "stored", quantize: str | None = None,
                       double_quant: bool = False, gguf_type: str | None = None) -> OutputFormat:
    """The output format of `--out-dtype` / `--quantize` / `--out-format gguf --gguf-type T` for compressing `layout`
    to `n_keep` experts: with `quantize`, the weights transformers' bitsandbytes loader turns into 4-bit modules for
    the output's config; with `gguf_type`, every output tensor's llama.cpp type (the experts' `gguf_type`)."""
    if gguf_type is not None:
        return gguf_output_format(layout, n_keep, gguf_type, out_dtype, quantize)
    if out_dtype not in OUT_DTYPES:
        raise ReamLiteError(f"--out-dtype {out_dtype}: expected one of {', '.join(OUT_DTYPES)}")
    if layout.gguf and (out_dtype != "stored" or quantize is not None):
        raise ReamLiteError(f"{layout.path}: a GGUF is compressed into a GGUF of the same types; --out-dtype and "
                            "--quantize apply to safetensors checkpoints")
    decode_to = None if out_dtype == "stored" else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                     "fp32": torch.float32}[out_dtype]
    if decode_to is not None and not any(t.is_encoded for t in layout.reader.tensors.values()):
        raise ReamLiteError(f"--out-dtype {out_dtype}: {layout.path} holds no quantized tensors to decode (it applies "
                            "to FP8 / MXFP4 / bnb-4bit checkpoints; the tensors are written as stored)")
    if quantize is None:
        return OutputFormat(decode_to=decode_to)
    from ream_lite.checkpoint.bnb4 import bnb4_targets_and_skips

    if layout.multimodal:  # transformers would quantize the wrapper's modules (vision tower too) by their names
        raise ReamLiteError(f"--quantize: not supported for a multimodal '{layout.multimodal}' checkpoint; compress "
                            "without --quantize and quantize when loading")

    compute = decode_to or checkpoint_dtype(layout.config)
    if compute == torch.float32:
        compute = torch.bfloat16
    targets, skip = bnb4_targets_and_skips(_output_hf_config(layout, n_keep))
    # transformers quantizes modules by their names in its model; a module it expects in another layout than the
    # one ream-lite writes (Llama-4 swaps its fused experts for per-expert Linear modules) cannot be served
    elsewhere = sorted(k for k in targets if k not in layout.reader)
    if elsewhere:
        raise ReamLiteError(f"--quantize: transformers' bitsandbytes loader expects {elsewhere[0]} (and "
                            f"{len(elsewhere) - 1} more) for a {layout.spec.model_type} model, a layout ream-lite does "
                            "not write; compress without --quantize and quantize when loading")
    return OutputFormat(decode_to=decode_to, quantize=quantize, quantize_keys=frozenset(targets),
                        double_quant=double_quant, compute_dtype=compute, skip_modules=tuple(skip))


GGUF_OTHER_TYPE = "Q8_0"  # --out-format gguf: attention, embeddings, head, shared experts (norms and routers F32)


def gguf_output_format(layout: ModelLayout, n_keep: int, gguf_type: str, out_dtype: str = "stored",
                       quantize: str | None = None) -> OutputFormat:
    """--out-format gguf: the llama.cpp file of the compressed model (checkpoint/gguf_writer.py)."""
    from gguf import GGMLQuantizationType

    from ream_lite.checkpoint.ggml_blocks import ENCODABLE
    from ream_lite.checkpoint.gguf_writer import layout_from_checkpoint

    if layout.gguf:
        raise ReamLiteError(f"{layout.path}: a GGUF is always written as a GGUF of its own types; --out-format gguf "
                            "and --gguf-type are for safetensors checkpoints")
    if out_dtype != "stored" or quantize is not None:
        raise ReamLiteError("--out-format gguf: --out-dtype / --quantize apply to safetensors outputs")
    names = sorted(q.name for q in ENCODABLE)
    try:
        qtype = GGMLQuantizationType[gguf_type.upper()]
    except KeyError:
        qtype = None
    if qtype not in ENCODABLE:
        raise ReamLiteError(f"--gguf-type {gguf_type}: ream-lite writes {', '.join(names)}")
    other = GGMLQuantizationType[GGUF_OTHER_TYPE]
    _, types, rows, splits = layout_from_checkpoint(layout, n_keep, int(qtype), int(other), {})
    return OutputFormat(gguf_types=types, gguf_rows=rows, gguf_splits=splits, gguf_expert_type=int(qtype),
                        gguf_other_type=int(other),
                        gguf_describe=f"GGUF (routed experts {qtype.name}, other matrices {other.name} or F16 where "
                        "rows are not whole blocks, norms and routers F32)")


def _output_hf_config(layout: ModelLayout, n_keep: int):
    cfg = layout.hf_config()
    for key in layout.spec.num_experts_keys:
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, n_keep)
    return cfg


def write_planned(
    layout: ModelLayout, plans: dict[int, LayerPlan], n_keep: int, drop_mtp: bool, writer: CheckpointWriter,
    device: torch.device, progress: bool, side_files: Callable[[Path], None],
    refit_source: ModelLayout | None = None,
) -> Path:
    """A whole compressed checkpoint from decided plans (MoE layer index -> plan): merged experts from the weights
    alone (the plans carry their alignments), written in compress's order; `side_files(dir)` adds the plan,
    report and card before the output is moved into place. Experts a plan refit (fitted to calibration tokens,
    which apply does not have) are copied from `refit_source`, the compressed output the plan comes from."""
    try:
        copy_non_layer_tensors(writer, layout, drop_mtp)
        for info in tqdm(compression_steps(layout, drop_mtp), desc="write", disable=not progress):
            plan = plans.get(info.index)
            value_dtype = checkpoint_dtype(layout.config)
            merged = build_merged_experts(layout, plan, None, device, output=writer.output,
                                          value_dtype=value_dtype) if plan is not None else {}
            if plan is not None and refit_used(plan):
                merged.update(refit_experts(layout, refit_source, plan, value_dtype, writer.output))
            write_layer(writer, layout, info.index, plan, merged)
        side_files(writer.tmp_dir)
        return writer.finish(output_config(layout, n_keep, drop_mtp, writer.output), source_dir=layout.path)
    except BaseException:
        writer.abort()
        raise


def refit_used(plan: LayerPlan) -> bool:
    return bool(plan.refit and plan.refit.get("used"))


def refit_experts(layout: ModelLayout, source: ModelLayout | None, plan: LayerPlan, value_dtype: torch.dtype,
                  output: OutputFormat | None = None) -> dict[int, tuple[torch.Tensor, ...]]:
    """The experts `plan` refit, as `compress` wrote them into `source` (their output positions), checked against the
    plan's digest: expert id -> its parts, as `write_layer` takes merged experts."""
    from ream_lite.engine.experts import load_experts
    from ream_lite.refit import fitted_parts, refit_digest

    ids = [int(e) for e in plan.refit.get("experts", [])]
    if source is None:
        raise ReamLiteError(f"layer {plan.layer}: the plan refit experts {ids} to calibration tokens; apply copies "
                            "them from the compressed output the plan belongs to: pass that directory as PLAN")
    like = layout.reader.entry(layout.expert_keys(plan.layer)[0])
    # (as `compress` held them: `merged_as_written`; GGUF blocks read back in float32)
    dtype = torch.float32 if source.gguf else value_dtype if like.is_encoded else like.torch_dtype
    out = {e: load_experts(source, plan.layer, [plan.kept.index(e)], dtype, "cpu").expert(0) for e in ids}
    if (source.gguf or like.encoding in stored.REENCODE_DIFFERS) and output is not None:
        # written as the bytes the source holds (re-quantizing decoded Q5_K / Q6_K or INT4 values does not always
        # give them back): a GGUF tensor's blocks, an INT4 weight's codes, scales and shape record
        r = source.reader
        for e, values in out.items():
            for name, v in zip(source.per_expert_keys(plan.layer, plan.kept.index(e)), source.stored_parts(values)):
                t = r.entry(name)
                parts = {name: r.read_part(t.main)} if source.gguf else \
                    {t.part_name(sfx): r.read_part(p) for sfx, p in t.parts.items()}
                output.remember_blocks(name, v, parts)
    if refit_digest([fitted_parts(out[e]) for e in ids]) != plan.refit.get("sha256"):
        raise ReamLiteError(f"layer {plan.layer}: the refit experts in {source.path} are not the ones the plan "
                            "recorded (sha256 differs); was the output changed?")
    return out
