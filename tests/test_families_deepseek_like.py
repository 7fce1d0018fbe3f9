"""DeepSeek-style MoE families: dots1 (dots.llm1), glm4_moe_lite (GLM-4.7-Flash), deepseek_v32
(DeepSeek-V3.2), glm_moe_dsa (GLM-5), exaone_moe (K-EXAONE, sliding / global attention, its selection bias stored on
the block), solar_open (Solar Open) and kimi_linear (Kimi-Linear, read and written under its release names), DeepSeek-V3's
MoE, V3.2 and GLM-5 with DeepSeek sparse attention; and
deepseek_v2 (DeepSeek-V2 / V2-Lite), with its own softmax router.

The generic tests run them from FAMILIES: test_streamer (streamed logits == transformers' forward; the sparse
attention's indexer sees a materialised causal mask, as the model gives it), test_router, test_compress's pruning
oracle. Here: merged outputs load in transformers and generate, the indexer's weights are copied unchanged,
inspect / plan read GLM-5 at its real shape, and DeepSeek-V2's router by hand in both its top-k methods.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import DEEPSEEK_LIKE, VOCAB
from transformers import AutoModelForCausalLM

from ream_lite.checkpoint import CheckpointReader
from ream_lite.cli import main
from ream_lite.sparse_checkpoint import write_sparse_checkpoint

GiB = 1024**3


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("family", DEEPSEEK_LIKE)
def test_merged_output_loads_and_generates(model_dirs, calib_file, tmp_path, family):
    """REAM 16 -> 8 (two experts kept in each of the 4 routing groups): transformers loads the output with the new
    count, every tensor it expects present, and generates."""
    model, src = model_dirs[family]
    run("compress", src, tmp_path / "out", "--experts", 8, "--method", "ream", "--calib", calib_file, "--seq-len",
        32, "--num-sequences", 12, "--device", "cpu")
    from ream_lite.arch.families import FAMILIES

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [cfg[k] for k in FAMILIES[family].num_experts_keys if k in cfg] == [8]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert set(m.state_dict()) == set(model.state_dict())
    # (a fixed prompt: drawn from the global generator, whatever ran before could make a model emit EOS early)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    out = m.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)


def test_sparse_attention_indexer_is_copied_unchanged(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["deepseek_v32"]
    run("compress", src, tmp_path / "out", "--experts", 8, "--method", "reap", "--calib", calib_file, "--seq-len",
        32, "--num-sequences", 12, "--device", "cpu")
    with CheckpointReader(src) as a, CheckpointReader(tmp_path / "out") as b:
        keys = [k for k in a.keys() if ".indexer." in k]
        assert len(keys) >= 3 * 4  # every layer's indexer (projections, norm, head weights)
        assert all(a.read_raw(k) == b.read_raw(k) for k in keys)


def test_glm5_real_shape_inspect_and_plan(tmp_path, monkeypatch):
    """GLM-5's real layer shapes (4 of its 78 layers, headers only): inspect reads the family and its router; planned
    for a 24 GB card at 256 -> 192 experts, the default (guarded REAM + refit) fits it."""
    from ream_lite.arch import ModelLayout
    from ream_lite.engine.streamer import StreamOptions
    from ream_lite.estimate import estimate_compression
    from ream_lite.pipeline import CompressConfig, resolve_keep, validate

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import glm_5

    src = write_sparse_checkpoint(glm_5(4), tmp_path / "glm5")
    info = json.loads(run("inspect", src, "--json").output)
    assert info["family"] == "glm_moe_dsa" and info["experts_per_layer"] == [256] and info["top_k"] == 8
    assert info["router"]["kind"] == "sigmoid_grouped_topk" and info["router"]["scaling"] == 2.5
    assert info["dense_layers"] == 3 and info["expert_intermediate_size"] == 2048

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):  # (planned, not run)
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("CUDA called")))
    budget = 24 * GiB
    layout = ModelLayout(str(src))

    def plan(**kw):
        cfg = CompressConfig(model=str(src), output=str(tmp_path / "out"), experts=192,
                             stream=StreamOptions(device="cuda", max_gpu_memory=budget, progress=False), **kw)
        n_keep = resolve_keep(layout, 192)
        validate(layout, n_keep, cfg)
        return estimate_compression(layout, cfg, n_keep, measure=False)

    for kw in ({"method": "reap"}, {"method": "ream", "guard": "off"}):  # the papers' algorithms fit the card
        est = plan(**kw)
        assert est.peak_device_bytes <= budget, kw
        assert [x.kind for x in est.layers] == ["dense"] * 3 + ["moe"]
        moe = est.layers[-1]
        assert moe.expert_bytes == 256 * 3 * 6144 * 2048 * 2  # 18 GiB of bf16 experts
    # the default's guard candidates merge large groups (issue 18): where they overrun the card, plan says so
    est = plan()
    assert est.peak_device_bytes <= budget or any("above the device budget" in x for x in est.lines())


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_router_by_hand(method):
    """DeepSeek-V2's softmax router, as transformers runs it: greedy (V2-Lite) ignores the groups;
    group_limited_greedy keeps the topk_group groups whose best expert is best; weights scaled, never
    renormalised."""
    from tiny_models import build_model, router_of

    from ream_lite.arch.families import FAMILIES
    from ream_lite.engine.router import route

    model = build_model("deepseek_v2", topk_method=method)
    cfg = FAMILIES["deepseek_v2"].router_config(model.config.to_dict())
    assert (cfg.n_group, cfg.topk_group) == ((4, 2) if method == "group_limited_greedy" else (1, 1))
    assert cfg.scaling == 2.5 and not cfg.renormalize and cfg.kind == "softmax_topk"
    owner, weight, _, call = router_of(model, 1)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ref_w, ref_i = call(x)
    ours = route(x, weight.detach(), cfg)
    order_ref, order = ref_i.sort(-1), ours.indices.sort(-1)
    assert torch.equal(order_ref.values, order.values)
    assert torch.allclose(ref_w.gather(1, order_ref.indices), ours.weights.gather(1, order.indices), atol=1e-6)
    if method == "group_limited_greedy":  # the choice really is limited: some token's best experts span > 2 groups
        groups = (ours.logits.softmax(-1).topk(6, dim=-1).indices // 4)
        assert any(len(set(g.tolist())) > 2 for g in groups)


@pytest.mark.parametrize("family", ["deepseek_v32", "glm4_moe_lite", "glm_moe_dsa"])
def test_mtp_layer_is_compressed_as_deepseek_v3s(calib_file, tmp_path, family):
    """An MTP layer after the decoder layers, as the releases store it: built past the per-layer config lists
    (mlp_layer_types, GLM-5's indexer_types), compressed, kept with the new count."""
    from tiny_models import save_mtp_model

    from ream_lite.checkpoint import CheckpointReader

    d = save_mtp_model(tmp_path / "src", family)
    run("compress", d, tmp_path / "out", "--experts", 8, "--calib", calib_file, "--seq-len", 32, "--num-sequences", 12,
        "--device", "cpu")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert [L["layer"] for L in plan["layers"]] == [1, 2, 3]  # (3: the MTP layer)
    with CheckpointReader(tmp_path / "out") as r:
        assert r.shape("model.layers.3.mlp.gate.weight")[0] == 8 and "model.layers.3.eh_proj.weight" in r


def test_ling_per_layer_expert_clamps_match_transformers(model_dirs):
    """Ling 2.5 clamps act(gate) and up of its routed experts with a limit per layer (0: none): each expert's output
    equals transformers' experts module's on inputs where the clamp bites, layer by layer."""
    from ream_lite.arch import ModelLayout
    from ream_lite.engine.expert_fn import ClampedAfterAct
    from ream_lite.engine.experts import expert_output, load_experts
    from ream_lite.engine.streamer import LayerStreamer, StreamOptions

    model, d = model_dirs["bailing_hybrid"]
    layout = ModelLayout(str(d))
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False))
    x = 3 * torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    for i, limit in ((1, 0.5), (2, None)):
        act = s.layer_act(i)
        assert isinstance(act, ClampedAfterAct) == (limit is not None) and getattr(act, "limit", None) == limit
        experts = model.model.layers[i].mlp.experts
        w = load_experts(layout, i, list(range(16)), torch.float32, "cpu")
        one = torch.ones(40, 1)
        with torch.no_grad():
            for e in range(16):
                ref = experts(x, torch.full((40, 1), e), one)
                torch.testing.assert_close(expert_output(w, e, x, act), ref, atol=1e-5, rtol=1e-5)
        if limit is not None:  # the clamp changes the outputs of these inputs
            unclamped = expert_output(w, 0, x, s.layer_act(2))
            assert (unclamped - expert_output(w, 0, x, act)).abs().max() > 1e-2


def test_mtp_layer_without_its_input_parts_is_refused_up_front(calib_file, tmp_path):
    """An MTP layer stored without the parts its input is built from (enorm / hnorm / eh_proj: a release with
    another MTP design) is refused before any work, naming the missing tensor and --drop-mtp; with --drop-mtp the
    run goes through and writes no MTP layer."""
    from safetensors.torch import load_file, save_file
    from tiny_models import save_mtp_model

    d = save_mtp_model(tmp_path / "src")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.3.enorm.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    args = ["compress", str(d), str(tmp_path / "out"), "--experts", "8", "--calib", str(calib_file), "--seq-len", "32",
            "--num-sequences", "12", "--method", "reap"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "model.layers.3.enorm.weight" in r.output and "--drop-mtp" in r.output
    assert not (tmp_path / "out").exists()
    run(*args, "--drop-mtp")
    with CheckpointReader(tmp_path / "out") as out:
        assert not any(k.startswith("model.layers.3.") for k in out.keys())


def test_nemotron_h_ungated_experts_match_transformers(model_dirs):
    """Nemotron-H's experts have no gate: held with a gate of zero inputs, each expert's output is transformers'
    experts module's down(relu^2(up x)), and the stored weights are up / down only."""
    from ream_lite.arch import ModelLayout
    from ream_lite.engine.experts import expert_output, load_experts
    from ream_lite.engine.streamer import LayerStreamer, StreamOptions

    model, d = model_dirs["nemotron_h"]
    layout = ModelLayout(str(d))
    assert [x.index for x in layout.moe_layers] == [1, 3] and layout.spec.gated_experts is False
    assert layout.per_expert_keys(1, 5) == ("backbone.layers.1.mixer.experts.5.up_proj.weight",
                                            "backbone.layers.1.mixer.experts.5.down_proj.weight")
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False))
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    experts = model.model.layers[1].mixer.experts
    w = load_experts(layout, 1, list(range(16)), torch.float32, "cpu")
    assert w.gate.shape == (16, 16, 0) and torch.equal(w.up, experts.up_proj) and torch.equal(w.down, experts.down_proj)
    one = torch.ones(40, 1)
    with torch.no_grad():
        for e in range(16):
            torch.testing.assert_close(expert_output(w, e, x, s.layer_act(1)), experts(x, torch.full((40, 1), e), one),
                                       atol=1e-5, rtol=1e-5)


def test_nemotron_h_guarded_ream_streams_as_transformers_runs_it(model_dirs, calib_file, tmp_path):
    """Paper REAM merges ungated experts (aligned on their up / down neurons): transformers loads the output and its
    forward equals the streamer's; the config.json written has no num_hidden_layers (the release derives it from
    layers_block_type). (The default's guard and refit run on them in test_merged_output_loads_and_generates.)"""
    from test_streamer import assert_loads_and_streams_as_transformers_runs_it

    model, src = model_dirs["nemotron_h"]
    run("compress", src, tmp_path / "out", "--experts", 8, "--method", "ream", "--guard", "off", "--calib",
        calib_file, "--seq-len", 32, "--num-sequences", 12, "--device", "cpu")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert any(len(g["members"]) > 1 for L in plan["layers"] for g in L["groups"].values())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "num_hidden_layers" not in cfg and cfg["n_routed_experts"] == 8
    assert_loads_and_streams_as_transformers_runs_it(tmp_path / "out", model, AutoModelForCausalLM)


def test_nemotron_3_nano_real_shape_inspect_and_plan(tmp_path, monkeypatch):
    """Nemotron-3 Nano's real layer shapes (5 of its 52 layers: Mamba, MoE, Mamba, MoE, attention; headers only):
    inspect reads the family, its ungated experts and router; planned for a 24 GB card at 128 -> 64 experts, the
    default fits."""
    from ream_lite.arch import ModelLayout
    from ream_lite.engine.streamer import StreamOptions
    from ream_lite.estimate import estimate_compression
    from ream_lite.pipeline import CompressConfig, resolve_keep, validate

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import nemotron_3_nano

    src = write_sparse_checkpoint(nemotron_3_nano(5), tmp_path / "nano")
    info = json.loads(run("inspect", src, "--json").output)
    assert info["family"] == "nemotron_h" and info["experts_per_layer"] == [128] and info["top_k"] == 6
    assert info["router"]["kind"] == "sigmoid_grouped_topk" and info["router"]["scaling"] == 2.5
    assert info["expert_intermediate_size"] == 1856
    layout = ModelLayout(str(src))
    assert [x.index for x in layout.moe_layers] == [1, 3]
    per_expert = sum(layout.reader.entry(k).nbytes for k in layout.per_expert_keys(1, 0))
    assert per_expert == 2 * 1856 * 2688 * 2  # up and down in bf16, no gate

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):  # (planned, not run)
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("CUDA called")))
    cfg = CompressConfig(model=str(src), output=str(tmp_path / "out"), experts=64,
                         stream=StreamOptions(device="cuda", max_gpu_memory=24 * GiB, progress=False))
    validate(layout, resolve_keep(layout, 64), cfg)
    est = estimate_compression(layout, cfg, resolve_keep(layout, 64), measure=False)
    assert est.peak_device_bytes <= 24 * GiB



@pytest.fixture(scope="module")
def latent_nemotron(tmp_path_factory):
    """A tiny Nemotron-H with a latent MoE (moe_latent_size 16 < hidden 32), as Nemotron-3 Super: its experts run on
    fc1_latent_proj(x), their sum goes through fc2_latent_proj."""
    from tiny_models import build_model, save_model

    model = build_model("nemotron_h", seed=4, moe_latent_size=16)
    assert model.model.layers[1].mixer.experts.up_proj.shape[-1] == 16
    return model, save_model(model, tmp_path_factory.mktemp("latent"))


def test_latent_moe_streams_and_prunes_as_transformers_runs_it(latent_nemotron, calib_file, tmp_path):
    """Latent MoE: streamed logits equal transformers'; REAP's output is the original with the removed experts masked
    (transformers' own forward); paper REAM's merged output loads and runs as the streamer runs it; --refit on is
    refused (the fit does not model the output projection)."""
    from test_compress import masked_reference
    from test_streamer import assert_loads_and_streams_as_transformers_runs_it, stream_logits
    from tiny_models import build_model, reference_logits

    model, src = latent_nemotron
    ids = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(stream_logits(src, ids), reference_logits(model, ids), atol=1e-4, rtol=1e-4)
    common = ("--calib", calib_file, "--seq-len", 32, "--num-sequences", 12, "--device", "cpu")
    run("compress", src, tmp_path / "reap", "--experts", 8, "--method", "reap", "--refit", "off", *common)
    plan = json.loads((tmp_path / "reap" / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(16)) - set(L["kept"])) for L in plan["layers"]}
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "reap", dtype=torch.float32)
    oracle = masked_reference(build_model("nemotron_h", seed=4, moe_latent_size=16), removed, ids)
    torch.testing.assert_close(reference_logits(pruned, ids), oracle, atol=1e-4, rtol=1e-4)
    run("compress", src, tmp_path / "ream", "--experts", 8, "--method", "ream", *common)
    assert_loads_and_streams_as_transformers_runs_it(tmp_path / "ream", model, AutoModelForCausalLM)
    r = CliRunner().invoke(main, ["compress", str(src), str(tmp_path / "on"), "--experts", "8", "--refit", "on",
                                  "--calib", str(calib_file)])
    assert r.exit_code == 2 and "latent space" in r.output
