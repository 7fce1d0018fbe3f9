"""compressed-tensors INT4 pack-quantized checkpoints (W4A16, the Kimi-K2-Thinking / Kimi-K2.5 releases) read and
written in kind, and Kimi-K2.5's multimodal wrapper (`kimi_k25`, a DeepSeek-V3 text model under
`language_model.*` beside its vision tower). The codec is checked against compressed-tensors' own compressor and
decompressor (a test dependency); kept experts are copied byte for byte with their scales, merged experts re-encoded
with fresh group scales."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compress import compress
from test_streamer import stream_logits
from tiny_models import VOCAB, _randomize, family_config, reference_logits

from ream_lite.arch import ModelLayout
from ream_lite.checkpoint import CheckpointReader
from ream_lite.checkpoint.int4_pack import decode_int4, encode_int4, pack_int4, unpack_int4
from ream_lite.testing import convert_to_int4

ct = pytest.importorskip("compressed_tensors")
GROUP = 16  # (the releases: 32; the tiny experts' down projection has 16 inputs)
# the format's error, in steps (group scales): half a step, plus bf16's rounding (2^-8 relative at most, of up to
# 7.5 steps) twice: in w / scale, which picks the code (and the scale itself, amax / 7.5 in bf16, when the largest
# value clips from 7.5 to 7), and in the decoded product q * scale
HALF_STEP = 0.5 + 2 * 7.5 * 2**-8


def ct_scheme(group: int):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import W4A16

    return QuantizationScheme(targets=["Linear"], **{"weights": W4A16["weights"].model_copy(
        update={"group_size": group})})


@pytest.mark.parametrize("shape,group", [((64, 128), 32), ((16, 32), 16), ((3, 256), 128)])
def test_codec_equals_compressed_tensors(shape, group):
    """Our codes and scales are compressed-tensors' compressor's (on a bf16 weight, scales from its own
    calculate_qparams), and our decode its decompressor's, bit for bit: random rows, an all-zero group, an
    outlier, exact ties."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    w[0, :group] = 0
    w[-1, 5] = 3.0
    w[1, :4] = torch.tensor([0.75, -0.75, 0.25, 7.5]).to(torch.bfloat16)  # ties at x / scale = +-0.5 and +-7.5
    scheme = ct_scheme(group)
    x = w.reshape(shape[0], -1, group)
    scale, zp = calculate_qparams(x.amin(-1), x.amax(-1), scheme.weights)
    theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    codes, scales = encode_int4(w, group, torch.bfloat16)
    assert torch.equal(codes, theirs["weight_packed"]) and torch.equal(scales, theirs["weight_scale"])
    ref = PackedQuantizationCompressor.decompress(theirs, scheme)["weight"]
    assert torch.equal(decode_int4(codes, scales, ref.dtype), ref)
    # the codes round-trip, and every value is within HALF_STEP of the weight
    q = unpack_int4(codes)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(pack_int4(q), codes)
    step = scales.float().repeat_interleave(group, dim=-1)
    err = (decode_int4(codes, scales, torch.float32) - w.float()).abs()
    assert (err <= step * HALF_STEP + 1e-12).all()
    # the least-squares search: each group's error at most the rule's, and lower on these random rows overall
    searched = decode_int4(*encode_int4(w, group, torch.bfloat16, search=True), torch.float32)
    per_group = lambda v: (v - w.float()).pow(2).reshape(shape[0], -1, group).sum(-1)  # noqa: E731
    rule = per_group(decode_int4(codes, scales, torch.float32))
    assert (per_group(searched) <= rule + 1e-12).all() and per_group(searched).sum() < 0.95 * rule.sum()


def kimi_k25_model():
    """A tiny Kimi-K2.5: the wrapper around a DeepSeek-V3 text model (config model_type kimi_k2, as released) and
    a one-layer vision tower."""
    import transformers as tf

    text = family_config("deepseek_v3").to_dict()
    text["model_type"] = "kimi_k2"
    vision = dict(patch_size=2, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2, num_attention_heads=2,
                  num_hidden_layers=1, hidden_size=16, intermediate_size=16, merge_kernel_size=[1, 1])
    cfg = tf.Kimi_K25Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    return _randomize(tf.AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32).eval())


def save_as_released(model, d):
    """save_pretrained, with the text layers under `language_model.model.layers.N` and the text_config's
    model_type kimi_k2, as the release stores them (this transformers' save reverses its load-time `blocks` ->
    `layers` rename of the vision tower onto the text layers too; it loads either)."""
    from ream_lite.testing import save_char_tokenizer

    model.save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    sd = {k.replace("language_model.model.blocks.", "language_model.model.layers."): v for k, v in sd.items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["model_type"] = "kimi_k2"  # (as released; transformers' config class maps it to deepseek_v3)
    (d / "config.json").write_text(json.dumps(cfg))
    save_char_tokenizer(d, VOCAB)
    return d


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(the transformers model of the INT4 values, loaded from a decoded copy; the plain release dir; the INT4
    release dir)."""
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("kimi_k25")
    plain = save_as_released(kimi_k25_model(), root / "plain")
    int4 = convert_to_int4(plain, root / "int4", group=GROUP)
    decoded = root / "decoded"
    decoded.mkdir()
    for f in plain.iterdir():
        if f.name != "model.safetensors":
            (decoded / f.name).write_bytes(f.read_bytes())
    with CheckpointReader(int4) as r:
        save_file({k: r.get(k, dtype=torch.float32) for k in r.keys()}, str(decoded / "model.safetensors"),
                  metadata={"format": "pt"})
    model = AutoModelForImageTextToText.from_pretrained(decoded, dtype=torch.float32).eval()
    return model, plain, int4


def test_layout_reads_kimi_k25_and_its_int4_experts(kimi):
    _, plain, int4 = kimi
    layout = ModelLayout(str(int4))
    assert layout.multimodal == "kimi_k25" and layout.spec.model_type == "deepseek_v3"
    assert layout.spec.layers_prefix == "language_model.model.layers"
    assert layout.lm_head_key == "language_model.lm_head.weight"
    assert layout.config["model_type"] == "kimi_k2" and layout.hf_config().model_type == "deepseek_v3"
    assert [x.index for x in layout.moe_layers] == [1, 2] and layout.router_config.num_experts == 16
    layout.require_decodable()
    with CheckpointReader(plain) as a:
        r = layout.reader
        assert set(r.keys()) == set(a.keys())  # named and shaped as the unquantized release
        k = "language_model.model.layers.1.mlp.experts.3.down_proj.weight"
        t = r.entry(k)
        assert t.encoding == "int4_pack" and t.block == (GROUP,) and r.shape(k) == a.shape(k)
        assert set(t.parts) == {"_packed", "_scale", "_shape"}
        assert r.entry("language_model.model.layers.1.self_attn.q_a_proj.weight").encoding == "plain"
        # within half a step of the plain weights
        step = r.read_part(t.parts["_scale"]).float().repeat_interleave(GROUP, dim=-1)
        assert ((r.get(k, dtype=torch.float32) - a.get(k, dtype=torch.float32)).abs() <= step * HALF_STEP).all()


def test_streamed_logits_equal_transformers_on_the_decoded_weights(kimi):
    model, _, int4 = kimi
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(model, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(stream_logits(int4, ids), ref, atol=1e-4, rtol=1e-4)


def test_reap_keeps_experts_byte_for_byte(kimi, calib_file, tmp_path):
    """REAP 16 -> 8: the kept experts' codes, scales and shape records are the input's bytes, the vision tower's
    too; config.json is the wrapper's with the text_config's count edited and the quantization_config kept."""
    _, _, int4 = kimi
    out = tmp_path / "out"
    compress(int4, out, "--experts", 8, "--method", "reap", "--calib", calib_file, "--refit", "off")
    plan = json.loads((out / "ream_plan.json").read_text())
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (int4, out))
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]
    assert cfg_out["text_config"] == {**cfg_in["text_config"], "n_routed_experts": 8}
    assert cfg_out["vision_config"] == cfg_in["vision_config"] and cfg_out["model_type"] == "kimi_k25"
    with CheckpointReader(int4) as a, CheckpointReader(out) as b:
        for layer in plan["layers"]:
            for new, old in enumerate(layer["kept"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = f"language_model.model.layers.{layer['layer']}.mlp.experts.{old}.{proj}.weight"
                    dst = f"language_model.model.layers.{layer['layer']}.mlp.experts.{new}.{proj}.weight"
                    assert b.entry(dst).encoding == "int4_pack" and set(b.entry(dst).parts) == set(a.entry(src).parts)
                    assert b.read_raw(dst) == a.read_raw(src)
        vision = [k for k in a.keys() if k.startswith(("vision_tower.", "mm_projector."))]
        assert vision and all(a.read_raw(k) == b.read_raw(k) for k in vision)


def test_merged_experts_within_the_format_error_and_decode_with_compressed_tensors(kimi, calib_file, tmp_path):
    """Paper REAM into INT4 and, for the float merge, to float32: each merged expert is the INT4 encoding of the
    float merge with least-squares group scales (no group worse than compressed-tensors' rule gives); every INT4
    weight of the output decodes with
    compressed-tensors' decompressor to what ream-lite reads; the output streams, and loads where the input
    loads."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    _, _, int4 = kimi
    args = ("--experts", 8, "--method", "ream", "--guard", "off", "--refit", "off", "--no-sequential", "--calib",
            calib_file)
    compress(int4, tmp_path / "q", *args)
    compress(int4, tmp_path / "f", *args, "--out-dtype", "fp32")
    plan = json.loads((tmp_path / "q" / "ream_plan.json").read_text())
    merged = [(L["layer"], L["kept"].index(int(c))) for L in plan["layers"] for c, g in L["groups"].items()
              if len(g) > 1]
    assert merged
    scheme = ct_scheme(GROUP)
    with CheckpointReader(tmp_path / "q") as q, CheckpointReader(tmp_path / "f") as f:
        for layer, pos in merged:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"language_model.model.layers.{layer}.mlp.experts.{pos}.{proj}.weight"
                parts = {sfx: q.read_part(e) for sfx, e in q.entry(key).parts.items()}
                assert parts["_shape"].tolist() == list(q.shape(key)) and parts["_shape"].dtype == torch.int32
                # the least-squares scales: never worse, group by group, than compressed-tensors' amax / 7.5
                target = f.get(key, dtype=torch.float32)
                ct = decode_int4(*encode_int4(target, GROUP, torch.bfloat16), torch.float32)
                sq = lambda v: (v - target).pow(2).reshape(*target.shape[:-1], -1, GROUP).sum(-1)  # noqa: E731
                assert (sq(q.get(key, dtype=torch.float32)) <= sq(ct) * (1 + 1e-6) + 1e-12).all(), key
        encoded = [k for k in q.keys() if q.entry(k).encoding == "int4_pack"]
        assert len(encoded) == 2 * 8 * 3
        for k in encoded:
            parts = {sfx: q.read_part(e) for sfx, e in q.entry(k).parts.items()}
            ref = PackedQuantizationCompressor.decompress({"weight_packed": parts["_packed"],
                                                           "weight_scale": parts["_scale"],
                                                           "weight_shape": parts["_shape"]}, scheme)["weight"]
            assert torch.equal(q.get(k, dtype=ref.dtype), ref), k
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(stream_logits(tmp_path / "q", ids)).all()
    # transformers (with compressed-tensors) builds the output as it builds the input, with the new expert count
    # (on a CPU it does not decode per-expert INT4 into its fused experts for either: values are compared through
    # the decompressor above, not through its forward)
    from transformers import AutoModelForImageTextToText

    for d in (int4, tmp_path / "q"):
        m = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16)
    assert m.config.text_config.n_routed_experts == 8


def test_other_int_schemes_are_refused(kimi, tmp_path):
    """An 8-bit or asymmetric pack-quantized release is refused in one line, naming what it holds."""
    from click.testing import CliRunner

    from ream_lite.cli import main

    _, _, int4 = kimi
    d = tmp_path / "m"
    d.mkdir()
    for f in int4.iterdir():
        (d / f.name).symlink_to(f)
    (d / "config.json").unlink()
    cfg = json.loads((int4 / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["plan", str(d), "--experts", "8", "--device", "cpu", "--no-measure"])
    assert r.exit_code == 2 and "8-bit int" in r.output and "Traceback" not in r.output


def test_apply_reproduces_compress_byte_for_byte(kimi, calib_file, tmp_path):
    """Guarded REAM with refit into INT4: the output holds the bytes the merges and fits were first encoded to
    (re-encoding decoded INT4 values shrinks the scales, so the written bytes are remembered, not re-derived), and
    `apply` of the plan writes the same bytes, its refit experts copied from the compressed output."""
    from click.testing import CliRunner

    from ream_lite.cli import main
    from ream_lite.faults import digests

    _, _, int4 = kimi
    compress(int4, tmp_path / "out", "--experts", 8, "--method", "ream", "--calib", calib_file, "--refit", "on")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert all(L["refit"]["used"] and L["refit"]["experts"] for L in plan["layers"])
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out"), str(int4), str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    a, b = digests(tmp_path / "out"), digests(tmp_path / "applied")
    weights = [k for k in a if k.endswith(".safetensors")]
    assert weights and all(a[k] == b[k] for k in weights)


def test_kimi_k2_thinking_int4_real_shape_inspect_and_plan(tmp_path, monkeypatch):
    """Kimi-K2-Thinking's real layer shapes in its INT4 release form (3 of its 61 layers, headers only): inspect
    reads the family and the INT4 experts; planned for a 24 GB card at 384 -> 192 experts, REAP and paper REAM fit
    it, reading the experts as stored (4.5 bits a weight: a quarter of bf16, plus the group scales)."""
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from ream_lite.cli import main
    from ream_lite.engine.streamer import StreamOptions
    from ream_lite.estimate import estimate_compression
    from ream_lite.pipeline import CompressConfig, resolve_keep, validate
    from ream_lite.sparse_checkpoint import write_sparse_checkpoint

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from shapes import kimi_k2

    src = write_sparse_checkpoint(kimi_k2(3), tmp_path / "k2t", model_type="kimi_k2", int4_group=32)
    r = CliRunner().invoke(main, ["inspect", str(src), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["family"] == "deepseek_v3" and info["experts_per_layer"] == [384] and info["top_k"] == 8
    layout = ModelLayout(str(src))
    layout.require_decodable()
    t = layout.reader.entry("model.layers.1.mlp.experts.5.down_proj.weight")
    assert t.encoding == "int4_pack" and t.shape == (7168, 2048) and t.block == (32,)
    per_expert = sum(layout.reader.entry(k).nbytes for k in layout.per_expert_keys(1, 0))
    assert per_expert == 3 * (7168 * 2048 // 2 + 7168 * 2048 // 32 * 2) + 3 * 8  # codes, bf16 scales, shapes

    for name in ("mem_get_info", "is_available", "synchronize", "get_device_properties"):  # (planned, not run)
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("CUDA called")))
    budget = 24 * 1024**3
    for kw in ({"method": "reap"}, {"method": "ream", "guard": "off"}):
        cfg = CompressConfig(model=str(src), output=str(tmp_path / "out"), experts=192,
                             stream=StreamOptions(device="cuda", max_gpu_memory=budget, progress=False), **kw)
        n_keep = resolve_keep(layout, 192)
        validate(layout, n_keep, cfg)
        est = estimate_compression(layout, cfg, n_keep, measure=False)
        assert est.peak_device_bytes <= budget, kw
        assert [x.kind for x in est.layers] == ["dense", "moe", "moe"]


def altered_copy(src, d, edit) -> None:
    """`src` in `d` with `edit` applied to its one shard's tensors (dict, changed in place); every other file linked."""
    d.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).symlink_to(f)
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("extra", ["weight_zero_point", "weight_g_idx"])
def test_asymmetric_or_reordered_int4_is_refused(kimi, tmp_path, extra):
    """A zero point (asymmetric) or a group index (GPTQ activation order) beside an INT4 weight changes what its codes
    mean: refused when the checkpoint is opened, naming the tensor."""
    from ream_lite.errors import ReamLiteError

    _, _, int4 = kimi
    d = tmp_path / "m"
    key = f"language_model.model.layers.1.mlp.experts.0.up_proj.{extra}"
    altered_copy(int4, d, lambda sd: sd.__setitem__(key, torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(ReamLiteError, match=f"experts.0.up_proj.{extra}"):
        ModelLayout(str(d))


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_plan_predicts_int4_reads_and_output_bytes(kimi, tmp_path, monkeypatch, method):
    """`plan` counts an INT4 weight's scales and shape record with its codes: its predicted reads and output bytes
    equal what compress reads and writes (the Kimi-K2.5 wrapper, vision tower included)."""
    from test_plan import compress_and_estimate, tensor_bytes

    _, _, src = kimi
    settings = {"method": method, "num_sequences": 8, "seq_len": 32, **({"guard": "off"} if method == "ream" else {})}
    est, read = compress_and_estimate(src, tmp_path / "out", 8, monkeypatch, **settings)
    assert est.output_bytes == tensor_bytes(tmp_path / "out")
    assert est.read_bytes == read


def test_malformed_int4_weight_is_refused_in_one_line(kimi, tmp_path):
    """An INT4 weight whose scales do not match its codes (a truncated or foreign file) is refused when the checkpoint
    is opened, naming the tensor."""
    from ream_lite.errors import ReamLiteError

    _, _, int4 = kimi
    d = tmp_path / "m"
    key = "language_model.model.layers.2.mlp.experts.3.down_proj.weight_scale"
    altered_copy(int4, d, lambda sd: sd.__setitem__(key, sd[key][:5].contiguous()))
    with pytest.raises(ReamLiteError, match="experts.3.down_proj.weight_packed: not an INT4 pack-quantized weight"):
        ModelLayout(str(d))
