"""Llama-4 (text), Qwen3-Next and Qwen3.5-MoE (text): what the generic parametrized tests do not cover.

The generic tests (test_streamer, test_compress's pruning oracle, test_router) run these families from FAMILIES.
Here: Llama-4's router and input-scaled experts against transformers' own modules, its statistics against naive
ones, merged outputs (fused input-major experts written back) run by transformers and by the streamer alike, and the
Qwen3-Next / Qwen3.5 MTP block (`mtp.*`, which transformers drops): run as transformers' own MtpLayer runs it, kept
and compressed, or left out with --drop-mtp.
"""

import json
import math

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
from ream_lite.checkpoint import CheckpointReader
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


def mtp_oracle_logits(model, d, ids):
    """The MTP block's next-next-token logits by transformers' own modules: its generic `MtpLayer` (enorm, hnorm,
    eh_proj, the family's decoder layer as a full-attention layer 0, post_norm) filled from the checkpoint's mtp.*
    tensors, fed as vLLM feeds Qwen3-Next's MTP: token t+1's embedding and the main model's final-normed h_t."""
    import copy

    from transformers.modeling_layers import MtpLayer
    from transformers.masking_utils import create_causal_mask

    sd = load_file(str(d / "model.safetensors"))
    cfg = copy.deepcopy(model.config)
    cfg.layer_types, cfg.mlp_only_layers = ["full_attention"], []  # (the MTP layer: full attention, MoE)
    base = model.model
    layer = MtpLayer(cfg, type(base.layers[1]), type(base.norm), 0).eval()
    with torch.no_grad():
        block = {k[len("mtp.layers.0."):]: v for k, v in sd.items() if k.startswith("mtp.layers.0.")}
        expert = lambda proj, e: block[f"mlp.experts.{e}.{proj}.weight"]  # noqa: E731
        n = model.config.num_experts
        fused = {"mlp.experts.gate_up_proj": torch.stack([torch.cat([expert("gate_proj", e), expert("up_proj", e)])
                                                          for e in range(n)]),
                 "mlp.experts.down_proj": torch.stack([expert("down_proj", e) for e in range(n)])}
        layer.mtp_block.load_state_dict({**{k: v for k, v in block.items() if ".experts." not in k}, **fused})
        layer.enorm.weight.copy_(sd["mtp.pre_fc_norm_embedding.weight"])
        layer.hnorm.weight.copy_(sd["mtp.pre_fc_norm_hidden.weight"])
        layer.eh_proj.weight.copy_(sd["mtp.fc.weight"])
        layer.post_norm.weight.copy_(sd["mtp.norm.weight"])
        h = base(ids).last_hidden_state[:, :-1]  # (final-normed)
        emb = base.embed_tokens(ids[:, 1:])
        pos = torch.arange(ids.shape[1] - 1).unsqueeze(0).expand(ids.shape[0], -1)
        mask = create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos)
        y = layer(emb, h, position_embeddings=base.rotary_emb(emb, pos), attention_mask=mask, position_ids=pos,
                  cache=None)
        return model.lm_head(y)


def streamed_mtp_logits(d, ids):
    """ream-lite's streamed MTP block: the decoder layers, then mtp_inputs, the MTP layer, its norm, the lm_head."""
    layout = ModelLayout(str(d))
    s = LayerStreamer(layout, StreamOptions(device="cpu", dtype=torch.float32, progress=False))
    s.make_plan(ids.numel())
    h = s.forward_layers(s.embed(list(ids)))
    info = next(x for x in layout.layers if x.is_mtp)
    x = s.mtp_inputs(info.index, list(ids), h, layout.spec.final_norm_key)
    out = s.new_store(x.lengths)
    s.run_layer(info.index, x, out)
    norm = s.norm_module(layout.spec.mtp_key(info.prefix, layout.spec.mtp_head_norm))
    lm_head = layout.reader.get(layout.lm_head_key, dtype=torch.float32)
    b = out.batches(10**9)[0]
    y = torch.nn.functional.linear(norm(out.read(b, "cpu")), lm_head)
    layout.close()
    return y


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
def test_mtp_block_is_run_as_transformers_mtp_layer_runs_it(tmp_path, family):
    d = save_with_mtp(family, tmp_path / "src")
    layout = ModelLayout(str(d))
    mtp = [x for x in layout.layers if x.is_mtp]
    assert len(layout.decoder_layers) == 3 and len(mtp) == 1
    assert mtp[0].prefix == "mtp.layers.0" and mtp[0].is_moe and mtp[0].num_experts == 8
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # (transformers ignores mtp.*)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(streamed_mtp_logits(d, ids), mtp_oracle_logits(model, d, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
def test_mtp_block_is_kept_and_compressed(calib_file, tmp_path, family):
    """The MTP block's MoE compressed with the decoder layers' rules, on the hidden states it sees; its other tensors
    copied; the output still loads in transformers; the MTP block's next-next-token distribution stays close to the
    original's (KL printed); --drop-mtp leaves it out, mtp_num_hidden_layers = 0."""
    d = save_with_mtp(family, tmp_path / "src")
    src_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    out = tmp_path / "out"
    compress(d, out, "--experts", "4", "--method", "reap", "--calib", str(calib_file))
    plan = json.loads((out / "ream_plan.json").read_text())
    assert [L["layer"] for L in plan["layers"]] == [0, 1, 2, 3] if family == "qwen3_5_moe_text" else [1, 2, 3]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1 and cfg["num_experts"] == 4
    with CheckpointReader(d) as a, CheckpointReader(out) as b:
        kept = plan["layers"][-1]["kept"]
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert b.read_raw(f"mtp.layers.0.mlp.experts.{new}.{proj}.weight") == \
                    a.read_raw(f"mtp.layers.0.mlp.experts.{old}.{proj}.weight")
        assert not any(k.startswith("mtp.layers.0.mlp.experts.4.") for k in b.keys())
        for k in ("mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight"):
            assert b.read_raw(k) == a.read_raw(k)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert set(m.state_dict()) == set(src_model.state_dict())
    ids = torch.randint(3, VOCAB, (4, 17), generator=torch.Generator().manual_seed(6))
    def kl(logits):
        p, q = (torch.log_softmax(x, -1) for x in logits)
        return float((p.exp() * (p - q)).sum(-1).mean())

    mtp_kl = kl([streamed_mtp_logits(x, ids) for x in (d, out)])
    main_kl = kl([stream_logits(x, ids) for x in (d, out)])
    # (random weights: the figures only say the block was compressed, not how good that is for a trained model)
    print(f"{family} 8 -> 4 experts (REAP): KL(original || compressed) of the MTP block {mtp_kl:.4f}, of the main "
          f"model {main_kl:.4f}")
    assert math.isfinite(mtp_kl) and mtp_kl > 0

    dropped = tmp_path / "dropped"
    compress(d, dropped, "--experts", "4", "--method", "reap", "--calib", str(calib_file), "--drop-mtp")
    with safe_open(str(dropped / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("mtp.")]
    assert json.loads((dropped / "config.json").read_text())["mtp_num_hidden_layers"] == 0


def test_plan_predicts_the_mtp_blocks_reads_and_output(calib_file, tmp_path, monkeypatch):
    """`plan` counts the MTP block: its layer read twice (run, then copied), its fc and norms copied with the tensors
    outside the layers and read once more with the model's embedding to make the block's input: exact bytes."""
    from test_plan import estimate, reads_of, tensor_bytes

    d = save_with_mtp("qwen3_next", tmp_path / "src")
    est = estimate(d, 4, calib=[str(calib_file)], seq_len=32, num_sequences=12)
    read = reads_of(d, monkeypatch)
    compress(d, tmp_path / "out", "--experts", "4", "--calib", str(calib_file))
    assert read == [est.read_bytes] and tensor_bytes(tmp_path / "out") == est.output_bytes
