"""Pruning baselines: keep the best experts by a score, drop the rest, keep the router rows of the kept."""

from __future__ import annotations

import torch

from ream_lite.methods.base import Method, MethodInput, MethodOptions, register
from ream_lite.methods.grouping import routing_groups, select_top
from ream_lite.methods.plan import LayerPlan, pruning_plan


def saliency(inp: MethodInput) -> torch.Tensor:
    """REAP saliency (mean gate * ||E|| over routed tokens) or routing frequency, per the options."""
    st = inp.stats
    if inp.options.saliency == "frequency":
        return st.count.double()
    return st.reap(double_gate=inp.options.saliency_gate == "twice")


def _scores(inp: MethodInput) -> dict:
    st = inp.stats
    return {"reap": st.reap().tolist(), "frequency": st.count.tolist(), "ean": st.ean_sum.tolist()}


def _prune_by(score_fn, name: str):
    def plan(inp: MethodInput) -> LayerPlan:
        kept = select_top(score_fn(inp), inp.n_keep, inp.n_group)
        return pruning_plan(inp.stats.layer, inp.stats.num_experts, name, kept, _scores(inp))

    return plan


def _random_plan(inp: MethodInput) -> LayerPlan:
    g = torch.Generator().manual_seed(inp.seed * 100_003 + inp.stats.layer)
    per = inp.n_keep // inp.n_group
    kept = []
    for grp in routing_groups(inp.stats.num_experts, inp.n_group):
        kept += [grp[i] for i in torch.randperm(len(grp), generator=g)[:per].tolist()]
    return pruning_plan(inp.stats.layer, inp.stats.num_experts, "random", kept, _scores(inp))


def _never(_: MethodOptions) -> bool:
    return False


register(Method("reap", _prune_by(lambda i: i.stats.reap(i.options.saliency_gate == "twice"), "reap"), _never, _never,
                "prune the experts with the lowest REAP saliency (mean gate x output norm over routed tokens)"))
register(Method("frequency", _prune_by(lambda i: i.stats.count.double(), "frequency"), _never, _never,
                "prune the least often routed experts"))
register(Method("ean", _prune_by(lambda i: i.stats.ean_sum, "ean"), _never, _never,
                "prune by summed expert activation norm over routed tokens"))
register(Method("random", _random_plan, _never, _never, "keep a seeded random subset (a control)"))
