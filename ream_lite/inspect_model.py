"""`ream-lite inspect`: what a checkpoint holds, read from its headers only (no weights are loaded)."""

from __future__ import annotations

from collections import Counter

from ream_lite.arch.layout import ModelLayout


def describe(layout: ModelLayout) -> dict:
    r, spec, cfg = layout.reader, layout.spec, layout.config
    rc = layout.router_config
    layers = []
    for info in layout.layers:
        keys = layout.layer_keys(info.index)
        expert_keys = set(layout.expert_keys(info.index))
        eb = sum(r.entry(k).nbytes for k in keys if k in expert_keys)
        ob = sum(r.entry(k).nbytes for k in keys if k not in expert_keys)
        layers.append(
            {
                "index": info.index,
                "kind": ("mtp-" if info.is_mtp else "") + ("moe" if info.is_moe else "dense")
                + ("-hash" if info.is_moe and layout.hash_routed(info.index) else ""),
                "experts": info.num_experts,
                "expert_storage": info.expert_storage,
                "expert_bytes": eb,
                "other_bytes": ob,
            }
        )
    dtypes = Counter()
    if layout.gguf:  # llama.cpp's types (Q4_K, Q6_K, F32 ...), not the bytes they are read as
        from gguf import GGMLQuantizationType

        for t in r.gguf.tensors:
            dtypes[GGMLQuantizationType(t.qtype).name] += t.nbytes
    else:
        for e in r.entries.values():
            dtypes[e.dtype] += e.nbytes
    quant = cfg.get("quantization_config") or {}
    moe = layout.moe_layers
    return {
        "path": str(layout.path),
        "family": spec.model_type,
        # a multimodal checkpoint: its model_type, and where its text model's layers are
        **({"multimodal": layout.multimodal, "text_prefix": spec.layers_prefix} if layout.multimodal else {}),
        "num_layers": layout.num_layers,
        "mtp_layers": sum(1 for x in layout.layers if x.is_mtp),
        "moe_layers": len(moe),
        "dense_layers": sum(1 for x in layout.decoder_layers if not x.is_moe),
        "experts_per_layer": sorted({x.num_experts for x in moe}),
        "top_k": rc.top_k,
        "router": {
            "kind": rc.kind,
            "score": rc.score_fn,
            "renormalize": rc.renormalize,
            "scaling": rc.scaling,
            "n_group": rc.n_group,
            "topk_group": rc.topk_group,
            "has_selection_bias": spec.router_bias is not None,
        },
        "shared_experts": spec.shared_expert_attr is not None,
        "residual_streams": layout.residual_streams,
        "hash_routed_layers": [x.index for x in moe if layout.hash_routed(x.index)],
        "expert_storage": sorted({x.expert_storage for x in moe}),
        "hidden_size": cfg.get("hidden_size"),
        "expert_intermediate_size": cfg.get(spec.moe_intermediate_key),
        "stored_dtypes": dict(dtypes.most_common()),
        "quantization": quant.get("quant_method") if quant else None,
        "total_bytes": r.total_bytes(),
        "expert_bytes": sum(x["expert_bytes"] for x in layers),
        "layers": layers,
    }


def format_description(d: dict) -> str:
    g = lambda b: f"{b / 1024**3:.2f} GiB" if b >= 1024**3 else f"{b / 1024**2:.2f} MiB"  # noqa: E731
    rt = d["router"]
    router = rt["kind"] + (", renormalised" if rt["renormalize"] else "")
    if rt["kind"] == "sigmoid_grouped_topk":
        router += f", scaling {rt['scaling']}, groups {rt['n_group']} (top {rt['topk_group']})"
        if rt.get("score", "sigmoid") != "sigmoid":
            router += f", scores {rt['score']}"
    if d.get("hash_routed_layers"):
        router += (f"; layers {', '.join(map(str, d['hash_routed_layers']))} hash-routed (experts chosen by a table "
                   "of the token id)")
    lines = [
        f"model        {d['path']}",
        f"family       {d['family']}" + (f" (the text model of a multimodal {d['multimodal']} checkpoint, under "
                                            f"{d['text_prefix']}; its other tensors are copied unchanged)"
                                            if d.get("multimodal") else ""),
        f"layers       {d['num_layers']} decoder ({d['moe_layers']} MoE, {d['dense_layers']} dense)"
        + (f" + {d['mtp_layers']} MTP" if d["mtp_layers"] else ""),
        f"experts      {'/'.join(map(str, d['experts_per_layer']))} per MoE layer, top-{d['top_k']}, "
        f"intermediate {d['expert_intermediate_size']}, stored {'/'.join(d['expert_storage'])}",
        f"router       {router}",
        f"shared       {'yes' if d['shared_experts'] else 'no'}",
        *([f"residual     {d['residual_streams']} streams (hyper-connections)"] if d.get("residual_streams", 1) > 1
          else []),
        "stored as    " + ", ".join(f"{k} {g(v)}" for k, v in d["stored_dtypes"].items())
        + (f" (quantization: {d['quantization']})" if d["quantization"] else ""),
        f"total        {g(d['total_bytes'])}, routed experts {g(d['expert_bytes'])} "
        f"({100 * d['expert_bytes'] / max(d['total_bytes'], 1):.1f}%)",
        "",
        f"{'layer':>6} {'kind':<9} {'experts':>7} {'expert bytes':>14} {'other bytes':>13}",
    ]
    for x in d["layers"]:
        lines.append(f"{x['index']:>6} {x['kind']:<9} {x['experts']:>7} {g(x['expert_bytes']):>14} {g(x['other_bytes']):>13}")
    return "\n".join(lines)
