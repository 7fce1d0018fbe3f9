"""GGUF in, GGUF out: tiny models written as GGUF with the `gguf` package's writer (checkpoint/gguf_export.py) in
several llama.cpp types, read back as the transformers checkpoint they hold, compressed into a GGUF of the same
types (kept experts' blocks copied, merged experts quantized to their tensor's type)."""

import json

import numpy as np
import pytest
import torch
from test_compress import compress
from test_streamer import stream_logits
from tiny_models import VOCAB, reference_logits, save_model

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.gguf import GGUFCheckpoint
from ream_lite.checkpoint.gguf_export import export_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# rows of 256 values: whole blocks of every llama.cpp type (K-quants have 256-value super-blocks)
WIDE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, moe_intermediate_size=256,
            intermediate_size=256, num_hidden_layers=2)


def wide_model(family: str):
    """The family's tiny test model (tiny_models) at the WIDE shape."""
    from tiny_models import _randomize, family_config
    from transformers import AutoModelForCausalLM

    base = family_config(family)
    cfg = {k: v for k, v in base.to_dict().items() if k != "layer_types"}
    cfg.update(WIDE, **({"shared_expert_intermediate_size": 256} if family == "qwen2_moe" else {}))
    torch.manual_seed(0)
    return _randomize(AutoModelForCausalLM.from_config(type(base)(**cfg), dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """family -> (transformers model, safetensors dir, {type name: GGUF path})."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, types in (("qwen3_moe", ("F32", "Q8_0", "Q4_K")), ("qwen2_moe", ("Q8_0",)), ("mixtral", ("Q6_K",))):
        model = wide_model(family)
        d = save_model(model, root / family)
        files = {}
        for t in types:
            other = Q.F32 if t == "F32" else Q.Q8_0
            files[t] = export_gguf(d, root / f"{family}-{t}.gguf", expert_type=Q[t], other_type=other)
        out[family] = (model, d, files)
    return out


def decoded_model(path, plain_dir, tmp_path):
    """transformers' model (float32) of the GGUF's dequantized weights: the safetensors twin with its weights
    replaced by what ream-lite reads from the GGUF, loaded by from_pretrained."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    d = tmp_path / "decoded"
    shutil.copytree(plain_dir, d)
    for p in d.glob("*.safetensors*"):
        p.unlink()
    with GGUFCheckpoint(path) as r:
        save_file({k: r.get(k, dtype=torch.float32).contiguous() for k in r.keys()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def test_inspect_equals_the_safetensors_twin(gguf_models):
    _, d, files = gguf_models["qwen3_moe"]
    a, b = ModelLayout(str(d)), ModelLayout(str(files["Q4_K"]))
    assert b.spec is a.spec and b.router_config == a.router_config
    assert set(a.reader.keys()) == set(b.reader.keys())
    assert all(a.reader.shape(k) == b.reader.shape(k) for k in a.reader.keys())
    assert [(x.index, x.is_moe, x.num_experts, x.expert_storage) for x in a.layers] == \
        [(x.index, x.is_moe, x.num_experts, x.expert_storage) for x in b.layers]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "moe_intermediate_size", "num_experts_per_tok", "vocab_size", "norm_topk_prob"):
        assert a.hf_config().to_dict()[k] == b.hf_config().to_dict()[k], k
    assert b.reader.entry("model.layers.1.mlp.experts.3.down_proj.weight").block == (int(Q.Q4_K),)
    a.close(), b.close()


@pytest.mark.parametrize("family,qtype", [("qwen3_moe", "F32"), ("qwen3_moe", "Q4_K"), ("qwen2_moe", "Q8_0"),
                                          ("mixtral", "Q6_K")])
def test_streamed_logits_equal_transformers_on_the_dequantized_weights(gguf_models, family, qtype, tmp_path):
    _, plain, files = gguf_models[family]
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(decoded_model(files[qtype], plain, tmp_path), ids)
    torch.testing.assert_close(stream_logits(files[qtype], ids), ref, atol=1e-4, rtol=1e-4)


def test_dequantized_values_match_the_gguf_package(gguf_models):
    """Our reader's values of every tensor equal gguf's own dequantizer on the same bytes (names mapped)."""
    _, _, files = gguf_models["qwen3_moe"]
    g = gguf.GGUFReader(files["Q4_K"])
    with GGUFCheckpoint(files["Q4_K"]) as r:
        for t in g.tensors:
            theirs = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
            names = [k for k, (src, _) in r.source.items() if src.name == t.name]
            ours = torch.stack([r.get(n, dtype=torch.float32) for n in names]) if len(names) > 1 else \
                r.get(names[0], dtype=torch.float32)
            assert torch.equal(ours.reshape(theirs.shape), theirs.float()), t.name


def kept_and_merged(out):
    plan = json.loads((out / "ream_plan.json").read_text())
    return plan["layers"]


def test_reap_output_is_an_independent_slice(gguf_models, calib_file, tmp_path):
    """Every tensor of the output GGUF is the input's, bytes unchanged: kept experts' blocks, the router's kept rows,
    the rest whole; the metadata is the input's with the expert count and a record of the compression."""
    _, _, files = gguf_models["qwen3_moe"]
    src = files["Q4_K"]
    out = tmp_path / "out"
    compress(src, out, "--experts", 5, "--method", "reap", "--calib", calib_file, "--refit", "off", "--tokenizer",
             tokenizer_dir(gguf_models))
    produced = out / src.name
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(produced)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    layers = {L["layer"]: L["kept"] for L in kept_and_merged(out)}
    for name, t in ta.items():
        u = tb[name]
        assert u.tensor_type == t.tensor_type, name
        parts = name.split(".")
        if parts[0] == "blk" and int(parts[1]) in layers and ("_exps" in name or "ffn_gate_inp" in name):
            kept = layers[int(parts[1])]
            axis = 0  # (experts / router rows are the outermost numpy axis)
            assert np.array_equal(np.take(t.data, kept, axis=axis), u.data), name
        else:
            assert np.array_equal(t.data, u.data), name
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert fb.pop("qwen3moe.expert_count") == 5 and fa.pop("qwen3moe.expert_count") == 8
    record = {k: fb.pop(k) for k in list(fb) if k.startswith("ream_lite.")}
    assert fa == fb
    assert record["ream_lite.method"] == "reap" and record["ream_lite.experts_before"] == 8
    # and ream-lite reads it back as a 5-expert model whose logits are finite
    assert ModelLayout(str(produced)).router_config.num_experts == 5
    assert torch.isfinite(stream_logits(produced, torch.randint(0, VOCAB, (1, 9)))).all()


def tokenizer_dir(gguf_models):
    return str(gguf_models["qwen3_moe"][1])  # (the tiny models' character tokenizer)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_merged_experts_within_the_type_error_of_the_float_merge(gguf_models, calib_file, tmp_path, qtype):
    """Paper REAM on a quantized GGUF: each merged expert is written as llama.cpp's quantization of the merge the
    engine held, and dequantized it is within its type's error of the same merge computed in float32."""
    from ream_lite.checkpoint.ggml_blocks import encode
    from ream_lite.checkpoint.output_format import OutputFormat
    from ream_lite.methods.apply import build_merged_experts
    from ream_lite.methods.plan import LayerPlan

    _, _, files = gguf_models["qwen3_moe"]
    args = ("--experts", 5, "--method", "ream", "--guard", "off", "--refit", "off", "--no-sequential", "--calib",
            calib_file, "--tokenizer", tokenizer_dir(gguf_models))
    compress(files[qtype], tmp_path / "q", *args)
    layout = ModelLayout(str(files[qtype]))
    out = ModelLayout(str(tmp_path / "q" / files[qtype].name))
    n_merged = 0
    for L in kept_and_merged(tmp_path / "q"):
        plan = LayerPlan.from_json(L)
        merge = build_merged_experts(layout, plan, None, "cpu", output=OutputFormat(decode_to=torch.float32),
                                     value_dtype=torch.float32)
        for c, parts in merge.items():
            pos = plan.kept.index(c)
            n_merged += 1
            for proj, f in zip(("gate_proj", "up_proj", "down_proj"), parts):
                key = f"model.layers.{plan.layer}.mlp.experts.{pos}.{proj}.weight"
                stored = out.reader.read_part(out.reader.entry(key).main)
                assert torch.equal(stored, encode(Q[qtype], f)), key  # llama.cpp's quantization of the float merge
                err = (out.reader.get(key, dtype=torch.float32) - f).abs().max()
                assert err <= f.abs().max() * (1 / 127 if qtype == "Q8_0" else 1 / 7), (key, err)
    assert n_merged
    layout.close(), out.close()


@pytest.mark.parametrize("method", [("--method", "reap", "--refit", "off"), ("--method", "ream", "--guard", "off")])
def test_out_format_gguf_equals_the_exported_safetensors_output(gguf_models, calib_file, tmp_path, method):
    """`compress --out-format gguf` of a safetensors model writes, tensor for tensor, what llama.cpp-style export of
    the safetensors output of the same run holds (merged experts quantized once, from the float32 merge), with the
    new expert count in the metadata."""
    _, plain, _ = gguf_models["qwen3_moe"]
    args = ("--experts", 5, *method, "--no-sequential", "--calib", calib_file)
    compress(plain, tmp_path / "st", *args)
    compress(plain, tmp_path / "gg", *args, "--out-format", "gguf", "--gguf-type", "Q4_K")
    export_gguf(tmp_path / "st", tmp_path / "exported.gguf", expert_type=Q.Q4_K, other_type=Q.Q8_0)
    a, b = gguf.GGUFReader(tmp_path / "exported.gguf"), gguf.GGUFReader(tmp_path / "gg" / f"{plain.name}.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for t, u in zip(a.tensors, b.tensors):
        assert t.tensor_type == u.tensor_type and np.array_equal(t.data, u.data), t.name
    assert b.get_field("qwen3moe.expert_count").contents() == 5
    assert ModelLayout(str(tmp_path / "gg" / f"{plain.name}.gguf")).router_config.num_experts == 5


def test_gguf_refusals(gguf_models, tmp_path):
    from click.testing import CliRunner

    from ream_lite.cli import main

    _, plain, files = gguf_models["qwen3_moe"]
    r = CliRunner().invoke(main, ["compress", str(files["Q8_0"]), str(tmp_path / "o"), "--experts", "5",
                                  "--out-dtype", "bf16"])
    assert r.exit_code == 2 and "a GGUF is compressed into a GGUF" in r.output
    r = CliRunner().invoke(main, ["compress", str(plain), str(tmp_path / "o"), "--experts", "5", "--out-format",
                                  "gguf", "--gguf-type", "IQ2_XXS"])
    assert r.exit_code == 2 and "--gguf-type IQ2_XXS: ream-lite writes" in r.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(files["Q8_0"].read_bytes()[:5000])
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 2 and "bad.gguf" in r.output and "Traceback" not in r.output


def test_interrupted_gguf_compression_resumes_byte_identical(gguf_models, calib_file, tmp_path):
    """Ctrl-C as layer 1 starts (layer 0 written and recorded): --resume checks the recorded tensors' bytes, redoes
    the rest, and the GGUF is byte for byte an uninterrupted run's; damage to a recorded tensor is refused."""
    from click.testing import CliRunner
    from test_resume import ctrl_c_at_layer

    from ream_lite.cli import main

    _, _, files = gguf_models["qwen3_moe"]
    src = files["Q4_K"]

    def args(out, *extra):
        return ["compress", str(src), str(out), "--experts", "5", "--calib", str(calib_file), "--seq-len", "32",
                "--num-sequences", "12", "--device", "cpu", "--method", "ream", "--guard", "off", "--refit", "off",
                "--tokenizer", tokenizer_dir(gguf_models), "--snapshot-every", "layer", *extra]

    out = tmp_path / "out"
    assert CliRunner().invoke(main, args(out)).exit_code == 0
    ref = (out / src.name).read_bytes()
    (out / src.name).unlink()
    out.rename(tmp_path / "ref")
    with ctrl_c_at_layer(1):
        r = CliRunner().invoke(main, args(out))
    assert r.exit_code == 2 and "1 of 2 layers are done" in r.output
    partial = out.with_name("out.partial") / src.name
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(partial.read_bytes())
    r = CliRunner().invoke(main, args(out, "--resume"))
    assert r.exit_code == 0, r.output
    assert (out / src.name).read_bytes() == ref
    # the same interruption, then a recorded expert's bytes flipped: refused in one line
    out2 = tmp_path / "out2"
    with ctrl_c_at_layer(1):
        CliRunner().invoke(main, args(out2))
    p = out2.with_name("out2.partial") / src.name
    data_start = int(gguf.GGUFReader(p).data_offset)  # (the first tensor: layer 0's, recorded)
    raw = bytearray(p.read_bytes())
    raw[data_start + 100] ^= 0xFF
    p.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, args(out2, "--resume"))
    assert r.exit_code == 2 and "damaged" in r.output


def split_copy(src, out_dir, max_tensors: int):
    """`src` re-written by the gguf package's writer as split files of at most `max_tensors` tensors each (as
    llama.cpp's gguf-split and converter write them: split.* metadata, -0000k-of-0000n names)."""
    from gguf import GGUFValueType, GGUFWriter

    r = gguf.GGUFReader(src)
    w = GGUFWriter(out_dir / "model.gguf", r.fields["general.architecture"].contents(),
                   split_max_tensors=max_tensors)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vtype = GGUFValueType(f.types[0])
        w.add_key_value(k, f.contents(), vtype, GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_dir.glob("model-*-of-*.gguf"))


def test_a_split_gguf_reads_as_one_and_is_written_as_one(gguf_models, calib_file, tmp_path):
    _, _, files = gguf_models["qwen3_moe"]
    parts = split_copy(files["Q8_0"], tmp_path, 9)
    assert len(parts) > 2
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(stream_logits(parts[1], ids), stream_logits(files["Q8_0"], ids), atol=0, rtol=0)
    compress(parts[0], tmp_path / "out", "--experts", 5, "--method", "reap", "--refit", "off", "--calib", calib_file,
             "--tokenizer", tokenizer_dir(gguf_models))
    whole = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert whole.get_field("qwen3moe.expert_count").contents() == 5 and whole.get_field("split.count") is None
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / parts[0].name).write_bytes(parts[0].read_bytes())
    from ream_lite.errors import ReamLiteError

    with pytest.raises(ReamLiteError, match="split GGUF is missing"):
        ModelLayout(str(missing / parts[0].name))


def test_damaged_gguf_headers_are_refused_in_one_line(gguf_models, tmp_path):
    """Bytes of a GGUF's header flipped at random: read, or refused with a ReamLiteError naming the file; never
    another exception, never a hang."""
    from ream_lite.errors import ReamLiteError

    _, _, files = gguf_models["qwen3_moe"]
    raw = files["Q8_0"].read_bytes()
    header = int(gguf.GGUFReader(files["Q8_0"]).data_offset)
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for i in range(40):
        b = bytearray(raw)
        for pos in rng.integers(0, header, size=int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        p = tmp_path / f"d{i}.gguf"
        p.write_bytes(bytes(b))
        try:
            ModelLayout(str(p)).close()
            outcomes["read"] += 1
        except ReamLiteError as e:
            assert str(p) in str(e) or p.name in str(e), e
            outcomes["refused"] += 1
        p.unlink()
    assert outcomes["refused"] > 0


def test_apply_reproduces_a_gguf_compression_byte_for_byte(gguf_models, calib_file, tmp_path):
    """The default REAM with the refit forced on, into Q6_K (whose re-quantization of decoded values is not
    idempotent): `apply` of the plan writes compress's GGUF, the refit experts copied as the output's blocks."""
    from click.testing import CliRunner

    from ream_lite.cli import main

    _, d, _ = gguf_models["qwen3_moe"]
    src = tmp_path / "q6k.gguf"
    export_gguf(d, src, expert_type=Q.Q6_K, other_type=Q.Q8_0)
    compress(src, tmp_path / "out", "--experts", 5, "--calib", calib_file, "--refit", "on", "--tokenizer", str(d))
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert any(L["refit"]["used"] for L in plan["layers"])
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out"), str(src), str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "applied" / src.name).read_bytes() == (tmp_path / "out" / src.name).read_bytes()


def test_killed_at_gguf_write_boundaries_resumes_byte_identical(gguf_models, calib_file, tmp_path):
    """Killed (as by SIGKILL) just before a write, sync, rename or removal of a GGUF compression (header, tensors,
    expert slots, resume records): `--resume` gives the uninterrupted output byte for byte."""
    from collections import Counter

    from ream_lite import faults

    _, d, files = gguf_models["qwen3_moe"]
    run = faults.CompressRun(files["Q4_K"], tmp_path / "out", "--experts", "5", "--calib", str(calib_file),
                             "--seq-len", "32", "--num-sequences", "12", "--device", "cpu", "--method", "ream",
                             "--guard", "off", "--refit", "off", "--snapshot-every", "layer", "--tokenizer", str(d))
    with faults.single_threaded():
        seen = faults.boundaries(run)
        ref = faults.digests(run.out)
        kinds = Counter(kind for kind, _ in seen)
        assert kinds["write"] > 20 and kinds["sync"] and kinds["rename"]
        others = [i for i, (kind, _) in enumerate(seen) if kind != "write"]
        writes = [i for i, (kind, _) in enumerate(seen) if kind == "write"]
        points = sorted(set(others[:: max(1, len(others) // 3)] + [writes[i] for i in faults.spread(len(writes), 3)]))
        for k in points:
            run.clear()
            assert faults.killed_at(run, k) == faults.KILLED
            assert not run.out.exists(), f"killed at {seen[k]}, the output looks complete"
            r = run.invoke("--resume")
            assert r.exit_code == 0, (seen[k], r.output)
            assert faults.digests(run.out) == ref, f"killed at boundary {k} {seen[k]}: the resumed output differs"
