"""Llama-4 (text), Qwen3-Next and Qwen3.5-MoE (text): what the generic parametrized tests do not cover.

The generic tests (test_streamer, test_compress's pruning oracle, test_router) run these families from FAMILIES.
Here: Llama-4's router and input-scaled experts against transformers' own modules, its statistics against naive
ones, merged outputs (fused input-major experts written back) run by transformers and by the streamer alike, and the
detached Qwen3-Next / Qwen3.5 MTP block that the output leaves out.
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stats_oracle import moe_block_inputs, streamed_stats
from test_compress import compress
from test_streamer import assert_loads_and_streams_as_transformers_runs_it, stream_logits
from tiny_models import VOCAB, build_model, reference_logits, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.engine import LayerStreamer, StreamOptions
from ream_lite.engine.experts import add_routed_output, load_experts
from ream_lite.engine.router import route


def test_llama4_router_matches_transformers(model_dirs):
    """Top-k of the raw logits, sigmoid of each chosen logit, nothing for the others (transformers scatters the
    chosen values into -inf and takes the sigmoid: 0 off the top-k)."""
    model, directory = model_dirs["llama4_text"]
    layout = ModelLayout(str(directory))
    assert [x.index for x in layout.moe_layers] == [1, 3]
    router = model.model.layers[1].feed_forward.router
    x = torch.randn(60, 32)
    with torch.no_grad():
        ref_scores, ref_logits = router(x)
    r = route(x, router.weight, layout.router_config)
    torch.testing.assert_close(r.logits, ref_logits.float())
    dense = torch.zeros_like(ref_scores).scatter_(1, r.indices, r.weights)
    torch.testing.assert_close(dense, ref_scores.float())
    assert (ref_scores > 0).sum(1).eq(2).all()


def test_llama4_moe_block_scales_the_expert_input(model_dirs):
    """Our executor on the checkpoint's fused input-major experts == transformers' Llama4TextMoe, and differs from
    scaling the output instead (so the test can tell the two apart)."""
    model, directory = model_dirs["llama4_text"]
    layout = ModelLayout(str(directory))
    assert layout.spec.fused_input_major and layout.layers[1].expert_storage == "fused"
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False))
    _, block, _ = s.build_layer(1)
    w = load_experts(layout, 1, list(range(8)), torch.float32, "cpu")
    x = torch.randn(40, 32)
    with torch.no_grad():
        ref, _ = model.model.layers[1].feed_forward(x)
        r = route(x, block.router_weight, block.router_cfg)
        got = torch.zeros(40, 32)
        add_routed_output(got, x, r.indices, r.weights, w, block.act, scale_input=True)
        other = torch.zeros(40, 32)
        add_routed_output(other, x, r.indices, r.weights, w, block.act)
        shared = block.shared_output(x)
    torch.testing.assert_close(got + shared, ref, atol=1e-5, rtol=1e-5)
    assert (other + shared - ref).abs().max() > 1e-3


def test_llama4_statistics_equal_naive_ones(model_dirs):
    """For input-scaled experts: saliency sums ||E(g x)||, EAN ||E(x)||, the output similarity sums E(s x) over all
    tokens; computed from transformers' own expert weights (gate columns then up columns, x @ W)."""
    model, d = model_dirs["llama4_text"]
    layout = ModelLayout(str(d))
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(3))
    stats = streamed_stats(layout, ids, experts_per_chunk=3)
    inputs = moe_block_inputs(model, layout, ids)
    assert sorted(inputs) == sorted(stats) == [1, 3]
    for i, x in inputs.items():
        st = stats[i]
        ff = model.model.layers[i].feed_forward
        gu, dn = ff.experts.gate_up_proj, ff.experts.down_proj

        def expert(e, v):
            return (F.silu(v @ gu[e, :, :12]) * (v @ gu[e, :, 12:])) @ dn[e]

        with torch.no_grad():
            scores, logits = ff.router(x)
            dense = torch.sigmoid(logits)
            reap, ean = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
            gated = torch.zeros(8, 32, dtype=torch.float64)
            for e in range(8):
                chosen = scores[:, e] > 0
                g = scores[chosen, e, None]
                reap[e] = expert(e, x[chosen] * g).norm(dim=-1).double().sum()
                ean[e] = expert(e, x[chosen]).norm(dim=-1).double().sum()
                gated[e] = expert(e, x * dense[:, e, None]).sum(0).double()
        assert torch.equal(st.count, (scores > 0).sum(0))
        torch.testing.assert_close(st.reap_sum, reap, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.ean_sum, ean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.gated_out_sum, gated, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama4_text", "qwen3_next", "qwen3_5_moe_text"])
def test_merged_output_loads_and_streams_as_transformers_runs_it(model_dirs, calib_file, tmp_path, family):
    """Guarded REAM (merges, the guard's undo deltas, sequential passes through input-scaled experts): the output
    keeps the input's layout (Llama-4: fused input-major at N' experts), loads in transformers with the same
    parameters, and the streamer's forward of the output equals transformers' forward of it — merged experts are
    written in the orientation transformers reads."""
    model, src = model_dirs[family]
    out = tmp_path / "out"
    compress(src, out, "--experts", "5", "--method", "ream", "--calib", str(calib_file))
    layout = ModelLayout(str(out))
    assert {x.num_experts for x in layout.moe_layers} == {5}
    plan = json.loads((out / "ream_plan.json").read_text())
    assert len(plan["layers"]) == len(layout.moe_layers)
    if family == "llama4_text":
        assert layout.reader.shape("model.layers.1.feed_forward.experts.gate_up_proj") == (5, 32, 24)
        assert layout.reader.shape("model.layers.3.feed_forward.experts.down_proj") == (5, 12, 32)
    assert_loads_and_streams_as_transformers_runs_it(out, model, AutoModelForCausalLM)


def test_paper_ream_merges_llama4_experts(model_dirs, calib_file, tmp_path):
    """Unguarded REAM merges in every layer: the merged fused input-major slabs are what transformers runs."""
    _, src = model_dirs["llama4_text"]
    out = tmp_path / "out"
    compress(src, out, "--experts", "4", "--method", "ream", "--guard", "off", "--calib", str(calib_file))
    plan = json.loads((out / "ream_plan.json").read_text())
    assert all(L["groups"] for L in plan["layers"])
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(stream_logits(out, ids), reference_logits(m, ids), atol=1e-4, rtol=1e-4)


def save_with_mtp(family: str, directory):
    """The tiny model with an MTP block under `mtp.*` as released Qwen3-Next / Qwen3.5 checkpoints carry it (a
    decoder layer with its own MoE, fc over [embedding; hidden], three norms), which transformers drops on load and
    save, so it is added to the file by hand; config mtp_num_hidden_layers = 1."""
    d = save_model(build_model(family), directory)
    sd = load_file(str(d / "model.safetensors"))
    for k, v in list(sd.items()):
        if k.startswith("model.layers.1."):
            sd[k.replace("model.layers.1.", "mtp.layers.0.")] = v.clone()
    sd["mtp.fc.weight"] = 0.1 * torch.randn(32, 64)
    for name in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        sd[f"mtp.{name}.weight"] = torch.zeros(32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
def test_detached_mtp_block_is_left_out_visibly(calib_file, tmp_path, family, caplog):
    d = save_with_mtp(family, tmp_path / "src")
    layout = ModelLayout(str(d))
    assert not any(x.is_mtp for x in layout.layers) and len(layout.layers) == 3  # not taken for decoder layers
    src_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # transformers ignores mtp.*
    with caplog.at_level(logging.WARNING):
        compress(d, tmp_path / "out", "--experts", "4", "--method", "reap", "--calib", str(calib_file))
    assert any("MTP block" in r.getMessage() and "mtp_num_hidden_layers = 0" in r.getMessage()
               for r in caplog.records)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith("mtp.")]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 0 and cfg["num_experts"] == 4
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert set(m.state_dict()) == set(src_model.state_dict())
    assert torch.isfinite(reference_logits(m, torch.randint(0, VOCAB, (1, 9)))).all()
