"""Streaming statistics of one MoE layer: accumulators whose memory does not grow with the number of tokens.

`StatsCollector` is an engine observer (see `ream_lite.engine.streamer.MoEObserver`). What it accumulates:

| field | accumulator | used by |
|---|---|---|
| count[i] | tokens routed to i (i in the top-k) | frequency, HC-SMoE / M-SMoE merge weights |
| reap_sum[i] | sum over routed tokens of g_i(x) * ||E_i(x)|| | REAP saliency (mean = reap_sum / count) |
| reap2_sum[i] | same with the gate squared (the reference code's double gating) | `--saliency-gate twice` |
| ean_sum[i] | sum over routed tokens of ||E_i(x)|| | EAN |
| logit_gram | L^T L over all tokens (float64, N x N) | gate-logit similarity (cosines of logit columns) |
| gated_out_sum[i] | sum over all tokens of s_i(x) * E_i(x) (dense) | REAM output similarity |
| out_sum[i] | sum over all tokens of E_i(x) (dense) | HC-SMoE features |

The gate value g_i(x) of the saliency: for softmax routers the softmax over all N logits (not renormalised over
the top-k, as the paper writes it); for sigmoid routers (DeepSeek-V3 / GLM) the weight the model really applies to
the expert (sigmoid score, normalised if the config says so, times routed_scaling_factor). `gate="softmax"` uses the
softmax of the raw logits for every family, as the REAP and REAM reference codes do. The dense gate s_i(x) of the
output similarity is the router's per-expert score before top-k (softmax probability or sigmoid score), or the
softmax of the logits with `gate="softmax"`.

Routers whose weight scales the expert's input (Llama-4: the token gets E_i(g x), not g E_i(x)): the gate is already
inside what the expert adds, so the saliency sums that contribution's norm ||E_i(g x)|| (reap2_sum: times g once
more), EAN the plain ||E_i(x)||, and the output similarity E_i(s_i(x) x) over all tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ream_lite.engine.experts import ExpertWeights, expert_intermediate, expert_output, routed_contribution
from ream_lite.engine.router import Routing
from ream_lite.engine.store import Batch


def collected_gate(saliency_gate: str) -> str:
    """The gate `StatsCollector` accumulates with for a --saliency-gate choice: 'twice' is the 'model' gate's
    squared sum (reap2_sum), collected in the same pass."""
    return {"twice": "model"}.get(saliency_gate, saliency_gate)


@dataclass
class LayerStats:
    layer: int
    num_experts: int
    tokens: int
    count: torch.Tensor
    reap_sum: torch.Tensor
    reap2_sum: torch.Tensor
    ean_sum: torch.Tensor
    logit_gram: torch.Tensor | None
    gated_out_sum: torch.Tensor | None
    out_sum: torch.Tensor | None

    def reap(self, double_gate: bool = False) -> torch.Tensor:
        """Mean over routed tokens of gate * ||E_i(x)||; 0 for experts never routed."""
        s = self.reap2_sum if double_gate else self.reap_sum
        return torch.where(self.count > 0, s / self.count.clamp(min=1), torch.zeros_like(s))


class StatsCollector:
    """Observer that accumulates `LayerStats`. `dense=True` runs every expert on every token (REAM, HC-SMoE)."""

    def __init__(
        self, num_experts: int, hidden: int, act: Callable, router_kind: str, dense: bool, gate: str = "model",
        gram: bool = True,
    ):
        self.n, self.hidden, self.dense, self.gate, self.want_gram = num_experts, hidden, dense, gate, gram
        self.act, self.sigmoid_router = act, router_kind in ("sigmoid_grouped_topk", "topk_sigmoid_input")
        self.scale_input = router_kind == "topk_sigmoid_input"  # the gate multiplies the expert's input
        self.layer = -1
        self.tokens = 0
        self.device: torch.device | None = None  # accumulators live where the tokens are: no per-expert syncs

    def _allocate(self, device: torch.device) -> None:
        n, f64 = self.n, dict(dtype=torch.float64, device=device)
        self.device = device
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.reap_sum = torch.zeros(n, **f64)
        self.reap2_sum = torch.zeros(n, **f64)
        self.ean_sum = torch.zeros(n, **f64)
        self.logit_gram = torch.zeros(n, n, **f64) if self.want_gram else None
        self.gated_out_sum = torch.zeros(n, self.hidden, **f64) if self.dense else None
        self.out_sum = torch.zeros(n, self.hidden, **f64) if self.dense else None

    def on_routing(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing) -> None:
        if self.device is None:
            self._allocate(x.device)
        self.layer = layer
        self.tokens += x.shape[0]
        # (the first n: a zero-computation expert's slots hold the sink index n, Routing.identity)
        self.count += torch.bincount(routing.indices.reshape(-1), minlength=self.n)[: self.n]
        if self.want_gram:
            lg = routing.logits.double()
            self.logit_gram += lg.T @ lg

    def gates(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense gate [T, N], gate of each routed slot [T, k]) for this batch's routing."""
        idx = routing.indices.clamp(max=routing.scores.shape[-1] - 1)  # (sink slots: never read for an expert)
        if self.gate == "softmax":
            soft = torch.softmax(routing.logits.float(), dim=-1)
            return soft, soft.gather(1, idx)
        # softmax routers: full-softmax probability; sigmoid routers: the weight the model applies
        routed = routing.weights if self.sigmoid_router else routing.scores.gather(1, idx)
        return routing.scores, routed

    def on_experts(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing, experts: ExpertWeights) -> None:
        dense_gate, routed_gate = self.gates(routing)
        if self.scale_input:
            self._on_input_scaled_experts(x, routing, experts, dense_gate, routed_gate)
            return
        for j, e in enumerate(experts.ids):
            tok, slot = routing.by_expert.of(e)
            if self.dense:
                y = expert_output(experts, j, x, self.act).float()  # [T, H]
                self.gated_out_sum[e] += (dense_gate[:, e, None].float() * y).sum(0).double()
                self.out_sum[e] += y.sum(0).double()
                y_routed = y[tok]
            else:
                y_routed = expert_output(experts, j, x[tok], self.act).float() if tok.numel() else None
            if tok.numel() == 0:
                continue
            norms = y_routed.norm(dim=-1).double()
            g = routed_gate[tok, slot].double()
            self.reap_sum[e] += (g * norms).sum()
            self.reap2_sum[e] += (g * g * norms).sum()
            self.ean_sum[e] += norms.sum()

    def _on_input_scaled_experts(self, x: torch.Tensor, routing: Routing, experts: ExpertWeights,
                                 dense_gate: torch.Tensor, routed_gate: torch.Tensor) -> None:
        """on_experts for routers whose weight scales the expert input (see the module doc)."""
        for j, e in enumerate(experts.ids):
            tok, slot = routing.by_expert.of(e)
            if self.dense:
                y = expert_output(experts, j, x, self.act).float()
                gated = routed_contribution(experts, j, x, dense_gate[:, e], self.act, scale_input=True)
                self.gated_out_sum[e] += gated.sum(0).double()
                self.out_sum[e] += y.sum(0).double()
                plain = y[tok]
            else:
                plain = expert_output(experts, j, x[tok], self.act).float() if tok.numel() else None
            if tok.numel() == 0:
                continue
            g = routed_gate[tok, slot]
            norms = routed_contribution(experts, j, x[tok], g, self.act, scale_input=True).norm(dim=-1).double()
            g = g.double()
            self.reap_sum[e] += norms.sum()
            self.reap2_sum[e] += (g * norms).sum()
            self.ean_sum[e] += plain.norm(dim=-1).double().sum()

    def result(self) -> LayerStats:
        if self.device is None:
            self._allocate(torch.device("cpu"))
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return LayerStats(
            self.layer, self.n, self.tokens, cpu(self.count), cpu(self.reap_sum), cpu(self.reap2_sum),
            cpu(self.ean_sum), cpu(self.logit_gram), cpu(self.gated_out_sum), cpu(self.out_sum),
        )


class AlignmentCollector:
    """Second pass, only for experts in non-singleton groups: for each (centroid c, member j) pair, the cross Gram
    A_c^T A_j [I, I] of their intermediate activations over the same tokens, and each neuron's squared norm.

    An expert in several chunks (a member the guard's candidates give to two centroids) has its norms summed over
    the tokens once, in the first chunk it is in: summed in every chunk, they were counted twice, and each count
    would depend on how chunks were ordered."""

    def __init__(self, pairs: list[tuple[int, int]], act: Callable, park: Callable | None = None):
        self.pairs, self.act = pairs, act
        self.cross: dict[tuple[int, int], torch.Tensor] = {}
        self.sq: dict[int, torch.Tensor] = {}
        self._sq_chunk: dict[int, tuple[int, ...]] = {}  # expert -> the chunk its norms are summed in
        # where a chunk's Grams go once its pass is over (e.g. to host memory: a layer's Grams are tens of GiB at
        # DeepSeek-V3's shape under the guard, one chunk's hundreds of MiB); `gram` brings one back
        self.park = park
        self._chunk: tuple[int, ...] | None = None  # the chunk whose Grams are being summed
        self._chunk_pairs: list[tuple[int, int]] = []

    def gram(self, c: int, j: int) -> torch.Tensor:
        """The cross Gram of pair (c, j), on the device of the norms (where it was summed)."""
        return self.cross[(c, j)].to(self.sq[c].device)

    def finish(self) -> "AlignmentCollector":
        """The pass is over: the last chunk's Grams go where the others went."""
        self._park_chunk()
        return self

    def _park_chunk(self) -> None:
        if self.park is not None:
            for pair in self._chunk_pairs:
                self.cross[pair] = self.park(self.cross[pair])
        self._chunk_pairs = []

    def on_routing(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing) -> None:
        pass

    def on_experts(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing, experts: ExpertWeights) -> None:
        pos = {e: j for j, e in enumerate(experts.ids)}
        acts = {e: expert_intermediate(experts, j, x, self.act).float() for e, j in pos.items()}
        chunk = tuple(experts.ids)
        if chunk != self._chunk:  # (a pass runs every batch through a chunk before the next: the last one is done)
            self._park_chunk()
            self._chunk = chunk
            self._chunk_pairs = [(c, j) for c, j in self.pairs if c in acts and j in acts]
        for e, a in acts.items():  # accumulated on the device, in float64
            if self._sq_chunk.setdefault(e, chunk) != chunk:
                continue
            s = (a * a).sum(0).double()
            self.sq[e] = self.sq[e] + s if e in self.sq else s
        for c, j in self.pairs:
            if c in acts and j in acts:
                g = (acts[c].T @ acts[j]).double()
                # (a pair in two chunks is summed on in the second: brought back from where the first parked it)
                self.cross[(c, j)] = self.cross[(c, j)].to(g.device) + g if (c, j) in self.cross else g
