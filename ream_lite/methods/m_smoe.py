"""M-SMoE (MC-SMoE): the most frequently routed experts are the centroids; every other expert joins the centroid
whose router-logit column is most similar; members are weight-aligned and merged weighted by frequency."""

from __future__ import annotations

import torch

from ream_lite.methods.base import Method, MethodInput, register
from ream_lite.methods.grouping import nearest_centroid_groups, routing_groups, select_top
from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.prune import _scores
from ream_lite.methods.similarity import logit_cosine


def m_smoe_plan(inp: MethodInput) -> LayerPlan:
    st = inp.stats
    freq = st.count.double()
    centroids = select_top(freq, inp.n_keep, inp.n_group)
    distance = 1.0 - logit_cosine(st.logit_gram)
    groups, weights = {}, {}
    for grp in routing_groups(st.num_experts, inp.n_group):
        groups.update(nearest_centroid_groups(distance, [c for c in centroids if c in grp], grp))
    for c, members in groups.items():
        f = torch.stack([freq[m] for m in members])
        weights[c] = ((f / f.sum()) if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(members))).tolist()
    return LayerPlan(st.layer, st.num_experts, "m-smoe", groups, weights, "weight", _scores(inp))


register(Method("m-smoe", m_smoe_plan, lambda o: False, lambda o: True,
                "MC-SMoE: frequent experts as centroids, router-logit similarity groups, weight-aligned frequency merge"))
