"""Multimodal releases of supported text families (Qwen3.5-MoE `qwen3_5_moe`, Llama-4 `llama4`, and Qwen3-VL-MoE
`qwen3_vl_moe` and Step-3.7 `step3p7`, whose text models have no causal-LM class of their own), compressed as
released: the text model under the wrapper's key prefix and text_config, the vision tower and projector copied byte
for byte, the output's config.json still the wrapper's (text_config edited), loadable with the wrapper class.

The Qwen3.5 tiny checkpoint also carries an `mtp.*` block, as the releases do: kept at the checkpoint's top level and
compressed as for the text model (test_families_hybrid), its layer the MoE layer after the decoder layers.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_compress import compress, masked_reference
from test_eval import write_data
from test_streamer import assert_loads_and_streams_as_transformers_runs_it, stream_logits
from tiny_models import MULTIMODAL, VOCAB, build_multimodal, reference_logits, save_model
from transformers import AutoModelForImageTextToText, AutoTokenizer

from ream_lite.arch import ModelLayout
from ream_lite.calib.text import domain_windows, read_documents
from ream_lite.checkpoint import CheckpointReader
from ream_lite.cli import main
from ream_lite.errors import ReamLiteError
from ream_lite.evaluate import evaluate

WRAPPERS = list(MULTIMODAL)
# where transformers 5 writes the text model of each wrapper: decoder prefix, lm_head; and the vision side
PREFIXES = {"qwen3_5_moe": ("model.language_model.", "lm_head.weight", ("model.visual.",)),
            "llama4": ("language_model.model.", "language_model.lm_head.weight",
                       ("vision_model.", "multi_modal_projector.")),
            "qwen3_vl_moe": ("model.language_model.", "lm_head.weight", ("model.visual.",)),
            "step3p7": ("model.", "lm_head.weight", ("vision_model.", "vit_large_projector."))}
# (Qwen3.5: 3 is its MTP layer, mtp.layers.0)
MOE_LAYERS = {"qwen3_5_moe": [0, 1, 2, 3], "llama4": [1, 3], "qwen3_vl_moe": [1, 2], "step3p7": [1, 2]}
EXPERTS_KEY = {"qwen3_5_moe": "num_experts", "step3p7": "n_routed_experts"}  # (others: num_local_experts)


def add_mtp_block(d):
    """An `mtp.*` block as the Qwen3.5 releases carry it (transformers neither builds nor saves it), with
    text_config.mtp_num_hidden_layers = 1."""
    sd = load_file(str(d / "model.safetensors"))
    for k, v in list(sd.items()):
        if k.startswith("model.language_model.layers.1."):
            sd[k.replace("model.language_model.layers.1.", "mtp.layers.0.")] = v.clone()
    sd["mtp.fc.weight"] = 0.1 * torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for name in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        sd[f"mtp.{name}.weight"] = torch.zeros(32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def mm_dirs(tmp_path_factory):
    """wrapper model_type -> (the transformers model, its directory as save_pretrained writes it, plus a processor
    side file; the Qwen3.5 one with an mtp.* block)."""
    out = {}
    for wrapper in WRAPPERS:
        model = build_multimodal(wrapper)
        # (Qwen3-VL-MoE: its experts input-major, as the releases store them)
        d = save_model(model, tmp_path_factory.mktemp(wrapper), "input_major" if wrapper == "qwen3_vl_moe" else
                       "per_expert")
        (d / "preprocessor_config.json").write_text('{"image_processor_type": "tiny"}\n')
        if wrapper == "qwen3_5_moe":
            add_mtp_block(d)
        out[wrapper] = (model, d)
    return out


def text_ppl(model, windows):
    """Perplexity of transformers' wrapper model over token windows (text only)."""
    nll, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(reference_logits(model, w[None])[0, :-1], -1)
        nll -= float(logp.gather(-1, w[1:, None]).sum())
        n += len(w) - 1
    return math.exp(nll / n), n


def text_keys_only(keys, wrapper) -> bool:
    return all(k.startswith(PREFIXES[wrapper][0] + "layers.") for k in keys)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_layout_finds_the_text_model_under_the_wrapper_prefix(mm_dirs, wrapper):
    model, d = mm_dirs[wrapper]
    decoder, lm_head, vision = PREFIXES[wrapper]
    layout = ModelLayout(str(d))
    spec = layout.spec
    assert layout.multimodal == wrapper and spec.model_type == MULTIMODAL[wrapper]
    assert (spec.layers_prefix, spec.embed_key, spec.final_norm_key, layout.lm_head_key) == (
        decoder + "layers", decoder + "embed_tokens.weight", decoder + "norm.weight", lm_head)
    # everything reads the text config: layers, hidden size, routing; the wrapper's dtype where text_config has none
    assert layout.config["model_type"] == MULTIMODAL[wrapper] and layout.config["dtype"] == "float32"
    assert layout.num_layers == model.config.text_config.num_hidden_layers
    assert [x.index for x in layout.moe_layers] == MOE_LAYERS[wrapper]
    assert layout.router_config.num_experts == 8 and layout.router_config.top_k == 2
    assert layout.hf_config().model_type == MULTIMODAL[wrapper]
    # the vision tower and projector are non-layer tensors, never a layer's
    keys = list(layout.reader.keys())
    vision_keys = [k for k in keys if k.startswith(vision)]
    assert vision_keys and not any(k.startswith(spec.layers_prefix + ".") for k in vision_keys)
    assert all(text_keys_only(layout.layer_keys(x.index), wrapper) for x in layout.decoder_layers)
    assert all(k.startswith("mtp.layers.0.") for x in layout.layers if x.is_mtp for k in layout.layer_keys(x.index))
    # the wrapper's config is kept for the output, its text_config without what the layout took from the wrapper
    wrapped = layout.wrap_config(dict(layout.config))
    assert wrapped == json.loads((d / "config.json").read_text())

    r = CliRunner().invoke(main, ["inspect", str(d), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["family"] == MULTIMODAL[wrapper] and info["multimodal"] == wrapper
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 0 and f"multimodal {wrapper} checkpoint" in r.output


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_streamed_text_logits_equal_the_wrapper_forward(mm_dirs, wrapper):
    """The streamer (the text family's decoder layers, filled from the wrapper's keys) == transformers'
    ForConditionalGeneration on token ids alone, float32."""
    model, d = mm_dirs[wrapper]
    ids = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(model, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_pruning_oracle(mm_dirs, calib_file, tmp_path, wrapper):
    """REAP to N/2: the output is the wrapper checkpoint (same config but text_config's expert count, loads with the
    wrapper class), its vision tensors are the input's bytes, and its text logits are the original wrapper's with
    the removed experts masked in the router."""
    _, src = mm_dirs[wrapper]
    out = tmp_path / "out"
    compress(src, out, "--experts", "4", "--method", "reap", "--calib", str(calib_file), "--refit", "off")
    plan = json.loads((out / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(8)) - set(L["kept"])) for L in plan["layers"]}
    assert sorted(removed) == MOE_LAYERS[wrapper] and all(len(v) == 4 for v in removed.values())

    before, after = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert after["model_type"] == wrapper and after["architectures"] == before["architectures"]
    assert after["vision_config"] == before["vision_config"]
    assert {k: v for k, v in after.items() if k != "text_config"} == \
        {k: v for k, v in before.items() if k != "text_config"}
    experts_key = EXPERTS_KEY.get(wrapper, "num_local_experts")
    edits = {experts_key: 4}
    assert after["text_config"] == {**before["text_config"], **edits}
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
    assert "AutoModelForImageTextToText.from_pretrained" in (out / "README.md").read_text()

    a, b = CheckpointReader(src), CheckpointReader(out)
    vision = PREFIXES[wrapper][2]
    va, vb = sorted(k for k in a.keys() if k.startswith(vision)), sorted(k for k in b.keys() if k.startswith(vision))
    assert va and va == vb
    assert all(a.read_raw(k) == b.read_raw(k) for k in va)
    if wrapper == "qwen3_5_moe":  # the MTP block kept at the top level, its MoE pruned with its own plan
        mtp = lambda r: {k for k in r.keys() if k.startswith("mtp.") and ".experts." not in k}  # noqa: E731
        assert mtp(a) == mtp(b) and all(a.read_raw(k) == b.read_raw(k) for k in mtp(a) if ".mlp.gate." not in k)
        assert b.shape("mtp.layers.0.mlp.gate.weight")[0] == 4

    pruned = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert type(pruned).__name__.endswith("ForConditionalGeneration")
    assert getattr(pruned.config.text_config, experts_key) == 4
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    # a fresh copy: the oracle patches routers (the decoder layers': transformers runs no MTP layer)
    n_dec = mm_dirs[wrapper][0].config.text_config.num_hidden_layers
    oracle = masked_reference(build_multimodal(wrapper), {i: v for i, v in removed.items() if i < n_dec}, ids)
    got = reference_logits(pruned, ids)
    torch.testing.assert_close(got, oracle, atol=1e-4, rtol=1e-4)
    assert (got - reference_logits(build_multimodal(wrapper), ids)).abs().max() > 1e-3  # pruning changed something


@pytest.mark.parametrize("wrapper", ["qwen3_5_moe", "qwen3_vl_moe", "step3p7"])
def test_guarded_ream_merge_loads_and_streams_as_transformers_runs_it(mm_dirs, calib_file, tmp_path, wrapper):
    """Guarded REAM (merges, sequential passes) on the Qwen3.5 and Qwen3-VL wrappers: the output loads with the
    wrapper class with the original's parameters, and the streamer's forward of it equals transformers' forward of
    it (Qwen3-VL: its fused experts written input-major, as they were read)."""
    model, src = mm_dirs[wrapper]
    out = tmp_path / "out"
    compress(src, out, "--experts", "5", "--method", "ream", "--calib", str(calib_file))
    layout = ModelLayout(str(out))
    assert layout.multimodal == wrapper and {x.num_experts for x in layout.moe_layers} == {5}
    if wrapper == "qwen3_vl_moe":
        assert layout.spec.fused_input_major
        assert CheckpointReader(out).shape("model.language_model.layers.1.mlp.experts.gate_up_proj") == (5, 32, 24)
    assert_loads_and_streams_as_transformers_runs_it(out, model, AutoModelForImageTextToText)


def test_qwen3_vl_moe_fused_orientation_is_read_from_the_shapes(mm_dirs, tmp_path):
    """The Qwen3-VL-MoE releases store experts input-major ([E, H, 2I] / [E, I, H]); transformers' save_pretrained
    writes them output-major; both load in transformers, so both are read (and written back) as they are stored,
    and shapes that fit neither are refused."""
    model, released = mm_dirs["qwen3_vl_moe"]
    saved = save_model(model, tmp_path / "saved")
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(model, ids)
    for d, input_major in ((released, True), (saved, False)):
        assert ModelLayout(str(d)).spec.fused_input_major is input_major
        torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)
    sd = load_file(str(saved / "model.safetensors"))
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    sd[key] = sd[key][:, :, :8].contiguous()
    save_file(sd, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ReamLiteError, match="neither"):
        ModelLayout(str(saved))


def test_plan_apply_and_eval(mm_dirs, calib_file, tmp_path):
    """`plan` from the headers, `apply` of a recorded plan reproduces compress's bytes and config, `eval`'s
    perplexity is transformers' (text only) for the Llama-4 wrapper."""
    model, src = mm_dirs["llama4"]
    r = CliRunner().invoke(main, ["plan", str(src), "--experts", "4"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "a" / "out"
    compress(src, out, "--experts", "4", "--method", "ream", "--guard", "off", "--calib", str(calib_file))
    again = tmp_path / "b" / "out"
    r = CliRunner().invoke(main, ["apply", str(out / "ream_plan.json"), str(src), str(again)])
    assert r.exit_code == 0, r.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text()) == json.loads((out / "config.json").read_text())

    data = write_data(tmp_path / "data.jsonl")
    res = evaluate(str(src), str(data), seq_len=32)
    windows = domain_windows(read_documents(data), AutoTokenizer.from_pretrained(src), 32)
    ppl, n = text_ppl(model, [w for ws in windows.values() for w in ws])
    assert res.overall["tokens"] == n and math.isclose(res.overall["perplexity"], ppl, rel_tol=1e-5)
    r = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--reference", str(src), "--seq-len", "32",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["overall"]["kl"] > 0


def test_text_config_inherits_dtype_and_quantization_but_the_output_does_not_gain_them(mm_dirs, tmp_path):
    """A text_config without dtype / quantization_config (written at the wrapper's top level) gets them for the
    layout (compute dtype, FP8 block size), and the output's text_config is written back without them."""
    from ream_lite.arch.layout import fp8_block_size, split_multimodal_config

    _, src = mm_dirs["llama4"]
    cfg = json.loads((src / "config.json").read_text())
    for k in ("dtype", "torch_dtype", "model_type"):
        cfg["text_config"].pop(k, None)
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    text, wrapper, inherited = split_multimodal_config(cfg)
    assert wrapper is cfg and set(inherited) == {"model_type", "dtype", "quantization_config"}
    assert text["model_type"] == "llama4_text" and text["dtype"] == "bfloat16"
    assert text["quantization_config"] == cfg["quantization_config"]
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    layout = ModelLayout(str(d))
    assert layout.config["dtype"] == "bfloat16" and fp8_block_size(layout.config) == (16, 16)
    assert layout.wrap_config({**layout.config, "num_local_experts": 4}) == \
        {**cfg, "text_config": {**cfg["text_config"], "num_local_experts": 4}}


def test_malformed_wrapper_and_quantize_are_refused(mm_dirs, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": {}}))
    with pytest.raises(ReamLiteError, match="no text_config"):
        ModelLayout(str(tmp_path))
    _, src = mm_dirs["llama4"]
    r = compress(src, tmp_path / "out", "--experts", "4", "--quantize", "nf4", expect_ok=False)
    assert r.exit_code == 2 and "multimodal 'llama4'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
