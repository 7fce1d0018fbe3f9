"""REAM: centroids = the most salient experts; the others are grouped around them by pseudo-pruning and merged
into them after neuron alignment, weighted by saliency (arXiv 2604.04356)."""

from __future__ import annotations

import torch

from ream_lite.methods.base import Method, MethodInput, register
from ream_lite.methods.grouping import auto_group_size, nearest_centroid_groups, pseudo_prune_groups, routing_groups, select_top
from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.prune import _scores, saliency
from ream_lite.methods.similarity import gate_logit_similarity, output_similarity


def fill_unrouted(score: torch.Tensor) -> torch.Tensor:
    """Experts never routed get a small positive score, min(0.5, smallest positive), as in the reference, so that
    they can still be ordered and weighted."""
    pos = score[score > 0]
    fill = min(0.5, float(pos.min())) if pos.numel() else 1.0
    return torch.where(score > 0, score, torch.full_like(score, fill))


def ream_similarity(inp: MethodInput) -> torch.Tensor:
    o, st = inp.options, inp.stats
    parts = []
    if o.gate_logit_sim:
        parts.append(gate_logit_similarity(st.logit_gram))
    if o.gated_sim:
        parts.append(output_similarity(st.gated_out_sum))
    if not parts:
        raise ValueError("REAM needs at least one similarity (gate-logit or gated output)")
    return sum(parts) / len(parts)


def ream_plan(inp: MethodInput) -> LayerPlan:
    st, o = inp.stats, inp.options
    score = fill_unrouted(saliency(inp))
    centroids = select_top(score, inp.n_keep, inp.n_group)
    distance = 1.0 - ream_similarity(inp)
    n_per_group = st.num_experts // inp.n_group
    keep_per_group = inp.n_keep // inp.n_group
    c = o.group_size or auto_group_size(n_per_group, keep_per_group)
    groups: dict[int, list[int]] = {}
    for grp in routing_groups(st.num_experts, inp.n_group):  # groups never cross routing groups
        cents = [e for e in centroids if e in grp]
        if o.grouping == "nearest-centroid":
            groups.update(nearest_centroid_groups(distance, cents, grp))
        else:
            groups.update(pseudo_prune_groups(distance, cents, c, grp))
    weights = {}
    for cent, members in groups.items():
        s = torch.stack([score[m] for m in members]).double()
        weights[cent] = (s / s.sum()).tolist()
    scores = _scores(inp)
    scores["saliency"] = score.tolist()
    return LayerPlan(st.layer, st.num_experts, "ream", groups, weights, o.align, scores)


register(Method("ream", ream_plan, lambda o: o.gated_sim, lambda o: o.gate_logit_sim,
                "merge experts into the most salient ones: pseudo-pruning groups, aligned, saliency-weighted (default)"))
