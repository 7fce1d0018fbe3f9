"""HC-SMoE: hierarchical clustering (average linkage) of experts by their mean output over the calibration tokens;
each cluster is merged into its most frequently routed member, weighted by routing frequency, without alignment."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import pdist

from ream_lite.methods.base import Method, MethodInput, register
from ream_lite.methods.grouping import rank_desc, routing_groups
from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.prune import _scores


def hc_smoe_plan(inp: MethodInput) -> LayerPlan:
    st = inp.stats
    mean_out = (st.out_sum / max(st.tokens, 1)).numpy()
    freq = st.count.double()
    per = inp.n_keep // inp.n_group
    groups, weights = {}, {}
    for grp in routing_groups(st.num_experts, inp.n_group):
        if per == len(grp):
            labels = np.arange(len(grp))
        else:
            z = linkage(pdist(mean_out[grp], "euclidean"), method="average")
            labels = cut_tree(z, n_clusters=per).reshape(-1)
        for lab in sorted(set(labels.tolist())):
            members = [grp[i] for i in np.flatnonzero(labels == lab)]
            members = rank_desc(freq, members)  # dominant (most frequent) first
            f = torch.stack([freq[m] for m in members])
            w = (f / f.sum()) if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(members))
            groups[members[0]] = members
            weights[members[0]] = w.tolist()
    return LayerPlan(st.layer, st.num_experts, "hc-smoe", groups, weights, "none", _scores(inp))


register(Method("hc-smoe", hc_smoe_plan, lambda o: True, lambda o: False,
                "hierarchical clustering of mean expert outputs (average linkage), frequency-weighted merge"))
