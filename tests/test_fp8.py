"""FP8 block-scaled checkpoints (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8 style): decoded on read, written back in kind.

Oracles: a hand-computed block example (the release convention, partial blocks included), transformers' own FP8
loader (which dequantizes on a CPU) for the streamed forward and for the outputs, and the pruning identity."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import VOCAB, build_model, reference_logits, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.checkpoint import fp8
from ream_lite.checkpoint.reader import CheckpointReader
from ream_lite.cli import main
from ream_lite.testing import convert_to_fp8

# every tiny-model dimension is a multiple of 8, so transformers' FP8 loader (which infers the block from the
# scale grid and cannot do partial blocks) is a valid oracle; partial blocks are tested by hand below
BLOCK = (8, 8)


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    """family -> (original float32 model, its FP8 block-scaled copy)."""
    out = {}
    for fam in ("qwen3_moe", "deepseek_v3"):
        d = tmp_path_factory.mktemp(f"fp8-{fam}")
        model = build_model(fam)
        out[fam] = (model, convert_to_fp8(save_model(model, d / "src"), d / "fp8", BLOCK))
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))


def transformers_logits(directory, ids):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return reference_logits(model, ids)


def test_decode_by_hand_with_partial_blocks():
    # a 3 x 5 weight in 2 x 2 blocks: scales [2, 3]; element (i, j) uses scale[i // 2, j // 2] (the last block row
    # and column are cropped), as DeepSeek's weight_dequant kernel does
    q = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]], dtype=torch.float32)
    s = torch.tensor([[1.0, 0.5, 2.0], [0.25, 4.0, 8.0]])
    want = torch.tensor([[1, 2, 1.5, 2, 10], [6, 7, 4, 4.5, 20], [2.75, 3, 52, 56, 120]])
    got = fp8.decode(q.to(torch.float8_e4m3fn), s, (2, 2), torch.float32)
    assert torch.equal(got, want)
    # a row slice starting inside a block: the scale rows covering it and the offset of its first row
    assert torch.equal(fp8.decode(q[1:].to(torch.float8_e4m3fn), s, (2, 2), torch.float32, row0=1), want[1:])


def test_encode_error_idempotence_and_bf16_exactness():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-3, 1, 300)[:, None]  # magnitudes vary by block
    q, s = fp8.encode(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # power-of-two scales
    v = fp8.decode(q, s, (128, 128), torch.float32)
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    # e4m3 rounding: half a step, 2^-4 relative for normal values, 2^-10 x scale absolute for subnormal ones
    assert ((v - w).abs() <= w.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()
    q2, s2 = fp8.encode(v, (128, 128))
    assert torch.equal(fp8.decode(q2, s2, (128, 128), torch.float32), v)  # writing what is run changes nothing
    assert torch.equal(fp8.decode(q, s, (128, 128), torch.bfloat16).float(), v)  # exact in bf16 too
    assert torch.equal(fp8.encode(torch.zeros(4, 4), (2, 2))[1], torch.ones(2, 2))  # zero blocks: finite scales


def test_reader_decodes_row_ranges_and_fused_experts(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    w2, w3 = torch.randn(37, 20, generator=g), torch.randn(4, 24, 16, generator=g)
    q2, s2 = fp8.encode(w2, (8, 8))
    q3, s3 = fp8.encode(w3, (8, 8))
    save_file({"a.weight": q2, "a.weight_scale_inv": s2, "b": q3, "b_scale_inv": s3}, str(tmp_path / "m.safetensors"))
    r = CheckpointReader(tmp_path, fp8_block=(8, 8))
    assert sorted(r.keys()) == ["a.weight", "b"] and r.shape("a.weight") == (37, 20)
    assert r.entry("a.weight").nbytes == q2.numel() + s2.numel() * 4
    full = r.get("a.weight", dtype=torch.float32)
    assert torch.equal(full, fp8.decode(q2, s2, (8, 8), torch.float32))
    for a, b in ((0, 37), (3, 5), (7, 17), (30, 37)):
        assert torch.equal(r.get("a.weight", rows=(a, b), dtype=torch.float32), full[a:b])
    assert torch.equal(r.get("b", rows=(1, 3), dtype=torch.float32), fp8.decode(q3, s3, (8, 8), torch.float32)[1:3])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_streamer_matches_transformers_fp8_loader(fp8_dirs, ids, family):
    from test_streamer import stream_logits

    _, d = fp8_dirs[family]
    assert "fp8_block" in CheckpointReader(d).encodings
    ref = transformers_logits(d, ids)  # transformers dequantizes FP8 on a CPU
    torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)


def compress(src, out, *args):
    r = CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "8", *args])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_pruned_fp8_stays_fp8_with_kept_bytes_copied(fp8_dirs, ids, tmp_path, family):
    _, d = fp8_dirs[family]
    n = ModelLayout(str(d)).router_config.num_experts
    compress(d, tmp_path / "out", "--experts", str(n // 2), "--method", "reap")
    a, b = CheckpointReader(d), CheckpointReader(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == list(BLOCK)
    assert {"fp8_block"} <= b.encodings
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    for L in plan["layers"]:
        i = L["layer"]
        for pos, e in enumerate(L["kept"]):
            key = f"model.layers.{i}.mlp.experts.{{}}.down_proj.weight"
            assert b.entry(key.format(pos)).encoding == "fp8_block"
            assert a.read_raw(key.format(e)) == b.read_raw(key.format(pos))  # values and scales, as stored
    # the output is a little over half the input's expert bytes: FP8 kept FP8
    assert b.total_bytes() < 0.8 * a.total_bytes()
    # and it loads where the input loads: transformers' FP8 loader gives what our reader decodes
    from test_streamer import stream_logits

    torch.testing.assert_close(stream_logits(tmp_path / "out", ids), transformers_logits(tmp_path / "out", ids),
                               atol=1e-4, rtol=1e-4)


def test_out_dtype_decodes_everything_and_prunes_exactly(fp8_dirs, ids, tmp_path):
    from test_compress import masked_reference

    _, d = fp8_dirs["qwen3_moe"]
    compress(d, tmp_path / "out", "--experts", "4", "--method", "reap", "--out-dtype", "bf16")
    b = CheckpointReader(tmp_path / "out")
    assert b.encodings == {"plain"} and not any(e.dtype.startswith("F8") for e in b.entries.values())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(8)) - set(L["kept"])) for L in plan["layers"]}
    # oracle: the FP8 model as transformers loads it, in bf16, with the removed experts masked in its router
    ref_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    torch.testing.assert_close(reference_logits(pruned, ids), masked_reference(ref_model, removed, ids))


def test_merged_fp8_output_is_what_was_run_and_apply_reproduces_it(fp8_dirs, calib_file, tmp_path):
    _, d = fp8_dirs["deepseek_v3"]
    compress(d, tmp_path / "out", "--experts", "8", "--method", "ream", "--calib", str(calib_file))
    b = CheckpointReader(tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    merged = [(L["layer"], pos) for L in plan["layers"] for pos, e in enumerate(L["kept"])
              if len(L["groups"].get(str(e), {}).get("members", [])) > 1]
    assert merged, "the test needs at least one merge"
    for i, pos in merged:
        key = f"model.layers.{i}.mlp.experts.{pos}.gate_proj.weight"
        s = b.read_part(b.entry(key).parts["_scale_inv"])
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # fresh power-of-two scales
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out"), str(d), str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    a2 = CheckpointReader(tmp_path / "again")
    assert sorted(a2.keys()) == sorted(b.keys())
    assert all(a2.read_raw(k) == b.read_raw(k) for k in b.keys())


def test_unknown_quantization_is_refused(fp8_dirs, tmp_path):
    import shutil

    _, d = fp8_dirs["qwen3_moe"]
    bad = tmp_path / "gptq"
    shutil.copytree(d.parent / "src", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["compress", str(bad), str(tmp_path / "out"), "--experts", "4"])
    assert r.exit_code == 2 and "quantized checkpoint (gptq)" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("out_dtype,method", [("stored", "reap"), ("stored", "ream"), ("bf16", "reap")])
def test_plan_predicts_fp8_reads_and_output_bytes(fp8_dirs, tmp_path, monkeypatch, out_dtype, method):
    """`plan` counts an FP8 tensor's scales with its values: reads and output bytes equal what compress does."""
    from test_plan import compress_and_estimate, tensor_bytes

    _, src = fp8_dirs["deepseek_v3"]
    settings = {"method": method, "num_sequences": 8, "seq_len": 32, "out_dtype": out_dtype,
                **({"guard": "off"} if method == "ream" else {})}
    est, read = compress_and_estimate(src, tmp_path / "out", 8, monkeypatch, **settings)
    assert est.output_bytes == tensor_bytes(tmp_path / "out")
    assert est.read_bytes == read


def test_kimi_k2_fp8_shape_inspects_and_plans_into_24gb(tmp_path, monkeypatch):
    """Kimi-K2's real layer shapes as released (FP8, 128 x 128 blocks; headers over sparse data): `inspect` gives the
    stored sizes with the scales counted, and `plan` runs the 33.8 GB of decoded experts per layer in chunks inside
    a 24 GB card."""
    import sys
    from pathlib import Path

    from test_plan import estimate

    from ream_lite.engine.budget import GiB
    from ream_lite.inspect_model import describe
    from ream_lite.sparse_checkpoint import write_sparse_checkpoint

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("CUDA API called"))
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import kimi_k2

    src = write_sparse_checkpoint(kimi_k2(2), tmp_path / "kimi", fp8_block=(128, 128), model_type="kimi_k2")
    layout = ModelLayout(str(src))
    d = describe(layout)
    assert d["family"] == "deepseek_v3" and d["quantization"] == "fp8" and d["experts_per_layer"] == [384]
    per_expert_values = 3 * 2048 * 7168  # one byte each
    per_expert_scales = 3 * (16 * 56) * 4  # float32 per 128 x 128 block
    moe = [x for x in d["layers"] if x["kind"] == "moe"]
    assert len(moe) == 1 and moe[0]["expert_bytes"] == 384 * (per_expert_values + per_expert_scales)
    assert d["stored_dtypes"]["F8_E4M3"] > 16.9e9
    for method in ({"method": "reap"}, {"method": "ream", "guard": "off"}):  # (the guarded merge: see docs)
        est = estimate(src, 192, stream={"device": "cuda", "max_gpu_memory": 24 * GiB}, **method)
        layer = [x for x in est.layers if x.kind == "moe"][0]
        assert est.memory.dtype == "bfloat16"
        assert layer.chunks > 1 and layer.experts_per_chunk * layer.chunks >= 384
        assert layer.experts_per_chunk * per_expert_values * 2 < 24 * GiB  # a chunk decoded to bf16 fits
        assert est.peak_device_bytes <= 24 * GiB
    # written back as FP8: half the experts (scales included) and router rows (bf16 weight, float32 bias) are gone
    router_rows = 192 * (7168 * 2 + 4)
    assert est.output_bytes == est.input_bytes - 192 * (per_expert_values + per_expert_scales) - router_rows
    r = CliRunner().invoke(main, ["inspect", str(src)])
    assert r.exit_code == 0 and "fp8" in r.output, r.output


def test_compressed_tensors_channel_fp8(tmp_path, ids, calib_file):
    """llm-compressor's FP8 (compressed-tensors 'float-quantized', one bf16 `weight_scale` per output row): decoded
    as Q * scale[row], compressed, and written back in the same layout (merged experts with power-of-two scales)."""
    model = build_model("qwen3_moe")
    d = convert_to_fp8(save_model(model, tmp_path / "src"), tmp_path / "ct", scheme="channel")
    r = CheckpointReader(d)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    t = r.entry(key)
    assert t.encoding == "fp8_block" and t.block == (1, 32) and set(t.parts) == {"", "_scale"}
    q, s = r.read_part(t.parts[""]), r.read_part(t.parts["_scale"])
    assert s.shape == (16, 1) and s.dtype == torch.bfloat16
    assert torch.equal(r.get(key, dtype=torch.float32), q.float() * s.float())  # by hand: one scale per row
    from test_streamer import stream_logits

    # oracle: transformers on a plain float32 copy holding those decoded values
    from ream_lite.testing import write_decoded_copy

    plain = write_decoded_copy(d, tmp_path / "plain")
    torch.testing.assert_close(stream_logits(d, ids), transformers_logits(plain, ids),
                               atol=1e-4, rtol=1e-4)
    compress(d, tmp_path / "out", "--experts", "4", "--method", "ream", "--guard", "off", "--calib", str(calib_file))
    b = CheckpointReader(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    for L in plan["layers"]:
        for pos, e in enumerate(L["kept"]):
            out_key = f"model.layers.{L['layer']}.mlp.experts.{pos}.up_proj.weight"
            o = b.entry(out_key)
            scale = b.read_part(o.parts["_scale"])
            assert scale.shape == (16, 1) and scale.dtype == torch.bfloat16
            if len(L["groups"].get(str(e), {}).get("members", [])) > 1:
                assert torch.equal(scale.float(), torch.exp2(torch.log2(scale.float()).round()))
            else:
                assert b.read_raw(out_key) == r.read_raw(f"model.layers.{L['layer']}.mlp.experts.{e}.up_proj.weight")


def test_quantized_checkpoint_mistakes_are_one_line_errors(fp8_dirs, tmp_path):
    """What the writer could not place is refused before any work: a per-expert tensor it cannot renumber (static
    activation scales), a malformed block size, --out-dtype on a checkpoint with nothing to decode."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, d = fp8_dirs["qwen3_moe"]
    static = shutil.copytree(d, tmp_path / "static")
    sd = load_file(str(static / "model.safetensors"))
    sd["model.layers.1.mlp.experts.2.up_proj.input_scale"] = torch.tensor([0.5])
    save_file(sd, str(static / "model.safetensors"))
    bad_block = shutil.copytree(d, tmp_path / "block")
    cfg = json.loads((bad_block / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = "128x128"
    (bad_block / "config.json").write_text(json.dumps(cfg))
    for src, args, message in ((static, [], "experts.2.up_proj.input_scale"), (bad_block, [], "FP8 block size"),
                               (d.parent / "src", ["--out-dtype", "bf16"], "holds no quantized tensors")):
        r = CliRunner().invoke(main, ["compress", str(src), str(tmp_path / "out"), "--experts", "4", *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_compressed_tensors_loader_holds_the_values_we_decode(tmp_path):
    """transformers with the compressed-tensors package loads a float-quantized checkpoint (ours, written in kind)
    with the weights ream-lite decodes: experts decompressed bit for bit, Linear weights kept FP8 whose Q x scale
    is ours. (Its forward differs: it also quantizes activations to FP8 per token, which ream-lite, computing with
    the decoded weights, does not emulate.)"""
    pytest.importorskip("compressed_tensors")
    model = build_model("qwen3_moe")
    d = convert_to_fp8(save_model(model, tmp_path / "src"), tmp_path / "ct", scheme="channel")
    compress(d, tmp_path / "out", "--experts", "4", "--method", "ream", "--guard", "off")
    r = CheckpointReader(tmp_path / "out")
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for i in range(3):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(sd[q].float() * sd[q + "_scale"].float(), r.get(q, dtype=torch.float32))
        gate = torch.stack([r.get(f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight", dtype=torch.float32)
                            for e in range(4)])
        assert torch.equal(sd[f"model.layers.{i}.mlp.experts.gate_up_proj"][:, :16].float(), gate)
