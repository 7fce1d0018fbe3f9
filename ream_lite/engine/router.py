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


def route(x: torch.Tensor, weight: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> Routing:
    """Route tokens x [T, H] with router weight [N, H] (and selection bias [N] for sigmoid routers)."""
    if cfg.kind == "softmax_topk":
        logits = F.linear(x, weight.to(x.dtype)).float()
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return Routing(logits, top_i, top_w, probs)
    if cfg.kind == "sigmoid_grouped_topk":
        logits = F.linear(x.float(), weight.float())
        scores = logits.sigmoid()
        choice = scores + bias.float() if bias is not None else scores
        n = weight.shape[0]
        if cfg.n_group > 1:
            per_group = n // cfg.n_group
            group_scores = choice.view(-1, cfg.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            keep = group_mask.unsqueeze(-1).expand(-1, cfg.n_group, per_group).reshape(-1, n).bool()
            choice = choice.masked_fill(~keep, float("-inf"))
        top_i = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]
        top_w = scores.gather(1, top_i)
        if cfg.renormalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(logits, top_i, top_w * cfg.scaling, scores)
    raise ValueError(f"unknown router kind {cfg.kind}")
