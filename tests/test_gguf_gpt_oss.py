"""GGUFs of llama.cpp's gpt-oss architecture: a tiny gpt-oss written as llama.cpp's converter writes it
(checkpoint/gguf_export.py: the fused, gate/up-interleaved, input-major experts as separate output-major
ffn_gate_exps / ffn_up_exps / ffn_down_exps tensors with their biases, the router's bias, attention sinks, metadata),
read back as the transformers checkpoint it holds (each fused tensor one logical tensor whose stored parts are those
GGUF tensors, joined on read), and compressed into a GGUF of the same layout (kept experts' blocks copied part by
part, merged experts cut into the parts and quantized to each part's type)."""

import json

import numpy as np
import pytest
import torch
from test_compress import compress
from test_gguf import decoded_model
from test_gguf_families import with_metadata
from test_streamer import stream_logits
from tiny_models import VOCAB, _randomize, family_config, reference_logits, save_model

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint import CheckpointReader, stored
from ream_lite.checkpoint.gguf import GGUFCheckpoint, gguf_config
from ream_lite.checkpoint.gguf_export import export_gguf
from ream_lite.errors import ReamLiteError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# rows of whole blocks: hidden 64 (gate / up rows, attention), intermediate 256 (down rows: K-quants' 256-value
# super-blocks); 2I = 512 != H and I != H / 2, so neither the orientation nor the interleave fits another reading.
# swiglu_limit 7.0 and a truncated YaRN: what llama.cpp's graph hard-codes (GGUFs hold nothing else)
NARROW = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "intermediate_size": 256, "swiglu_limit": 7.0}
N_KEEP = 4
EXPERTS = "model.layers.{}.mlp.experts.{}"
FUSED = ("gate_up_proj", "gate_up_proj_bias", "down_proj")
UP = ":ffn_up_exps.weight"
# gate, up and down of one expert tensor in different types (real GGUFs mix types by tensor)
MIXED = {"ffn_gate_exps.weight": Q.MXFP4, "ffn_up_exps.weight": Q.Q8_0, "ffn_down_exps.weight": Q.Q5_K}


def narrow_model():
    """The tiny gpt_oss at the NARROW shape, with router biases that change the choice and gate / up weights large
    enough for the clamps at 7 to bite."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = {k: v for k, v in family_config("gpt_oss").to_dict().items() if k != "layer_types"}
    cfg.update(NARROW)
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "truncate": True}
    torch.manual_seed(0)
    model = _randomize(AutoModelForCausalLM.from_config(GptOssConfig(**cfg), dtype=torch.float32).eval())
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias.copy_(torch.randn(layer.mlp.router.bias.shape, generator=g))
            layer.mlp.experts.gate_up_proj.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(safetensors dir, {variant: GGUF path}): F32 throughout; Q8_0 throughout (norms, biases, sinks, routers F32);
    MXFP4 experts (as the releases) and Q8_0 the rest; and MIXED expert types."""
    from ream_lite.checkpoint import gguf_export

    root = tmp_path_factory.mktemp("gguf_gpt_oss")
    d = save_model(narrow_model(), root / "gpt_oss")
    files = {t: export_gguf(d, root / f"gpt-oss-{t}.gguf", expert_type=e, other_type=o)
             for t, (e, o) in {"F32": (Q.F32, Q.F32), "Q8_0": (Q.Q8_0, Q.Q8_0), "MXFP4": (Q.MXFP4, Q.Q8_0)}.items()}
    choose = gguf_export.choose_type

    def mixed(gname, shape, expert_type, other_type):
        return MIXED.get(gname.split(".", 2)[-1], choose(gname, shape, expert_type, other_type))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gguf_export, "choose_type", mixed)
        files["mixed"] = export_gguf(d, root / "gpt-oss-mixed.gguf", expert_type=Q.Q8_0, other_type=Q.Q8_0)
    return d, files


def tensors_of(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def dequantized(t) -> torch.Tensor:
    """gguf-py's own dequantization of a GGUF tensor (torch shape)."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def test_layout_equals_the_safetensors_twin(models):
    d, files = models
    a = ModelLayout(str(d))
    for variant, path in files.items():
        b = ModelLayout(str(path))
        assert b.reader.gguf.arch == "gpt-oss" and b.spec is a.spec, variant
        assert b.router_config == a.router_config, variant
        assert set(a.reader.keys()) == set(b.reader.keys()), variant
        assert all(a.reader.shape(k) == b.reader.shape(k) for k in sorted(a.reader.keys())), variant
        assert [(x.index, x.is_moe, x.num_experts, x.expert_storage) for x in b.layers] == \
            [(x.index, x.is_moe, x.num_experts, x.expert_storage) for x in a.layers] == \
            [(i, True, 8, "fused") for i in range(3)], variant
        ca, cb = a.hf_config().to_dict(), b.hf_config().to_dict()
        keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "num_local_experts", "num_experts_per_tok", "sliding_window", "layer_types",
                "rope_parameters", "swiglu_limit", "swiglu_alpha", "attention_bias", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings"]
        assert {k: cb[k] for k in keys} == {k: ca[k] for k in keys}, variant
        assert cb["rms_norm_eps"] == pytest.approx(ca["rms_norm_eps"])  # (a float32 in the metadata)
        assert b.hf_config()._attn_implementation == "eager"
        b.close()
    a.close()


@pytest.mark.parametrize("variant", ["F32", "Q8_0", "MXFP4", "mixed"])
def test_values_are_the_checkpoint_s(models, variant):
    """Every tensor read from the F32 GGUF is the safetensors tensor bit for bit (the fused experts joined back from
    ffn_gate_exps / ffn_up_exps / ffn_down_exps); from the others, within their types' rounding."""
    d, files = models
    a = CheckpointReader(d)
    with GGUFCheckpoint(files[variant]) as r:
        for k in sorted(a.keys()):
            x, y = a.get(k, dtype=torch.float32), r.get(k, dtype=torch.float32)
            if variant == "F32":
                assert torch.equal(x, y), k
            else:  # (MXFP4: 2 significant bits, the scale a power of two)
                assert (x - y).abs().max() <= x.abs().max() / 4 + 1e-6, (variant, k)
                assert (x - y).norm() <= 0.2 * x.norm(), (variant, k)


@pytest.mark.parametrize("variant", ["MXFP4", "mixed"])
def test_fused_experts_are_the_gguf_tensors_joined(models, variant):
    """gate_up_proj is one logical tensor whose parts are ffn_gate_exps (main) and ffn_up_exps, each decoded in its own
    type: gate at columns 0::2, up at 1::2 of transformers' input-major [E, H, 2I]; its bias likewise; down_proj is
    ffn_down_exps transposed. Equal to gguf-py's dequantization of the GGUF tensors; a range of experts equals those
    rows of the whole."""
    _, files = models
    g = tensors_of(files[variant])
    with GGUFCheckpoint(files[variant]) as r:
        key = EXPERTS.format(1, "gate_up_proj")
        t = r.entry(key)
        assert list(t.parts) == ["", UP] and t.shape == (8, 64, 512)
        assert t.block == tuple(int(g[f"blk.1.{n}"].tensor_type) for n in ("ffn_gate_exps.weight",
                                                                           "ffn_up_exps.weight"))
        assert t.nbytes == int(g["blk.1.ffn_gate_exps.weight"].n_bytes) + int(g["blk.1.ffn_up_exps.weight"].n_bytes)
        gate, up = dequantized(g["blk.1.ffn_gate_exps.weight"]), dequantized(g["blk.1.ffn_up_exps.weight"])
        want = torch.empty(8, 64, 512)
        want[:, :, 0::2], want[:, :, 1::2] = gate.transpose(1, 2), up.transpose(1, 2)
        assert torch.equal(r.get(key), want)
        bias = torch.empty(8, 512)
        bias[:, 0::2], bias[:, 1::2] = dequantized(g["blk.1.ffn_gate_exps.bias"]), \
            dequantized(g["blk.1.ffn_up_exps.bias"])
        assert torch.equal(r.get(EXPERTS.format(1, "gate_up_proj_bias")), bias)
        assert torch.equal(r.get(EXPERTS.format(1, "down_proj")), dequantized(g["blk.1.ffn_down_exps.weight"])
                           .transpose(1, 2))
        assert torch.equal(r.get(EXPERTS.format(1, "down_proj_bias")), dequantized(g["blk.1.ffn_down_exps.bias"]))
        for name in (*FUSED, "down_proj_bias"):
            k = EXPERTS.format(2, name)
            whole = r.get(k)
            for a, b in ((0, 8), (2, 5), (7, 8), (3, 3)):
                assert torch.equal(r.get(k, rows=(a, b)), whole[a:b]), (name, a, b)


@pytest.mark.parametrize("variant", ["F32", "mixed"])
def test_encoding_cuts_into_the_parts_each_in_its_type(models, variant):
    """A joined tensor's values encoded as stored (a merged expert) are one entry per GGUF tensor under its part name:
    the values de-interleaved (and transposed) as llama.cpp's converter cuts them, each in that tensor's type; decoded,
    they are the values a reader of the output gets. An expert's own values encode to its stored bytes where the type
    re-encodes its values exactly (not Q5_K)."""
    from ream_lite.checkpoint.ggml_blocks import encode

    _, files = models
    g = tensors_of(files[variant])
    with GGUFCheckpoint(files[variant]) as r:
        for name, gnames in (("gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight")),
                             ("gate_up_proj_bias", ("ffn_gate_exps.bias", "ffn_up_exps.bias")),
                             ("down_proj", ("ffn_down_exps.weight",))):
            key = EXPERTS.format(0, name)
            like = r.entry(key)
            value = r.get(key, rows=(3, 4))
            enc = stored.encode(like, key, value)
            assert list(enc) == [like.part_name(sfx, key) for sfx in like.parts] == \
                [key if i == 0 else f"{key}:{n}" for i, n in enumerate(gnames)]
            for (sfx, part), gname in zip(like.parts.items(), gnames):
                t = g[f"blk.0.{gname}"]
                want = dequantized(t)[3:4]
                if t.tensor_type not in (Q.F32, Q.F16):
                    want = encode(t.tensor_type, want)
                got = enc[like.part_name(sfx, key)]
                assert got.dtype == part.torch_dtype and torch.equal(got, want), (name, sfx)
                if t.tensor_type != Q.Q5_K:
                    assert torch.equal(got, r.read_part(part, rows=(3, 4))), (name, sfx)
            back = stored.decode(like, {stored.part_suffix(k, key): v for k, v in enc.items()}, None)
            assert back.shape == value.shape and (variant != "F32" or torch.equal(back, value)), name


@pytest.mark.parametrize("variant", ["F32", "Q8_0", "MXFP4", "mixed"])
def test_streamed_logits_equal_transformers_on_the_dequantized_weights(models, variant, tmp_path):
    """Sequences longer than the sliding window (6): sliding and full layers as llama.cpp alternates them."""
    plain, files = models
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(decoded_model(files[variant], plain, tmp_path), ids)
    torch.testing.assert_close(stream_logits(files[variant], ids), ref, atol=1e-4, rtol=1e-4)


def reap(models, variant, calib_file, out, *args):
    d, files = models
    compress(files[variant], out, "--experts", N_KEEP, "--calib", calib_file, "--refit", "off", "--tokenizer", str(d),
             *(args or ("--method", "reap")))
    return files[variant]


def test_reap_output_is_an_independent_slice(models, calib_file, tmp_path):
    """Every tensor of the output GGUF is the input's, bytes unchanged: the kept experts' rows of ffn_gate_exps,
    ffn_up_exps, ffn_down_exps and their biases, the router's kept rows and bias, the rest whole; the metadata is the
    input's with the expert count and a record."""
    src = reap(models, "mixed", calib_file, tmp_path / "out")
    produced = tmp_path / "out" / src.name
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(produced)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    layers = {L["layer"]: L["kept"] for L in json.loads((tmp_path / "out" / "ream_plan.json").read_text())["layers"]}
    assert sorted(layers) == [0, 1, 2]
    sliced = 0
    for name, t in ta.items():
        u = tb[name]
        assert u.tensor_type == t.tensor_type, name
        if "_exps." in name or "ffn_gate_inp." in name:
            assert np.array_equal(np.take(t.data, layers[int(name.split(".")[1])], axis=0), u.data), name
            sliced += 1
        else:
            assert np.array_equal(t.data, u.data), name
    assert sliced == 3 * 8
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert fb.pop("gpt-oss.expert_count") == N_KEEP and fa.pop("gpt-oss.expert_count") == 8
    record = {k: fb.pop(k) for k in list(fb) if k.startswith("ream_lite.")}
    assert fa == fb and record["ream_lite.method"] == "reap"
    layout = ModelLayout(str(produced))
    assert layout.router_config.num_experts == N_KEEP
    assert torch.isfinite(stream_logits(produced, torch.randint(0, VOCAB, (1, 9)))).all()
    layout.close()


def test_ream_on_the_f32_gguf_writes_what_ream_on_its_safetensors_twin_writes(models, calib_file, tmp_path):
    """The same plans, and merged experts written back into ffn_gate_exps / ffn_up_exps / ffn_down_exps (and the
    biases) that read back as the safetensors output's fused tensors, bit for bit."""
    d, files = models
    args = ("--experts", N_KEEP, "--method", "ream", "--guard", "off", "--refit", "off", "--calib", calib_file)
    compress(d, tmp_path / "st", *args)
    compress(files["F32"], tmp_path / "gg", *args, "--tokenizer", str(d))
    plans = [json.loads((tmp_path / o / "ream_plan.json").read_text())["layers"] for o in ("st", "gg")]
    assert [(L["kept"], L["groups"]) for L in plans[0]] == [(L["kept"], L["groups"]) for L in plans[1]]
    assert any(len(m["members"]) > 1 for L in plans[0] for m in L["groups"].values())
    a, b = CheckpointReader(tmp_path / "st"), GGUFCheckpoint(tmp_path / "gg" / files["F32"].name)
    assert set(a.keys()) == set(b.keys())
    for k in sorted(a.keys()):
        assert torch.equal(a.get(k), b.get(k)), k
    b.close()


def test_merged_experts_are_written_as_the_engine_ran_them(models, calib_file, tmp_path, monkeypatch):
    """Merged experts of a GGUF with MXFP4 gate, Q8_0 up and Q5_K down rows (whose re-quantization of its own values
    is not always idempotent): what the output holds is exactly `merged_as_written`'s values, which the sequential pass
    and the guard ran; the other kept experts are their stored bytes."""
    from ream_lite.methods import apply
    from ream_lite.written import merged_as_written

    ran = {}

    def recording(layout, layer, centroid, position, tensors, output, dtype):
        out = merged_as_written(layout, layer, centroid, position, tensors, output, dtype)
        ran[(layer, position)] = [t.clone() for t in out]
        return out

    monkeypatch.setattr(apply, "merged_as_written", recording)
    src = reap(models, "mixed", calib_file, tmp_path / "out", "--method", "ream", "--guard", "off")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())["layers"]
    merged = {(L["layer"], L["kept"].index(int(c))) for L in plan for c, g in L["groups"].items()
              if len(g["members"]) > 1}
    assert merged and merged <= set(ran)
    from ream_lite.engine.experts import load_experts

    out, a = ModelLayout(str(tmp_path / "out" / src.name)), GGUFCheckpoint(src)
    for L in plan:
        i = L["layer"]
        w = load_experts(out, i, list(range(N_KEEP)), torch.float32, "cpu")
        for pos, e in enumerate(L["kept"]):
            if (i, pos) in merged:
                for got, want in zip(w.expert(pos), ran[(i, pos)]):
                    assert torch.equal(got, want.float()), (i, pos)
            else:
                for name in FUSED:
                    like = a.entry(EXPERTS.format(i, name))
                    for sfx, part in like.parts.items():
                        o = out.reader.entry(EXPERTS.format(i, name)).parts[sfx]
                        assert torch.equal(out.reader.read_part(o, rows=(pos, pos + 1)),
                                           a.read_part(part, rows=(e, e + 1))), (i, pos, name, sfx)
    out.close(), a.close()


def test_metadata_as_llama_cpp_reads_it(models):
    """Which layers slide: llama.cpp's default period 2 (even layers), another period, or a flag per layer; YaRN
    truncated as ggml computes it; the SwiGLU constants llama.cpp hard-codes; refusals of what transformers cannot
    run as llama.cpp does."""
    _, files = models
    with GGUFCheckpoint(files["Q8_0"]) as r:
        def cfg(**values):
            return gguf_config(with_metadata(r.gguf, **values), r.arch, r.tensors)

        base = cfg()
        assert base["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
        assert base["rope_parameters"]["truncate"] is True and base["rope_parameters"]["rope_type"] == "yarn"
        assert (base["swiglu_limit"], base["swiglu_alpha"], base["sliding_window"]) == (7.0, 1.702, 6)
        assert base["architectures"] == ["GptOssForCausalLM"] and base["num_local_experts"] == 8
        assert cfg(attention__sliding_window_pattern=3)["layer_types"] == \
            ["sliding_attention", "sliding_attention", "full_attention"]
        assert cfg(attention__sliding_window_pattern=0)["layer_types"] == ["sliding_attention"] * 3
        with pytest.raises(ReamLiteError, match="sliding_window"):
            cfg(attention__sliding_window=None)
        with pytest.raises(ReamLiteError, match="rotary base"):
            cfg(rope__freq_base_swa=10000.0)


def test_exporter_writes_other_sliding_layers_and_refuses_other_swiglu_constants(tmp_path):
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = {k: v for k, v in family_config("gpt_oss").to_dict().items() if k != "layer_types"}
    cfg.update(NARROW, layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    model = AutoModelForCausalLM.from_config(GptOssConfig(**cfg), dtype=torch.float32)
    d = save_model(model, tmp_path / "m")
    path = export_gguf(d, tmp_path / "m.gguf", expert_type=Q.Q8_0, other_type=Q.Q8_0)
    fields = gguf.GGUFReader(path).fields
    assert list(fields["gpt-oss.attention.sliding_window_pattern"].contents()) == [False, True, True]
    with GGUFCheckpoint(path) as r:
        assert r.config()["layer_types"] == cfg["layer_types"]
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "swiglu_limit": 1.0}))
    with pytest.raises(ReamLiteError, match="hard-codes 7.0"):
        export_gguf(d, tmp_path / "x.gguf")


def test_out_format_gguf_is_refused_with_its_reason(models, calib_file, tmp_path):
    d, _ = models
    r = compress(d, tmp_path / "out", "--experts", N_KEEP, "--method", "reap", "--calib", calib_file,
                 "--out-format", "gguf", expect_ok=False)
    assert r.exit_code != 0 and "not supported for gpt_oss" in r.output


@pytest.mark.parametrize("drop,match", [("blk.1.ffn_up_exps.weight", "ffn_up_exps.weight is missing"),
                                        ("blk.2.ffn_gate_exps.bias", "ffn_gate_exps.bias is missing")])
def test_incomplete_experts_are_refused(models, tmp_path, monkeypatch, drop, match):
    """A GGUF missing one of the tensors a fused expert tensor is made of is refused when read, naming it."""
    from ream_lite.checkpoint import gguf_export

    d, _ = models
    plan = gguf_export.gguf_tensor_plan
    monkeypatch.setattr(gguf_export, "gguf_tensor_plan", lambda *a: [p for p in plan(*a) if p[0] != drop])
    path = export_gguf(d, tmp_path / "x.gguf", expert_type=Q.Q8_0, other_type=Q.Q8_0)
    with pytest.raises(ReamLiteError, match=match):
        ModelLayout(str(path))
