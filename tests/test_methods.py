"""Method building blocks on hand-made tensors: grouping, alignment, merge, similarities, streamed statistics."""

import pytest
import torch
import torch.nn.functional as F
from stats_oracle import moe_block_inputs, routed_sums, streamed_stats
from tiny_models import VOCAB

from ream_lite.arch import ModelLayout
from ream_lite.methods.align import activation_cost, merge
from ream_lite.methods.apply import merge_group
from ream_lite.methods.grouping import auto_group_size, nearest_centroid_groups, pseudo_prune_groups, select_top
from ream_lite.methods.similarity import gate_logit_similarity, logit_cosine, output_similarity


def dist(rows):
    return torch.tensor(rows, dtype=torch.float64)


# 6 experts; symmetric distances worked out by hand below
D = dist([
    [0.0, 0.1, 0.5, 0.2, 0.9, 0.3],
    [0.1, 0.0, 0.4, 0.6, 0.7, 0.8],
    [0.5, 0.4, 0.0, 0.3, 0.2, 0.2],
    [0.2, 0.6, 0.3, 0.0, 0.5, 0.1],
    [0.9, 0.7, 0.2, 0.5, 0.0, 0.6],
    [0.3, 0.8, 0.2, 0.1, 0.6, 0.0],
])


def test_pseudo_prune_by_hand():
    # centroids in saliency order 2, 0, 5; C = 3. Centroid 2 takes its two nearest free non-centroids:
    # free = {1, 3, 4}; d(2, .) = 1: 0.4, 3: 0.3, 4: 0.2 -> takes 4 and 3. Centroid 0 takes 1 (the only one left).
    g = pseudo_prune_groups(D, [2, 0, 5], 3, list(range(6)))
    assert g == {2: [2, 4, 3], 0: [0, 1], 5: [5]}


def test_pseudo_prune_group_size_two_and_ties():
    # C = 2: each centroid takes one. Centroid 5: d(5,3)=0.1 -> 3. Centroid 2: free {1,4}: 4 (0.2). Centroid 0: 1.
    assert pseudo_prune_groups(D, [5, 2, 0], 2, list(range(6))) == {5: [5, 3], 2: [2, 4], 0: [0, 1]}
    # ties break towards the lower index: all distances equal, centroid 3 takes 0, then centroid 1 takes 2
    tie = torch.zeros(4, 4, dtype=torch.float64)
    assert pseudo_prune_groups(tie, [3, 1], 2, [0, 1, 2, 3]) == {3: [3, 0], 1: [1, 2]}
    with pytest.raises(ValueError, match="too small"):
        pseudo_prune_groups(tie, [3], 2, [0, 1, 2, 3])


def test_nearest_centroid_by_hand():
    # 1 -> 0 (0.1 < 0.4), 3 -> 5 (0.1), 4 -> 2 (0.2)
    assert nearest_centroid_groups(D, [2, 0, 5], list(range(6))) == {2: [2, 4], 0: [0, 1], 5: [5, 3]}


def test_select_top_ties_and_routing_groups():
    s = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.7, 0.7])
    assert select_top(s, 3) == [1, 4, 5]  # 4 and 5 tie: lower index first
    assert select_top(s, 2, n_group=2) == [1, 4]  # one from each contiguous group {0,1,2} and {3,4,5}


def test_auto_group_size_rule():
    assert auto_group_size(128, 96) == 16
    assert auto_group_size(128, 64) == 32
    assert auto_group_size(512, 384) == 32
    assert auto_group_size(16, 12) == 5  # capped at N - N' + 1
    assert auto_group_size(16, 2) == 15


def test_alignment_recovers_a_permuted_copy_exactly():
    torch.manual_seed(0)
    inter, hid = 24, 12
    g, u, d = torch.randn(inter, hid), torch.randn(inter, hid), torch.randn(hid, inter)
    perm = torch.randperm(inter)
    g2, u2, d2 = g[perm], u[perm], d[:, perm]
    x = torch.randn(400, hid)
    a1, a2 = F.silu(x @ g.T) * (x @ u.T), F.silu(x @ g2.T) * (x @ u2.T)
    ca = activation_cost(a1.T.double() @ a2.double(), (a1.double() ** 2).sum(0), (a2.double() ** 2).sum(0))
    for align in ("act", "weight", "act+weight"):
        (mg, mu, md), perms = merge_group([(g, u, d), (g2, u2, d2)], [0.3, 0.7], align, [None, ca])
        assert torch.equal(g2[perms[0]], g)
        torch.testing.assert_close(mg, g, atol=1e-6, rtol=0)
        torch.testing.assert_close(md, d, atol=1e-6, rtol=0)
    (mg, _, _), _ = merge_group([(g, u, d), (g2, u2, d2)], [0.5, 0.5], "none", [None, None])
    assert (mg - g).abs().max() > 0.1  # without alignment the average is not the expert


def test_merge_is_the_weighted_sum():
    a = (torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 2))
    b = (torch.zeros(2, 3), 2 * torch.ones(2, 3), torch.ones(3, 2))
    m = merge([a, b], [0.25, 0.75])
    assert torch.allclose(m[0], torch.full((2, 3), 0.25)) and torch.allclose(m[1], torch.full((2, 3), 1.75))


def test_similarities_by_hand():
    logits = torch.tensor([[1.0, 2.0, -1.0], [2.0, 4.0, 1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    gram = logits.T @ logits
    cos = logit_cosine(gram)
    assert torch.isclose(cos[0, 1], torch.tensor(1.0, dtype=torch.float64))  # columns 0 and 1 are parallel
    sim = gate_logit_similarity(gram)
    d = torch.cdist((logits / logits.norm(dim=0)).T, (logits / logits.norm(dim=0)).T)
    torch.testing.assert_close(sim, 1 - d / d.max())
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(output_similarity(out), torch.tensor([[1, 0.5, 0], [0.5, 1, 0.5], [0, 0.5, 1]], dtype=torch.float64))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_streamed_statistics_equal_naive_ones(model_dirs, family):
    """Every accumulator equals the same quantity computed from full per-token tensors of transformers' model."""
    model, d = model_dirs[family]
    layout = ModelLayout(str(d))
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    stats = streamed_stats(layout, ids, experts_per_chunk=5)  # statistics must not depend on chunking
    inputs = moe_block_inputs(model, layout, ids)
    sigmoid = layout.router_config.kind == "sigmoid_grouped_topk"
    for i, x in inputs.items():
        st = stats[i]
        mlp = model.model.layers[i].mlp
        with torch.no_grad():
            logits, weights, idx = mlp.gate(x)
            n = logits.shape[1]
            scores = logits.sigmoid() if sigmoid else torch.softmax(logits.float(), -1)
            gu, dn = mlp.experts.gate_up_proj, mlp.experts.down_proj
            inter = dn.shape[2]
            outs = torch.stack([(F.silu(x @ gu[e, :inter].T) * (x @ gu[e, inter:].T)) @ dn[e].T for e in range(n)])
        assert st.tokens == x.shape[0]
        count, reap, ean = routed_sums(idx, weights if sigmoid else scores.gather(1, idx), outs)
        assert torch.equal(st.count, count)
        torch.testing.assert_close(st.reap_sum, reap, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.ean_sum, ean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.logit_gram, (logits.T.double() @ logits.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.gated_out_sum, (scores.T[:, :, None] * outs).sum(1).double(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.out_sum, outs.sum(1).double(), rtol=1e-4, atol=1e-5)
