"""bitsandbytes 4-bit through compress: `--quantize nf4|fp4` outputs that transformers loads as 4-bit, and bnb-4bit
MoE checkpoints (experts quantized per expert, as transformers 4 wrote them) as input, written back in kind.

Oracles: transformers quantizing the unquantized output in memory (BitsAndBytesConfig), and transformers on a plain
copy holding the decoded values."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import VOCAB, build_model, save_model
from transformers import AutoModelForCausalLM

from ream_lite.checkpoint.bnb4 import encode_bnb4
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.cli import main
from ream_lite.testing import write_decoded_copy

pytest.importorskip("bitsandbytes")

# every Linear with in_features a multiple of 64 and out_features of 32: what bitsandbytes' CPU kernels need
TINY = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_model("qwen3_moe", **TINY).to(torch.bfloat16)
    return model, save_model(model, tmp_path_factory.mktemp("bnb-src") / "src")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(4))


def compress(src, out, *args):
    r = CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "8", *args])
    assert r.exit_code == 0, r.output
    return r


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("quant_type,double", [("nf4", False), ("fp4", True)])
def test_quantized_output_loads_as_transformers_would_quantize_it(tiny, ids, tmp_path, quant_type, double):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    _, src = tiny
    flags = ["--quantize", quant_type, *(["--double-quant"] if double else [])]
    compress(src, tmp_path / "q", "--experts", "4", "--method", "reap", *flags)
    compress(src, tmp_path / "plain", "--experts", "4", "--method", "reap")
    plan_q, plan_p = (json.loads((tmp_path / d / "ream_plan.json").read_text())["layers"] for d in ("q", "plain"))
    assert [L["kept"] for L in plan_q] == [L["kept"] for L in plan_p]  # quantizing happens after the decisions
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == quant_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qkvo"}
    assert loaded.config.num_experts == 4
    inmem = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16,
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                     bnb_4bit_use_double_quant=double,
                                                     bnb_4bit_compute_dtype=torch.bfloat16,
                                                     llm_int8_skip_modules=["lm_head"]))
    got, ref = logits(loaded, ids), logits(inmem, ids)
    if double:  # (bitsandbytes' CPU search for the 8-bit statistics codes is approximate: see test_bnb4.py)
        assert ((got - ref).norm() / ref.norm()).item() < 0.02
    else:
        assert torch.equal(got, ref)
    # 4-bit output: smaller than the bf16 one by the attention weights' bytes
    q_bytes, p_bytes = CheckpointReader(tmp_path / "q").total_bytes(), CheckpointReader(tmp_path / "plain").total_bytes()
    assert q_bytes < p_bytes


def bnb_moe_checkpoint(src, out, quant_type="nf4"):
    """`src` with every Linear weight of the layers (experts per expert included, router and norms not) in bnb 4-bit,
    as transformers 4 saved bnb MoE models; config with its quantization_config."""
    from ream_lite.checkpoint.bnb4 import bnb4_quantization_config

    r = CheckpointReader(src)
    w = CheckpointWriter(out)
    for k in r.keys():
        t = r.get(k)
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            for name, v in encode_bnb4(k, t, quant_type).items():
                w.add(name, v)
        else:
            w.add(k, t)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = bnb4_quantization_config(quant_type, torch.bfloat16, 64, False, ["lm_head"])
    return w.finish(cfg, source_dir=src)


def test_bnb_moe_input_is_streamed_and_written_back_in_kind(tiny, ids, tmp_path, calib_file):
    from test_streamer import stream_logits

    _, src = tiny
    d = bnb_moe_checkpoint(src, tmp_path / "bnb")
    r = CheckpointReader(d)
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert r.entry(key).encoding == "bnb4" and r.shape(key) == (64, 16)
    # oracle: transformers on a plain copy holding the decoded values
    decoded = write_decoded_copy(d, tmp_path / "decoded")
    ref = logits(AutoModelForCausalLM.from_pretrained(decoded, dtype=torch.float32), ids)
    torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)

    compress(d, tmp_path / "out", "--experts", "4", "--method", "ream", "--guard", "off", "--calib", str(calib_file))
    b = CheckpointReader(tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    merged = 0
    for L in plan["layers"]:
        for pos, e in enumerate(L["kept"]):
            out_key = f"model.layers.{L['layer']}.mlp.experts.{pos}.down_proj.weight"
            assert b.entry(out_key).encoding == "bnb4"
            if len(L["groups"].get(str(e), {}).get("members", [])) > 1:
                merged += 1
                # written in kind, with the quant_state dtype of the input
                state = json.loads(bytes(b.read_part(b.entry(out_key).parts[".quant_state.bitsandbytes__nf4"])
                                         .tolist()))
                assert state["dtype"] == "bfloat16" and state["shape"] == [64, 16]
            else:
                assert b.read_raw(out_key) == r.read_raw(f"model.layers.{L['layer']}.mlp.experts.{e}.down_proj.weight")
    assert merged
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_quantize_is_refused_where_transformers_expects_another_layout(tmp_path):
    model = build_model("llama4_text") if "llama4_text" in __import__("tiny_models").FAMILIES else None
    if model is None:
        pytest.skip("llama4_text not among the tiny families")
    src = save_model(model, tmp_path / "src")
    r = CliRunner().invoke(main, ["compress", str(src), str(tmp_path / "out"), "--experts", "2", "--quantize", "nf4",
                                  "--seq-len", "16", "--num-sequences", "4"])
    assert r.exit_code == 2 and "--quantize" in r.output and "Traceback" not in r.output
