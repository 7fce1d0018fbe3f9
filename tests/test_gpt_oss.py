"""gpt_oss specifics: the interleaved input-major fused experts with biases, the clamped SwiGLU, the biased
top-k-then-softmax router, and outputs transformers loads (pruned: equal to the router-restricted original;
merged: the biases merged with the weights' coefficients and permutations)."""

import copy
import json

import pytest
import torch
from test_compress import compress, masked_reference
from tiny_models import VOCAB, build_model, reference_logits, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.arch.families import FAMILIES
from ream_lite.arch.fused import canonical_expert, stored_slabs
from ream_lite.checkpoint import CheckpointReader
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.engine.experts import expert_output, load_experts
from ream_lite.engine.router import route
from ream_lite.engine.streamer import LayerStreamer, StreamOptions
from ream_lite.methods.plan import LayerPlan
from ream_lite.write_output import copy_non_layer_tensors, output_config, write_layer, write_planned

EXPERTS = "model.layers.{}.mlp.experts.{}"
STORED = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def gpt_oss_model(seed: int = 0):
    """The tiny gpt_oss with a router bias large enough to change which experts are chosen."""
    model = build_model("gpt_oss", seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias.copy_(torch.randn(layer.mlp.router.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    model = gpt_oss_model()
    return model, save_model(model, tmp_path_factory.mktemp("gpt_oss"))


def expert_of(module, e: int, x: torch.Tensor) -> torch.Tensor:
    """transformers' own E_e(x) for every token: all routed to e with weight 1."""
    t = x.shape[0]
    return module(x, torch.full((t, 1), e), torch.ones(t, 1))


def test_fused_layout_decodes_to_what_transformers_computes(gpt_oss):
    model, d = gpt_oss
    layout = ModelLayout(str(d))
    assert {x.expert_storage for x in layout.moe_layers} == {"fused"}
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False))
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        experts = model.model.layers[i].mlp.experts
        w = load_experts(layout, i, list(range(8)), torch.float32, "cpu")
        # the canonical layout: gate / up are the even / odd columns of the input-major gate_up_proj
        assert torch.equal(w.gate, experts.gate_up_proj[:, :, 0::2].transpose(1, 2))
        assert torch.equal(w.up, experts.gate_up_proj[:, :, 1::2].transpose(1, 2))
        assert torch.equal(w.down, experts.down_proj.transpose(1, 2))
        assert torch.equal(w.gate_bias, experts.gate_up_proj_bias[:, 0::2])
        assert torch.equal(w.up_bias, experts.gate_up_proj_bias[:, 1::2])
        assert torch.equal(w.down_bias, experts.down_proj_bias)
        with torch.no_grad():
            for e in range(8):  # clamped SwiGLU with biases, as transformers runs it
                torch.testing.assert_close(expert_output(w, e, x, s.layer_act(i)), expert_of(experts, e, x),
                                           atol=1e-5, rtol=1e-5)
        assert any(bool((experts.gate_up_proj_bias[e] != 0).all()) for e in range(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_equals_transformers(gpt_oss, dtype):
    model, d = gpt_oss
    layout = ModelLayout(str(d))
    cfg = layout.router_config
    assert cfg.kind == "topk_softmax" and cfg.top_k == 2
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layer in model.model.layers:
        router = copy.deepcopy(layer.mlp.router).to(dtype)
        with torch.no_grad():
            logits, weights, idx = router(x)
        r = route(x, router.weight, cfg, router.bias)
        assert torch.equal(r.indices, idx)
        assert torch.equal(r.weights, weights.float())
        assert torch.equal(r.logits, logits.float())
        torch.testing.assert_close(r.scores, torch.softmax(logits.float(), -1))


def test_canonical_expert_round_trip():
    spec = FAMILIES["gpt_oss"]
    g = torch.Generator().manual_seed(2)
    slabs = [torch.randn(32, 48, generator=g), torch.randn(24, 32, generator=g), torch.randn(48, generator=g),
             torch.randn(32, generator=g)]
    expert = canonical_expert(spec, slabs)
    assert [tuple(t.shape) for t in expert] == [(24, 32), (24, 32), (32, 24), (24,), (24,), (32,)]
    assert torch.equal(expert[0], slabs[0][:, 0::2].T) and torch.equal(expert[4], slabs[2][1::2])
    assert all(torch.equal(a, b) for a, b in zip(stored_slabs(spec, expert), slabs))


def write_layers(layout: ModelLayout, out, plans: dict, merged: dict) -> None:
    writer = CheckpointWriter(out)
    copy_non_layer_tensors(writer, layout)
    for info in layout.decoder_layers:
        write_layer(writer, layout, info.index, plans.get(info.index), merged.get(info.index, {}))
    n_keep = len(next(iter(plans.values())).kept)
    writer.finish(output_config(layout, n_keep, False), source_dir=layout.path)


def test_repacked_experts_give_the_stored_bytes_back(gpt_oss, tmp_path):
    """Experts decoded by load_experts and re-packed by write_layer (as merged experts are) equal their stored
    bytes; the output loads in transformers and equals the original with the dropped experts masked out."""
    model, d = gpt_oss
    layout = ModelLayout(str(d))
    kept = [1, 3, 4, 6]
    plans, merged = {}, {}
    for i in range(3):
        plans[i] = LayerPlan(i, 8, "test", {e: [e] for e in kept}, {e: [1.0] for e in kept})
        w = load_experts(layout, i, kept, torch.float32, "cpu")
        merged[i] = {e: w.expert(j) for j, e in enumerate(kept) if e in (3, 6)}  # re-packed; 1 and 4 copied
    write_layers(layout, tmp_path / "out", plans, merged)
    a, b = CheckpointReader(d), CheckpointReader(tmp_path / "out")
    for i in range(3):
        for name in STORED:
            key = EXPERTS.format(i, name)
            assert b.shape(key)[0] == 4
            for pos, e in enumerate(kept):  # (bytes, not values)
                assert a.get(key)[e].numpy().tobytes() == b.get(key)[pos].numpy().tobytes(), (key, e)
        for name in ("router.weight", "router.bias"):
            key = f"model.layers.{i}.mlp.{name}"
            assert torch.equal(b.get(key), a.get(key)[kept])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    removed = {i: [e for e in range(8) if e not in kept] for i in range(3)}
    torch.testing.assert_close(reference_logits(pruned, ids), masked_reference(gpt_oss_model(), removed, ids),
                               atol=1e-4, rtol=1e-4)


def test_biases_merge_with_the_weights_coefficients_and_permutations(gpt_oss, tmp_path):
    model, d = gpt_oss
    layout = ModelLayout(str(d))
    gen = torch.Generator().manual_seed(3)
    groups = {0: [0, 5], 2: [2], 3: [3, 7, 1], 4: [4], 6: [6]}
    coefs = {0: [0.6, 0.4], 2: [1.0], 3: [0.5, 0.3, 0.2], 4: [1.0], 6: [1.0]}
    plans = {}
    for i in range(3):
        perms = {(c, m): torch.randperm(24, generator=gen) for c, ms in groups.items() for m in ms[1:]}
        plans[i] = LayerPlan(i, 8, "test", groups, coefs, align="weight", perms=perms)
    writer = CheckpointWriter(tmp_path / "out")
    write_planned(layout, plans, 5, False, writer, torch.device("cpu"), False, lambda _: None)
    out = CheckpointReader(tmp_path / "out")
    for i in range(3):
        ex = model.model.layers[i].mlp.experts
        for pos, (c, members) in enumerate(sorted(groups.items())):
            acc = {k: 0 for k in ("gate", "up", "down", "gb", "ub", "db")}
            for m, coef in zip(members, coefs[c]):  # by hand, from transformers' parameters
                p = plans[i].perms.get((c, m), torch.arange(24))
                acc["gate"] = acc["gate"] + coef * ex.gate_up_proj[m][:, 0::2].T[p]
                acc["up"] = acc["up"] + coef * ex.gate_up_proj[m][:, 1::2].T[p]
                acc["down"] = acc["down"] + coef * ex.down_proj[m].T[:, p]
                acc["gb"] = acc["gb"] + coef * ex.gate_up_proj_bias[m][0::2][p]  # with the neurons
                acc["ub"] = acc["ub"] + coef * ex.gate_up_proj_bias[m][1::2][p]
                acc["db"] = acc["db"] + coef * ex.down_proj_bias[m]  # per output: not permuted
            gu = out.get(EXPERTS.format(i, "gate_up_proj"))[pos]
            gub = out.get(EXPERTS.format(i, "gate_up_proj_bias"))[pos]
            got = {"gate": gu[:, 0::2].T, "up": gu[:, 1::2].T, "down": out.get(EXPERTS.format(i, "down_proj"))[pos].T,
                   "gb": gub[0::2], "ub": gub[1::2], "db": out.get(EXPERTS.format(i, "down_proj_bias"))[pos]}
            for k, v in acc.items():
                torch.testing.assert_close(got[k], v.detach(), rtol=1e-6, atol=1e-6, msg=f"layer {i} {c} {k}")
            assert (len(members) == 1) == torch.equal(gub, ex.gate_up_proj_bias[c].detach())
        assert torch.equal(out.get(f"model.layers.{i}.mlp.router.bias"),
                           model.model.layers[i].mlp.router.bias.detach()[sorted(groups)])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert merged.config.num_local_experts == 5
    assert torch.isfinite(reference_logits(merged, torch.randint(0, VOCAB, (2, 9)))).all()


def test_pruned_output_equals_the_router_restricted_original(gpt_oss, calib_file, tmp_path):
    _, d = gpt_oss
    compress(d, tmp_path / "out", "--experts", "4", "--method", "reap", "--calib", str(calib_file), "--refit", "off")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(8)) - set(L["kept"])) for L in plan["layers"]}
    a, b = CheckpointReader(d), CheckpointReader(tmp_path / "out")
    for L in plan["layers"]:
        key = f"model.layers.{L['layer']}.mlp.router.bias"
        assert torch.equal(b.get(key), a.get(key)[L["kept"]])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(reference_logits(pruned, ids), masked_reference(gpt_oss_model(), removed, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guard", ["off", "group"])
def test_ream_merges_write_loadable_models(gpt_oss, calib_file, tmp_path, guard):
    model, d = gpt_oss
    compress(d, tmp_path / "out", "--experts", "4", "--method", "ream", "--calib", str(calib_file), "--guard", guard)
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert guard != "off" or all(L["groups"] for L in plan["layers"])
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert set(m.state_dict()) == set(model.state_dict()) and m.config.num_local_experts == 4
    assert torch.isfinite(reference_logits(m, torch.randint(0, VOCAB, (1, 8)))).all()


def test_streamed_statistics_equal_naive_ones(gpt_oss):
    """The statistics accumulators equal the same sums over transformers' own router and expert outputs (the
    saliency gate of a softmax router: the softmax over all logits)."""
    from stats_oracle import moe_block_inputs, streamed_stats

    model, d = gpt_oss
    layout = ModelLayout(str(d))
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    stats = streamed_stats(layout, ids, experts_per_chunk=3)
    inputs = moe_block_inputs(model, layout, ids)
    assert sorted(inputs) == sorted(stats) == [0, 1, 2]
    for i, x in inputs.items():
        st, mlp = stats[i], model.model.layers[i].mlp
        with torch.no_grad():
            logits, _, idx = mlp.router(x)
            outs = torch.stack([expert_of(mlp.experts, e, x) for e in range(8)]).double()  # [N, T, H]
        probs = torch.softmax(logits.double(), -1)
        routed = torch.zeros(x.shape[0], 8, dtype=torch.bool).scatter_(1, idx, True)
        norms = outs.norm(dim=-1).T  # [T, N]
        assert torch.equal(st.count, routed.sum(0))
        torch.testing.assert_close(st.reap_sum, (probs * norms * routed).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.ean_sum, (norms * routed).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.logit_gram, logits.T.double() @ logits.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.gated_out_sum, (probs.T[:, :, None] * outs).sum(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.out_sum, outs.sum(1), rtol=1e-4, atol=1e-5)
