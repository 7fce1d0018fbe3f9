"""Routers of the supported families, reimplemented so the engine can run (and later restrict) them itself.

Each follows its transformers counterpart operation for operation (dtype of the logits included), so the
streamed model matches the full model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ream_lite.arch.spec import RouterConfig


@dataclass
class Routing:
    logits: torch.Tensor  # [T, N] router logits (float32)
    indices: torch.Tensor  # [T, k] chosen experts
    weights: torch.Tensor  # [T, k] weight applied to each chosen expert's output (float32)
    scores: torch.Tensor  # [T, N] the per-expert gate value before top-k: softmax probs or sigmoid scores
    # zero-computation experts (RouterConfig.zero_experts): each token's summed weight on them (its output gains
    # identity * x); their slots hold the sink index N with weight 0, and logits / scores cover the N real experts
    identity: torch.Tensor | None = None
    _by_expert: ExpertTokens | None = field(default=None, repr=False, compare=False)

    @property
    def by_expert(self) -> ExpertTokens:
        """The tokens each expert was chosen by (computed once per batch, shared by every pass over it)."""
        if self._by_expert is None:
            self._by_expert = ExpertTokens(self.indices, self.logits.shape[-1])
        return self._by_expert


class ExpertTokens:
    """For every expert, the (token, top-k slot) pairs that chose it, in the order torch.where(indices == e) gives.

    One stable sort and one device-to-host copy of the counts per batch: a torch.where per expert would wait for
    the GPU once per expert (128-512 waits per batch), which at small batches costs more than the matmuls."""

    def __init__(self, indices: torch.Tensor, num_experts: int):
        self.k = indices.shape[-1]
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)  # flat position t*k + slot, grouped by expert, ascending
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)

    def count(self, e: int) -> int:
        return self.offsets[e + 1] - self.offsets[e]

    def of(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows, slots) of the tokens routed to expert e (empty tensors if none)."""
        rows = self.order[self.offsets[e] : self.offsets[e + 1]]
        return rows // self.k, rows % self.k


def route(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
          chosen: torch.Tensor | None = None) -> Routing:
    """Route tokens x [T, H] with router weight [N, H] (and selection bias [N] for sigmoid routers, logit bias [N]
    for gpt_oss). With zero-computation experts, the router has N + Z rows and the routing is split (`Routing`).
    `chosen` [T, k]: the experts each token takes, decided elsewhere (a hash-routed layer's table lookup); the
    router's scores then only weight them."""
    if chosen is not None and cfg.kind != "sigmoid_grouped_topk":
        raise ValueError(f"experts chosen by a table are weighted by a scored router, not {cfg.kind}")
    r = _route(x, weight, cfg, bias, chosen)
    return _split_zero_experts(r, cfg.num_experts) if cfg.zero_experts else r


def _split_zero_experts(r: Routing, n: int) -> Routing:
    """A routing over N real + Z zero-computation experts as the engine runs it: the slots that chose an identity
    expert point at the sink N with weight 0, their weights summed into `identity`; logits and scores keep the N
    real columns (the softmax still normalised over all N + Z, as the model computes it)."""
    zero = r.indices >= n
    identity = r.weights.masked_fill(~zero, 0.0).sum(dim=-1)
    return Routing(r.logits[:, :n], r.indices.masked_fill(zero, n), r.weights.masked_fill(zero, 0.0), r.scores[:, :n],
                   identity)


def _scores(logits: torch.Tensor, fn: str) -> torch.Tensor:
    """A scored router's per-expert gate values (RouterConfig.score_fn)."""
    if fn == "sigmoid":
        return logits.sigmoid()
    if fn == "sqrtsoftplus":  # DeepSeek-V4
        return F.softplus(logits).sqrt()
    if fn == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unknown router score function {fn!r}")


def _route(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None,
           chosen: torch.Tensor | None = None) -> Routing:
    if cfg.kind == "softmax_topk":
        if cfg.fp32_logits:  # Ernie-4.5 / HunYuan: float32 router on float32 inputs
            logits = F.linear(x.float(), weight.float())
        else:
            logits = F.linear(x, weight.to(x.dtype)).float()
        probs = torch.softmax(logits, dim=-1)
        if cfg.n_group > 1:  # DeepSeek-V2's group_limited_greedy: groups scored by their best expert
            grouped = probs.view(-1, cfg.n_group, probs.shape[-1] // cfg.n_group)
            keep = _kept_groups(grouped.max(dim=-1).values, cfg, probs.shape[-1])
            top_w, top_i = torch.topk(probs.masked_fill(~keep, 0.0), cfg.top_k, dim=-1, sorted=False)
            return Routing(logits, top_i, top_w * cfg.scaling, probs)
        if bias is None:
            top_w, top_i = torch.topk(probs, cfg.top_k, dim=-1)
        else:  # Ernie-4.5: the selection bias is added to the probabilities for the choice only
            top_i = torch.topk(probs + bias.float(), cfg.top_k, dim=-1)[1]
            top_w = probs.gather(1, top_i)
        if cfg.renormalize:
            denom = top_w.sum(dim=-1, keepdim=True) if cfg.renorm_p == 1.0 else \
                torch.linalg.vector_norm(top_w, ord=cfg.renorm_p, dim=-1, keepdim=True)  # (DBRX's p-norm)
            if cfg.renorm_min > 0:
                denom = denom.clamp(min=cfg.renorm_min)
            top_w = top_w / denom
        return Routing(logits, top_i, top_w * cfg.scaling if cfg.scaling != 1.0 else top_w, probs)
    if cfg.kind == "sparsemixer":
        return _sparsemixer(x, weight, cfg)
    if cfg.kind == "sigmoid_grouped_topk":
        if cfg.fp32_logits is False:  # MiniMax-M2: logits in the router weight's dtype, sigmoid in float32
            logits = F.linear(x.to(weight.dtype), weight).float()
        else:
            logits = F.linear(x.float(), weight.float())
        scores = _scores(logits, cfg.score_fn)
        if chosen is not None:  # (a hash-routed layer: the table chose)
            top_i = chosen.to(logits.device, torch.long)
        else:
            choice = scores + bias.float() if bias is not None else scores
            n = weight.shape[0]
            if cfg.n_group > 1:  # groups scored by the sum of their best two
                per_group = n // cfg.n_group
                group_scores = choice.view(-1, cfg.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
                choice = choice.masked_fill(~_kept_groups(group_scores, cfg, n), float("-inf"))
            top_i = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]
        top_w = scores.gather(1, top_i)
        if cfg.renormalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(logits, top_i, top_w * cfg.scaling, scores)
    if cfg.kind == "topk_sigmoid_input":
        # Llama-4: top-k of the raw logits (in the input dtype, as its nn.Linear router computes them), each chosen
        # expert weighted by the sigmoid of its own logit, never renormalised; the weight scales the expert's input
        raw = F.linear(x, weight.to(x.dtype))
        top_v, top_i = torch.topk(raw, cfg.top_k, dim=-1)
        top_w = torch.sigmoid(top_v.float()).to(raw.dtype).float()
        logits = raw.float()
        return Routing(logits, top_i, top_w, torch.sigmoid(logits))
    if cfg.kind == "topk_softmax":
        return _topk_softmax(x, weight, cfg, bias)
    raise ValueError(f"unknown router kind {cfg.kind}")


def _kept_groups(group_scores: torch.Tensor, cfg: RouterConfig, n: int) -> torch.Tensor:
    """bool [T, n]: the experts of each token's `cfg.topk_group` best-scoring groups (group_scores [T, n_group]),
    for group-limited routing."""
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    return group_mask.unsqueeze(-1).expand(-1, cfg.n_group, n // cfg.n_group).reshape(-1, n).bool()


def _topk_softmax(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None) -> Routing:
    """gpt_oss: logits = W x + b in the input dtype (its router is a biased linear), top-k of them, weights = softmax
    over the k chosen logits only (in that dtype, as there). The per-expert score of the statistics is the softmax
    over all N logits, which is what the chosen weights are, renormalised over the top-k."""
    raw = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    top_v, top_i = torch.topk(raw, cfg.top_k, dim=-1)
    top_w = torch.softmax(top_v, dim=-1, dtype=top_v.dtype).float()
    logits = raw.float()
    return Routing(logits, top_i, top_w, torch.softmax(logits, dim=-1))


def _sparsemixer(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig) -> Routing:
    """PhiMoE's router in eval mode: always two experts (whatever top_k says), chosen one after the other.

    Round r takes the largest logit m not chosen yet; its weight is its probability under a softmax over the logits
    within a relative gap of m, the others masked: (m - l) / max(|l|, m) > 2 * jitter_eps. Round two excludes round
    one's expert. In training the model samples instead and jitters its inputs; neither applies here. Computed in
    the logits' own dtype, as the model's nn.Linear router gives them."""
    raw = F.linear(x, weight.to(x.dtype))
    gap = 2 * cfg.jitter_eps

    def pick(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = candidates.max(dim=-1, keepdim=True)
        drop = (top - raw) / raw.abs().clamp(min=top) > gap
        gates = torch.softmax(candidates.masked_fill(drop, float("-inf")), dim=-1)
        return idx, gates.gather(-1, idx)

    i1, w1 = pick(raw)
    i2, w2 = pick(raw.scatter(-1, i1, float("-inf")))
    logits = raw.float()
    return Routing(logits, torch.cat([i1, i2], dim=-1), torch.cat([w1, w2], dim=-1).float(), torch.softmax(logits, -1))
