"""DeepSeek-V4: hyper-connection residual streams, hash-routed layers, sqrt-softplus routing, clamped experts.

A tiny DeepSeekV4 built from transformers' config class (two residual streams; two hash-routed layers, then two
top-k layers; sliding, compressed-sparse and heavily-compressed attention), against transformers' own modules:
streamed logits, routers, the pruning identity (transformers' forward of the original with the removed experts
masked in the learned routers and the hash tables remapped by our rule, in original ids), merged outputs run by
transformers and by the streamer alike; release key names; the MTP block refused unless dropped.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compress import compress, masked_reference
from test_streamer import assert_loads_and_streams_as_transformers_runs_it, stream_logits
from tiny_models import VOCAB, _randomize, reference_logits, save_model
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.engine import LayerStreamer, StreamOptions
from ream_lite.engine.hash_routing import remap_table, similarity_order

N_EXPERTS, TOP_K = 8, 2


def v4_config(**overrides) -> DeepseekV4Config:
    kw = dict(vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=TOP_K,
              n_routed_experts=N_EXPERTS, n_shared_experts=1, hc_mult=2, o_groups=2, o_lora_rank=8, index_n_heads=2,
              index_head_dim=8, index_topk=4, sliding_window=8, swiglu_limit=1.5,
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
              layer_types=["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention",
                           "heavily_compressed_attention"],
              mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], partial_rotary_factor=0.5,
              tie_word_embeddings=False)
    kw.update(overrides)
    return DeepseekV4Config(**kw)


def build_v4(seed: int = 0) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = _randomize(DeepseekV4ForCausalLM(v4_config())).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # k distinct experts per token id
                b.copy_(torch.stack([torch.randperm(N_EXPERTS, generator=g)[:TOP_K] for _ in range(VOCAB)]))
    return model


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    model = build_v4()
    return model, save_model(model, tmp_path_factory.mktemp("v4") / "model")


def ids_of(seed: int = 3, shape=(3, 21)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_streamed_logits_equal_transformers(v4):
    model, d = v4
    layout = ModelLayout(str(d))
    assert [layout.hash_routed(x.index) for x in layout.moe_layers] == [True, True, False, False]
    assert layout.residual_streams == 2 and layout.residual_width == 64
    ids = ids_of()
    ref = reference_logits(model, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)
    # expert chunks, and the disk tier (the stream weights live in the spare columns of the spilled rows)
    torch.testing.assert_close(stream_logits(d, ids, tier="disk", experts_per_chunk=3), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 2])
def test_router_equals_transformers(v4, layer):
    """Layer 0: the hash router (table lookup, sqrt-softplus scores of the chosen experts, renormalised, scaled);
    layer 2: the top-k router with its selection bias."""
    model, d = v4
    s = LayerStreamer(ModelLayout(str(d)), StreamOptions(dtype=torch.float32, progress=False))
    _, block, _ = s.build_layer(layer)
    x = torch.randn(50, 32)
    tokens = torch.randint(0, VOCAB, (50,))
    gate = model.model.layers[layer].mlp.gate
    with torch.no_grad():
        ref_logits, ref_w, ref_i = gate(x, tokens) if block.hash_table is not None else gate(x)
    r = block.route(x, tokens)
    torch.testing.assert_close(r.logits, ref_logits.float())
    dense = lambda i, w: torch.zeros(50, N_EXPERTS).scatter_(1, i, w)  # noqa: E731
    torch.testing.assert_close(dense(r.indices, r.weights), dense(ref_i, ref_w.float()))


def test_hash_table_remap_rule():
    """Removed experts take the most router-similar kept expert not already in the row (hand-made example)."""
    # rows 0..3: expert 1 is closest to 0, then 3; expert 2 closest to 3
    w = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])
    order = similarity_order(w)
    assert order[0].tolist()[:2] == [0, 1] and order[3].tolist()[1] == 2
    table = torch.tensor([[0, 2], [0, 1], [3, 1], [2, 3]])
    kept = [1, 2]  # positions: 1 -> 0, 2 -> 1
    got = remap_table(table, order, kept)
    # [0, 2]: 0 -> 1 (most similar kept); [0, 1]: 0 -> 1 taken by the row -> 2; [3, 1]: 3 -> 2; [2, 3]: 3 -> 1
    assert got.tolist() == [[0, 1], [1, 0], [1, 0], [1, 0]]
    assert got.dtype == table.dtype


def _remapped_in_original_ids(model, d, kept: list[int]) -> dict[int, torch.Tensor]:
    layout = ModelLayout(str(d))
    out = {}
    for x in layout.moe_layers:
        if layout.hash_routed(x.index):
            gate = model.model.layers[x.index].mlp.gate
            table = remap_table(gate.tid2eid, similarity_order(gate.weight), kept[x.index])
            out[x.index] = torch.tensor(kept[x.index])[table]
    return out


def test_pruning_equals_transformers_with_removed_experts_masked(v4, calib_file, tmp_path):
    """REAP's output, run by transformers, = the original run by transformers with the removed experts masked in
    the learned routers and each hash table remapped by the rule (in original expert ids)."""
    model, d = v4
    compress(d, tmp_path / "out", "--experts", "5", "--method", "reap", "--calib", str(calib_file), "--refit", "off")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    kept = {int(x["layer"]): x["kept"] for x in plan["layers"]}
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert out.config.n_routed_experts == 5
    ids = ids_of(5)
    remapped = _remapped_in_original_ids(model, d, kept)
    assert sorted(remapped) == [0, 1]
    masked = copy.deepcopy(model)  # (masked_reference edits the selection biases it masks)
    for i, table in remapped.items():
        masked.model.layers[i].mlp.gate.tid2eid.copy_(table)
    ref = masked_reference(masked, {i: [e for e in range(N_EXPERTS) if e not in k] for i, k in kept.items()}, ids)
    torch.testing.assert_close(reference_logits(out, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stream_logits(tmp_path / "out", ids), ref, atol=1e-4, rtol=1e-4)
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert stored["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert int(stored["model.layers.0.ffn.gate.tid2eid"].max()) < 5


def test_merged_output_loads_generates_and_streams(v4, calib_file, tmp_path):
    """The default (guarded REAM, refit) output: transformers loads it, generates, and its forward equals the
    streamer's; `apply` of its plan writes the same bytes."""
    from click.testing import CliRunner

    from ream_lite.cli import main

    model, d = v4
    compress(d, tmp_path / "out", "--experts", "5", "--calib", str(calib_file))
    assert_loads_and_streams_as_transformers_runs_it(tmp_path / "out", model, DeepseekV4ForCausalLM)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    g = m.generate(torch.tensor([[3, 5, 7, 9]]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert g.shape == (1, 9)
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out" / "ream_plan.json"), str(d), str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def _release_named(src, dst):
    """The tiny checkpoint under the release's top-level names (layers.N..., embed, norm, head, hc_head_*)."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        k = k.replace("model.embed_tokens.weight", "embed.weight").replace("model.norm.weight", "norm.weight")
        k = k.replace("model.hc_head.hc_", "hc_head_").removeprefix("model.")
        renamed[k] = v
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_release_names_are_read_and_kept(v4, calib_file, tmp_path):
    model, d = v4
    rel = _release_named(d, tmp_path / "release")
    layout = ModelLayout(str(rel))
    assert layout.spec.layers_prefix == "layers" and layout.spec.embed_key == "embed.weight"
    ids = ids_of(9)
    ref = reference_logits(model, ids)
    torch.testing.assert_close(stream_logits(rel, ids), ref, atol=1e-4, rtol=1e-4)
    compress(rel, tmp_path / "out", "--experts", "6", "--method", "reap", "--calib", str(calib_file))
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert "hc_head_fn" in keys and "layers.3.ffn.experts.5.w2.weight" in keys
    assert "layers.3.ffn.experts.6.w2.weight" not in keys
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # (transformers renames)
    torch.testing.assert_close(stream_logits(tmp_path / "out", ids), reference_logits(out, ids), atol=1e-4,
                               rtol=1e-4)


def test_mtp_block_refused_unless_dropped(v4, calib_file, tmp_path):
    import shutil

    _, d = v4
    src = tmp_path / "with_mtp"
    shutil.copytree(d, src)
    sd = load_file(str(src / "model.safetensors"))
    sd["mtp.0.ffn.gate.weight"] = torch.zeros(N_EXPERTS, 32)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    r = compress(src, tmp_path / "out", "--experts", "6", "--calib", str(calib_file), expect_ok=False)
    assert r.exit_code != 0 and "MTP block" in r.output and "--drop-mtp" in r.output
    compress(src, tmp_path / "out", "--experts", "6", "--method", "reap", "--calib", str(calib_file), "--drop-mtp")
    assert not [k for k in load_file(str(tmp_path / "out" / "model.safetensors")) if k.startswith("mtp.")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_fp4_experts_refused(v4, tmp_path):
    import shutil

    from ream_lite.errors import ReamLiteError

    _, d = v4
    src = tmp_path / "fp4"
    shutil.copytree(d, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["expert_dtype"] = "fp4"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReamLiteError, match="expert_dtype 'fp4'"):
        LayerStreamer(ModelLayout(str(src)), StreamOptions(progress=False))


def test_flash_real_shape_inspect_and_plan(tmp_path):
    """DeepSeek-V4-Flash's real layer shapes (2 of its 43 layers: a hash-routed one, a top-k one; headers only):
    inspect names the router, the hash-routed layer and the 4 streams; the plan holds 4 x hidden per token in each
    residual buffer (one hidden for the guard's and refit's MoE outputs), and the default fits a 24 GB card."""
    import sys
    from pathlib import Path

    from test_plan import estimate

    from ream_lite.inspect_model import describe, format_description
    from ream_lite.sparse_checkpoint import write_sparse_checkpoint

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import deepseek_v4_flash

    src = write_sparse_checkpoint(deepseek_v4_flash(2, dense_layers=1), tmp_path / "v4flash")
    d = describe(ModelLayout(str(src)))
    assert d["hash_routed_layers"] == [0] and d["residual_streams"] == 4 and d["router"]["score"] == "sqrtsoftplus"
    assert d["experts_per_layer"] == [256] and d["top_k"] == 6
    assert "hash-routed" in format_description(d) and [x["kind"] for x in d["layers"]] == ["moe-hash", "moe"]
    gib = 2**30
    tokens = 256 * 512
    est = estimate(src, 192, num_sequences=256, seq_len=512,
                   stream={"device": "cuda", "max_gpu_memory": 24 * gib, "max_cpu_memory": 64 * gib})
    m = est.memory
    assert m.store_bytes == tokens * 4 * 4096 * 2
    # the refit's float32 target: one stream wide, over the statistics tokens
    assert m.side_store_bytes == pytest.approx(tokens * 4096 * 4 * (256 - est.holdout_sequences) / 256, rel=0.01)
    if est.peak_device_bytes > 24 * gib:
        assert any("above the device budget" in line and "--guard off" in line for line in est.lines())
    reap = estimate(src, 192, method="reap", num_sequences=256, seq_len=512,
                    stream={"device": "cuda", "max_gpu_memory": 24 * gib, "max_cpu_memory": 64 * gib})
    assert reap.peak_device_bytes <= 24 * gib


def test_interrupted_run_resumes_byte_identical(v4, calib_file, tmp_path):
    """Interrupted as hash-routed layer 1 starts: the resumed run's stores carry the token ids again (layer 1 routes
    by them) and all four residual streams, and it writes the bytes an uninterrupted run writes."""
    from test_resume import ctrl_c_at_layer, digests

    _, d = v4
    ref, out = tmp_path / "uninterrupted", tmp_path / "out"
    a = ("--experts", "5", "--calib", str(calib_file), "--snapshot-every", "layer")
    compress(d, out, *a)
    out.rename(ref)  # (the plan records the command, output path included)
    with ctrl_c_at_layer(1):
        r = compress(d, out, *a, expect_ok=False)
    assert r.exit_code == 2 and "1 of 4 layers are done" in r.output
    compress(d, out, *a, "--resume")
    assert digests(out) == digests(ref)
