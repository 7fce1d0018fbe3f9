"""Our routers choose the same experts with the same weights as transformers' router modules."""

import pytest
import torch
from tiny_models import FAMILIES, router_of

from ream_lite.arch import ModelLayout
from ream_lite.arch.spec import RouterConfig
from ream_lite.engine.router import route


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_transformers(model_dirs, family):
    model, directory = model_dirs[family]
    layout = ModelLayout(str(directory))
    if layout.router_config.scales_input:
        pytest.skip("Llama-4's router returns scattered scores: compared in test_families_hybrid")
    i = layout.moe_layers[0].index
    _, weight, bias, gate = router_of(model, i)
    x = torch.randn(50, model.config.hidden_size)
    with torch.no_grad():
        ref_logits, ref_w, ref_i = gate(x)
    r = route(x, weight, layout.router_config, bias)
    n = layout.router_config.num_experts
    if layout.router_config.zero_experts:  # (LongCat-Flash: identity experts' slots -> the sink n, weight 0)
        zero = ref_i >= n
        torch.testing.assert_close(r.identity, ref_w.float().masked_fill(~zero, 0).sum(-1))
        assert zero.any() and not zero.all()
        ref_logits, ref_i, ref_w = ref_logits[:, :n], ref_i.masked_fill(zero, n), ref_w.masked_fill(zero, 0)
    torch.testing.assert_close(r.logits, ref_logits.float())
    # compare as sets per token: sorted=False top-k may order them differently
    order_ref, order = ref_i.sort(-1), r.indices.sort(-1)
    assert torch.equal(order_ref.values, order.values)
    torch.testing.assert_close(r.weights.gather(1, order.indices), ref_w.float().gather(1, order_ref.indices))


def test_group_limited_routing_by_hand():
    """4 experts in 2 groups, one group allowed: the best group by the sum of its top-2 biased scores wins."""
    cfg = RouterConfig("sigmoid_grouped_topk", 4, top_k=2, renormalize=True, scaling=2.0, n_group=2, topk_group=1)
    logits = torch.tensor([[2.0, -1.0, 1.5, 1.0]])
    w = torch.eye(4)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.3])
    r = route(logits, w, cfg, bias)
    # group 0: s(2)+s(-1) = 0.881+0.269 = 1.150; group 1 (biased): 0.818+(0.731+0.3) = 1.849 -> group 1
    assert sorted(r.indices[0].tolist()) == [2, 3]
    s = torch.sigmoid(torch.tensor([1.5, 1.0]))
    expected = sorted((2.0 * s / s.sum()).tolist())
    torch.testing.assert_close(sorted(r.weights[0].tolist()), expected)
