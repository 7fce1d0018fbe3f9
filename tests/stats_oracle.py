"""Shared parts of the statistics oracles: ream-lite's streamed accumulators on one side, the MoE blocks' inputs as
transformers' own forward computes them (for a naive per-token recomputation) on the other."""

from __future__ import annotations

import torch
from tiny_models import text_decoder_layers

from ream_lite.arch import ModelLayout
from ream_lite.engine import LayerStreamer, StreamOptions
from ream_lite.methods.stats import StatsCollector


def streamed_stats(layout: ModelLayout, ids: torch.Tensor, experts_per_chunk: int) -> dict:
    """MoE layer -> its LayerStats (dense statistics) from the streamer run over `ids` in float32, with experts in
    chunks of `experts_per_chunk` (statistics must not depend on chunking) and batches of 30 tokens."""
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False, tokens_per_batch=30))
    s.make_plan(ids.numel())
    s.plan.experts_per_chunk = experts_per_chunk
    hidden = int(layout.config["hidden_size"])
    collectors: dict[int, StatsCollector] = {}

    class PerLayer:
        def on_routing(self, layer, batch, x, routing):
            if layer not in collectors:
                collectors[layer] = StatsCollector(layout.layers[layer].num_experts, hidden, s.layer_act(layer),
                                                   layout.router_config.kind, dense=True)
            collectors[layer].on_routing(layer, batch, x, routing)

        def on_experts(self, layer, batch, x, routing, experts):
            collectors[layer].on_experts(layer, batch, x, routing, experts)

    s.forward_layers(s.embed(list(ids)), observer=PerLayer()).close()
    return {i: c.result() for i, c in collectors.items()}


def moe_block_inputs(model, layout: ModelLayout, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """MoE layer -> the [tokens, hidden] input of its MoE block in transformers' forward of `ids`."""
    hidden = int(layout.config["hidden_size"])
    inputs: dict[int, torch.Tensor] = {}
    hooks = [getattr(m, layout.spec.moe_attr).register_forward_hook(
        lambda mod, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, hidden)))
        for i, m in enumerate(text_decoder_layers(model)) if layout.layers[i].is_moe]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def routed_sums(idx: torch.Tensor, gate: torch.Tensor, outs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per expert, over the (token, slot) pairs routed to it: count, sum of gate * ||E(x)|| (REAP) and of ||E(x)||
    (EAN), token by token. `idx` [T, k] chosen experts, `gate` [T, k] the saliency gate of each choice, `outs`
    [N, T, H] every expert's output on every token."""
    n = outs.shape[0]
    count = torch.zeros(n, dtype=torch.int64)
    reap = torch.zeros(n, dtype=torch.float64)
    ean = torch.zeros(n, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for slot, e in enumerate(idx[t].tolist()):
            if e >= n:  # a zero-computation (identity) expert: no statistics
                continue
            count[e] += 1
            reap[e] += float(gate[t, slot]) * float(outs[e, t].norm())
            ean[e] += float(outs[e, t].norm())
    return count, reap, ean
