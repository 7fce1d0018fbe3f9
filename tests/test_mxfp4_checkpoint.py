"""gpt-oss as released: MXFP4 routed experts (`*_blocks` + `*_scales`), read as logical tensors and written back in
kind. Oracle: transformers' own MXFP4 loader, which dequantizes on a CPU."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import VOCAB, build_model, reference_logits, save_model
from transformers import AutoModelForCausalLM

from ream_lite.checkpoint.mxfp4 import encode_mxfp4
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.cli import main

# gpt-oss-20b's quantization_config: experts in MXFP4, everything else bf16
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def mxfp4_release(src, out):
    """`src` (a gpt_oss checkpoint in the bf16 release's layout) with its fused experts in MXFP4 as the release
    stores them: the transpose of each [E, in, out] tensor packed in blocks of 32 along `in`."""
    r = CheckpointReader(src)
    w = CheckpointWriter(out)
    for k in r.keys():
        t = r.get(k)
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = encode_mxfp4(t.float().transpose(-1, -2).contiguous())
            w.add(k + "_blocks", blocks)
            w.add(k + "_scales", scales)
        else:
            w.add(k, t)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = MXFP4_CONFIG
    return w.finish(cfg, source_dir=src)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    # hidden 64 and 32 neurons per expert: MXFP4 blocks of 32 along both input dimensions
    model = build_model("gpt_oss", hidden_size=64, intermediate_size=32)
    d = tmp_path_factory.mktemp("gpt-oss")
    return mxfp4_release(save_model(model, d / "src"), d / "mxfp4")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(6))


def transformers_logits(directory, ids):
    from transformers import Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    return reference_logits(model, ids)


def compress(src, out, *args):
    r = CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "8", *args])
    assert r.exit_code == 0, r.output
    return r


def test_release_reads_as_the_bf16_layout_and_streams_like_transformers(release, ids):
    from test_streamer import stream_logits

    r = CheckpointReader(release)
    t = r.entry("model.layers.0.mlp.experts.gate_up_proj")
    assert t.encoding == "mxfp4" and t.shape == (8, 64, 64) and set(t.parts) == {"_blocks", "_scales"}
    assert r.shape("model.layers.0.mlp.experts.down_proj") == (8, 32, 64)
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" not in r
    torch.testing.assert_close(stream_logits(release, ids), transformers_logits(release, ids), atol=1e-4, rtol=1e-4)


def test_pruned_release_stays_mxfp4_and_loads(release, ids, tmp_path):
    from test_streamer import stream_logits

    compress(release, tmp_path / "out", "--experts", "4", "--method", "reap")
    a, b = CheckpointReader(release), CheckpointReader(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == MXFP4_CONFIG
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    for L in plan["layers"]:
        key = f"model.layers.{L['layer']}.mlp.experts.down_proj"
        assert b.entry(key).encoding == "mxfp4" and b.shape(key) == (4, 32, 64)
        for sfx in ("_blocks", "_scales"):  # kept experts: their stored rows, byte for byte
            kept = a.read_part(a.entry(key).parts[sfx])[L["kept"]]
            assert torch.equal(b.read_part(b.entry(key).parts[sfx]), kept)
    torch.testing.assert_close(stream_logits(tmp_path / "out", ids), transformers_logits(tmp_path / "out", ids),
                               atol=1e-4, rtol=1e-4)
    for L in plan["layers"]:  # half the experts: half the MXFP4 bytes (blocks and scales)
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{L['layer']}.mlp.experts.{name}"
            assert b.entry(key).nbytes * 2 == a.entry(key).nbytes


def test_merged_release_is_reencoded_and_apply_reproduces_it(release, ids, tmp_path, calib_file):
    from test_streamer import stream_logits

    compress(release, tmp_path / "out", "--experts", "4", "--method", "ream", "--guard", "off",
             "--calib", str(calib_file))
    b = CheckpointReader(tmp_path / "out")
    assert b.entry("model.layers.1.mlp.experts.gate_up_proj").encoding == "mxfp4"
    torch.testing.assert_close(stream_logits(tmp_path / "out", ids), transformers_logits(tmp_path / "out", ids),
                               atol=1e-4, rtol=1e-4)
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out"), str(release), str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    again = CheckpointReader(tmp_path / "again")
    assert sorted(again.keys()) == sorted(b.keys()) and all(again.read_raw(k) == b.read_raw(k) for k in b.keys())


def test_out_dtype_bf16_decodes_the_experts(release, tmp_path):
    compress(release, tmp_path / "out", "--experts", "4", "--method", "reap", "--out-dtype", "bf16")
    b = CheckpointReader(tmp_path / "out")
    assert b.encodings == {"plain"}
    assert b.entry("model.layers.0.mlp.experts.gate_up_proj").dtype == "BF16"
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads as a plain bf16 model


def test_gpt_oss_120b_mxfp4_shape_inspects_and_plans_into_24gb(tmp_path, monkeypatch):
    """gpt-oss-120b's real layer shapes as released (MXFP4 experts; headers over sparse data): `inspect` counts
    blocks, scales and biases, `plan` fits REAP and the paper's REAM into a 24 GB card (6.4 GB of decoded experts
    per layer), and the output is the kept experts' stored bytes plus the rest."""
    import sys
    from pathlib import Path

    from test_plan import estimate

    from ream_lite.arch import ModelLayout
    from ream_lite.engine.budget import GiB
    from ream_lite.inspect_model import describe
    from ream_lite.sparse_checkpoint import write_sparse_checkpoint

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("CUDA API called"))
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import gpt_oss_120b

    src = write_sparse_checkpoint(gpt_oss_120b(2), tmp_path / "gpt-oss", mxfp4=True)
    d = describe(ModelLayout(str(src)))
    assert d["family"] == "gpt_oss" and d["quantization"] == "mxfp4" and d["expert_storage"] == ["fused"]
    h = i = 2880
    # gate_up and down: half a byte per value plus a scale byte per 32; bf16 biases
    per_expert = (2 * i * h // 2 + 2 * i * h // 32) + (h * i // 2 + h * i // 32) + (2 * i + h) * 2
    assert [x["expert_bytes"] for x in d["layers"]] == [128 * per_expert] * 2
    for method in ({"method": "reap"}, {"method": "ream", "guard": "off"}):
        est = estimate(src, 64, stream={"device": "cuda", "max_gpu_memory": 24 * GiB}, **method)
        assert est.peak_device_bytes <= 24 * GiB
        router_rows = 64 * (h * 2 + 2)  # bf16 weight rows and bias entries of the removed experts
        assert est.output_bytes == est.input_bytes - 2 * (64 * per_expert + router_rows)
