"""GGUFs of llama.cpp's glm4moe and deepseek2 architectures: tiny GLM-4.5, DeepSeek-V3 and DeepSeek-V2 models written
as llama.cpp's converter writes them (checkpoint/gguf_export.py: names, MLA's kv_b_proj split into attn_k_b / attn_v_b
or whole as older converters wrote it, NextN layers, metadata), read back as the transformers checkpoint they hold,
and compressed into a GGUF of the same layout."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_compress import compress
from test_gguf import decoded_model
from test_streamer import stream_logits
from tiny_models import VOCAB, _randomize, family_config, reference_logits, save_model

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.gguf import Field, GGUFCheckpoint, gguf_config
from ream_lite.checkpoint.gguf_export import export_gguf
from ream_lite.errors import ReamLiteError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# rows of whole Q8_0 blocks (32 values) everywhere: hidden 64, experts 32, heads of 32 (MLA: nope, rope, v, ranks)
NARROW = {"hidden_size": 64, "num_attention_heads": 4, "moe_intermediate_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 3}
MLA = {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "v_head_dim": 32,
       "head_dim": 32}
FAMILY = {
    # q/k/v biases and q/k norms (GLM-4.5), 8 experts in 2 groups, layer 0 dense, one NextN layer
    "glm4_moe": {"num_key_value_heads": 2, "head_dim": 32, "attention_bias": True, "use_qk_norm": True},
    # q LoRA, 16 experts in 4 groups of which 2 are chosen, renormalised and scaled, layer 0 dense
    "deepseek_v3": MLA,
    # DeepSeek-V2-Lite's shape: no q LoRA (attn_q), softmax router without groups, scaled, never renormalised
    "deepseek_v2": {**MLA, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
}
ARCH = {"glm4_moe": "glm4moe", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2"}
N_KEEP = {"glm4_moe": 4, "deepseek_v3": 8, "deepseek_v2": 8}  # (whole groups: 2 of 4 per group of DeepSeek-V3)


def narrow_model(family: str):
    from transformers import AutoModelForCausalLM

    base = family_config(family)
    cfg = {k: v for k, v in base.to_dict().items() if k != "layer_types"}
    cfg.update(NARROW, **FAMILY[family])
    torch.manual_seed(0)
    return _randomize(AutoModelForCausalLM.from_config(type(base)(**cfg), dtype=torch.float32).eval())


def add_mtp_layer(d):
    """GLM-4.5's NextN layer (model.layers.3, after the 3 decoder layers), as its release stores it: a MoE decoder
    layer with embed_tokens, enorm, hnorm, eh_proj and shared_head (transformers' save_pretrained drops it)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    h = NARROW["hidden_size"]
    for k, v in list(sd.items()):
        if k.startswith("model.layers.2."):
            sd[k.replace("model.layers.2.", "model.layers.3.")] = v + 0.01 * torch.randn(v.shape, generator=g)
    sd["model.layers.3.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        sd[f"model.layers.3.{name}.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
    sd["model.layers.3.eh_proj.weight"] = 0.2 * torch.randn(h, 2 * h, generator=g)
    sd["model.layers.3.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (safetensors dir, {variant: GGUF path}): F32 throughout, Q8_0 throughout (norms, biases, routers
    F32), and for DeepSeek Q8_0 with kv_b_proj whole (attn_kv_b, before llama.cpp split it)."""
    root = tmp_path_factory.mktemp("gguf_families")
    out = {}
    for family in FAMILY:
        d = save_model(narrow_model(family), root / family)
        if family == "glm4_moe":
            add_mtp_layer(d)
        files = {t: export_gguf(d, root / f"{family}-{t}.gguf", expert_type=Q[t], other_type=Q[t])
                 for t in ("F32", "Q8_0")}
        if family.startswith("deepseek"):
            files["legacy"] = export_gguf(d, root / f"{family}-legacy.gguf", expert_type=Q.Q8_0, other_type=Q.Q8_0,
                                          legacy_kv_b=True)
        out[family] = (d, files)
    return out


@pytest.mark.parametrize("family", FAMILY)
def test_layout_equals_the_safetensors_twin(models, family):
    d, files = models[family]
    a = ModelLayout(str(d))
    for variant, path in files.items():
        b = ModelLayout(str(path))
        assert b.reader.gguf.arch == ARCH[family] and b.spec is a.spec, variant
        assert b.router_config == a.router_config, variant
        assert set(a.reader.keys()) == set(b.reader.keys()), variant
        assert all(a.reader.shape(k) == b.reader.shape(k) for k in sorted(a.reader.keys())), variant
        assert [(x.index, x.is_moe, x.num_experts, x.expert_storage, x.is_mtp) for x in a.layers] == \
            [(x.index, x.is_moe, x.num_experts, x.expert_storage, x.is_mtp) for x in b.layers], variant
        ca, cb = a.hf_config().to_dict(), b.hf_config().to_dict()
        keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "moe_intermediate_size", "num_experts_per_tok", "n_routed_experts",
                "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group",
                "norm_topk_prob", "vocab_size", "rope_parameters"]
        keys += {"glm4_moe": ["attention_bias", "use_qk_norm", "num_nextn_predict_layers"],
                 "deepseek_v3": ["q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                                 "rope_interleave"],
                 "deepseek_v2": ["q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                                 "topk_method"]}[family]
        assert {k: cb[k] for k in keys} == {k: ca[k] for k in keys}, variant
        b.close()
    a.close()


@pytest.mark.parametrize("family", FAMILY)
def test_values_are_the_checkpoint_s(models, family):
    """Every tensor read from the F32 GGUF is the safetensors tensor bit for bit (MLA's kv_b_proj joined back from
    attn_k_b / attn_v_b); from the Q8_0 GGUFs, within Q8_0's rounding."""
    d, files = models[family]
    a = ModelLayout(str(d))
    for variant, path in files.items():
        with GGUFCheckpoint(path) as r:
            for k in sorted(a.reader.keys()):
                x, y = a.reader.get(k, dtype=torch.float32), r.get(k, dtype=torch.float32)
                if variant == "F32":
                    assert torch.equal(x, y), k
                else:
                    assert (x - y).abs().max() <= x.abs().max() / 127 + 1e-6, (variant, k)
    a.close()


def test_mla_kv_b_is_two_gguf_tensors(models):
    """A split kv_b_proj is one logical tensor whose stored parts are attn_k_b (main) and attn_v_b, each decoded in
    its own type, equal to the gguf package's dequantization of both, joined."""
    _, files = models["deepseek_v3"]
    g = {t.name: t for t in gguf.GGUFReader(files["Q8_0"]).tensors}
    assert "blk.1.attn_kv_b.weight" not in g
    with GGUFCheckpoint(files["Q8_0"]) as r:
        key = "model.layers.1.self_attn.kv_b_proj.weight"
        t = r.entry(key)
        assert list(t.parts) == ["", ":attn_v_b.weight"]
        assert t.nbytes == int(g["blk.1.attn_k_b.weight"].n_bytes) + int(g["blk.1.attn_v_b.weight"].n_bytes)
        k_b, v_b = (torch.from_numpy(np.array(gguf.quants.dequantize(g[f"blk.1.{n}.weight"].data, Q.Q8_0)))
                    for n in ("attn_k_b", "attn_v_b"))  # [H, rank, nope], [H, v, rank]
        assert torch.equal(r.get(key), torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1]))
    with GGUFCheckpoint(files["legacy"]) as r:
        assert list(r.entry("model.layers.1.self_attn.kv_b_proj.weight").parts) == [""]


@pytest.mark.parametrize("family,variant", [("glm4_moe", "F32"), ("glm4_moe", "Q8_0"), ("deepseek_v3", "F32"),
                                            ("deepseek_v3", "Q8_0"), ("deepseek_v3", "legacy"),
                                            ("deepseek_v2", "Q8_0")])
def test_streamed_logits_equal_transformers_on_the_dequantized_weights(models, family, variant, tmp_path):
    plain, files = models[family]
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(decoded_model(files[variant], plain, tmp_path), ids)
    torch.testing.assert_close(stream_logits(files[variant], ids), ref, atol=1e-4, rtol=1e-4)


def slice_checked(src, out, family):
    """Every tensor of the output GGUF is the input's, bytes unchanged: kept experts' blocks, the router's and the
    selection bias's kept rows, the rest whole; the metadata is the input's with the expert count and a record."""
    produced = out / src.name
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(produced)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    layers = {L["layer"]: L["kept"] for L in json.loads((out / "ream_plan.json").read_text())["layers"]}
    sliced = 0
    for name, t in ta.items():
        u = tb[name]
        assert u.tensor_type == t.tensor_type, name
        parts = name.split(".")
        if parts[0] == "blk" and int(parts[1]) in layers and any(s in name for s in ("_exps.", "ffn_gate_inp.",
                                                                                        "exp_probs_b.")):
            assert np.array_equal(np.take(t.data, layers[int(parts[1])], axis=0), u.data), name
            sliced += 1
        else:
            assert np.array_equal(t.data, u.data), name
    assert sliced
    arch = ARCH[family]
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert fb.pop(f"{arch}.expert_count") == N_KEEP[family] and fa.pop(f"{arch}.expert_count") == \
        2 * N_KEEP[family]
    record = {k: fb.pop(k) for k in list(fb) if k.startswith("ream_lite.")}
    assert fa == fb and record["ream_lite.method"] == "reap"
    layout = ModelLayout(str(produced))
    assert layout.router_config.num_experts == N_KEEP[family]
    assert torch.isfinite(stream_logits(produced, torch.randint(0, VOCAB, (1, 9)))).all()
    layout.close()
    return layers


def reap(models, family, variant, calib_file, out, expect_ok=True):
    d, files = models[family]
    r = compress(files[variant], out, "--experts", N_KEEP[family], "--method", "reap", "--calib", calib_file,
                 "--refit", "off", "--tokenizer", str(d), expect_ok=expect_ok)
    return files[variant], r


@pytest.mark.parametrize("family,variant", [("glm4_moe", "Q8_0"), ("deepseek_v3", "legacy"),
                                            ("deepseek_v2", "legacy")])
def test_reap_output_is_an_independent_slice(models, calib_file, tmp_path, family, variant):
    src, _ = reap(models, family, variant, calib_file, tmp_path / "out")
    layers = slice_checked(src, tmp_path / "out", family)
    if family == "glm4_moe":  # the NextN layer is compressed too (its experts, router and bias cut alike)
        assert 3 in layers


def test_reap_keeps_split_mla_tensors(models, calib_file, tmp_path):
    """DeepSeek's kv_b_proj, stored by today's converter as attn_k_b + attn_v_b: both parts copied as stored."""
    src, _ = reap(models, "deepseek_v3", "Q8_0", calib_file, tmp_path / "out")
    slice_checked(src, tmp_path / "out", "deepseek_v3")


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_out_format_gguf_equals_the_exported_safetensors_output(models, calib_file, tmp_path, family):
    """`compress --out-format gguf` writes, tensor for tensor, what the exporter makes of the safetensors output of
    the same run: the router's selection bias cut to the kept experts, MLA's kv_b_proj cut into attn_k_b / attn_v_b."""
    import gguf
    import numpy as np
    from test_compress import compress

    from ream_lite.checkpoint.gguf_export import export_gguf

    plain = models[family][0]
    args = ("--experts", N_KEEP[family], "--method", "reap", "--refit", "off", "--no-sequential", "--calib", calib_file)
    compress(plain, tmp_path / "st", *args)
    compress(plain, tmp_path / "gg", *args, "--out-format", "gguf", "--gguf-type", "Q8_0")
    export_gguf(tmp_path / "st", tmp_path / "exported.gguf", expert_type=8, other_type=8)
    a, b = gguf.GGUFReader(tmp_path / "exported.gguf"), gguf.GGUFReader(tmp_path / "gg" / f"{plain.name}.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for t, u in zip(a.tensors, b.tensors):
        assert t.tensor_type == u.tensor_type and np.array_equal(t.data, u.data), t.name


def with_metadata(g, **values):
    """The parsed GGUF `g` with metadata keys (`{arch}.` + key; None removes one) replaced."""
    fields = dict(g.fields)
    for key, v in values.items():
        key = f"{g.arch}.{key.replace('__', '.')}"
        if v is None:
            fields.pop(key, None)
        else:
            vtype = 8 if isinstance(v, str) else 6 if isinstance(v, float) else 7 if isinstance(v, bool) else 4
            fields[key] = Field(v, (vtype,))
    return dataclasses.replace(g, fields=fields)


@pytest.mark.parametrize("family,values,match", [
    ("deepseek_v2", {"expert_group_count": 4, "expert_group_used_count": 2}, "sum of its best two"),
    ("deepseek_v2", {"expert_weights_norm": True}, "never renormalises"),
    ("deepseek_v3", {"expert_gating_func": 4}, "neither softmax nor sigmoid"),
    ("glm4_moe", {"expert_gating_func": 1}, "sigmoid one"),
])
def test_refuses_what_transformers_cannot_run_as_llama_cpp_does(models, family, values, match):
    _, files = models[family]
    with GGUFCheckpoint(files["Q8_0"]) as r, pytest.raises(ReamLiteError, match=match):
        gguf_config(with_metadata(r.gguf, **values), r.arch, r.tensors)


def test_metadata_defaults_are_llama_cpps(models):
    """Keys llama.cpp's graph reads as 'off' when absent read so (transformers' DeepSeek-V3 defaults differ):
    no renormalisation, no scaling, no groups; deepseek2 without expert_gating_func is softmax (DeepSeek-V2); YaRN
    with DeepSeek's mscale."""
    _, files = models["deepseek_v3"]
    with GGUFCheckpoint(files["Q8_0"]) as r:
        g = with_metadata(r.gguf, expert_weights_norm=None, expert_weights_scale=None, expert_group_count=None,
                          expert_group_used_count=None)
        cfg = gguf_config(g, r.arch, r.tensors)
        assert (cfg["model_type"], cfg["norm_topk_prob"], cfg["routed_scaling_factor"], cfg["n_group"],
                cfg["topk_group"]) == ("deepseek_v3", False, 1.0, 1, 1)
        g = with_metadata(r.gguf, expert_gating_func=None, expert_weights_norm=None, expert_group_count=None)
        t = {k: v for k, v in r.tensors.items() if not k.endswith("e_score_correction_bias")}
        assert gguf_config(g, r.arch, t)["model_type"] == "deepseek_v2"
        # YaRN as llama.cpp reads DeepSeek's: mscale = mscale_all_dim = yarn_log_multiplier / 0.1
        g = with_metadata(r.gguf, rope__scaling__type="yarn", rope__scaling__factor=40.0,
                          rope__scaling__original_context_length=4096, rope__scaling__yarn_log_multiplier=0.0707)
        rope = gguf_config(g, r.arch, r.tensors)["rope_parameters"]
        assert rope["rope_type"] == "yarn" and rope["factor"] == 40.0 and \
            rope["original_max_position_embeddings"] == 4096
        assert rope["mscale"] == rope["mscale_all_dim"] == pytest.approx(0.707)


def test_old_per_expert_mixtral_files_are_refused_with_their_reason():
    from ream_lite.checkpoint.gguf import GGUFFile, arch_of

    with pytest.raises(ReamLiteError, match="re-convert it"):
        arch_of(GGUFFile([], "mixtral", {}, [], 32), "x.gguf")
