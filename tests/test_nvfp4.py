"""NVFP4 checkpoints (compressed-tensors' nvfp4-pack-quantized, ModelOpt's NVFP4) read and written in kind: kept
experts copied byte for byte with their scales, merged experts re-encoded with fresh block scales under their
expert's tensor scale, the quantization_config kept. The codec is checked against compressed-tensors' own
compressor and decompressor (a test dependency)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_compress import compress
from test_streamer import stream_logits
from tiny_models import VOCAB, build_model, reference_logits, save_model

from ream_lite.checkpoint import CheckpointReader
from ream_lite.checkpoint.nvfp4 import decode_nvfp4, encode_nvfp4, global_scale
from ream_lite.testing import convert_to_nvfp4

ct = pytest.importorskip("compressed_tensors")


def ct_scheme():
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4

    return QuantizationScheme(targets=["Linear"], **NVFP4)


@pytest.mark.parametrize("shape", [(64, 128), (16, 32), (3, 48)])
def test_codec_equals_compressed_tensors(shape):
    """Our codes and block scales are compressed-tensors' compressor's, and our decode its decompressor's, bit for
    bit (random rows, one all-zero block, one with an outlier)."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :16] = 0
    w[-1, 5] = 3.0
    scheme = ct_scheme()
    amax = w.abs().amax()
    gs = generate_gparam(-amax.reshape(1), amax.reshape(1))
    assert torch.equal(gs, global_scale(w))
    blocks = w.reshape(shape[0], -1, 16).abs().amax(-1)
    scale, _ = calculate_qparams(-blocks, blocks, scheme.weights, global_scale=gs)
    theirs = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    codes, scales = encode_nvfp4(w, gs, inverted=False)
    assert torch.equal(codes, theirs["weight_packed"]) and torch.equal(scales, theirs["weight_scale"])
    ref = NVFP4PackedCompressor.decompress({"weight_packed": codes, "weight_scale": scales,
                                            "weight_global_scale": gs}, scheme)["weight"]
    assert torch.equal(decode_nvfp4(codes, scales, gs, False, ref.dtype), ref)
    # ModelOpt stores the tensor scale inverted: the same codes decode to the same values (up to 1 / x's rounding)
    torch.testing.assert_close(decode_nvfp4(codes, scales, 1 / gs, True, torch.float32),
                               decode_nvfp4(codes, scales, gs, False, torch.float32), rtol=1e-6, atol=0)
    # within the format's error: half the gap between neighbouring E2M1 values (at most 1.0) times the block scale
    dq = decode_nvfp4(codes, scales, gs, False, torch.float32)
    step = (scales.float() / gs).repeat_interleave(16, dim=-1)
    assert ((dq - w).abs() <= step * 1.0 + 1e-12).all()


@pytest.fixture(scope="module")
def nvfp4_dirs(model_dirs, tmp_path_factory):
    """(transformers' model of the NVFP4 values, loaded from their decoded copy; {form: the NVFP4 release dir})."""
    from transformers import AutoModelForCausalLM

    _, plain = model_dirs["qwen3_moe"]
    root = tmp_path_factory.mktemp("nvfp4")
    dirs = {form: convert_to_nvfp4(plain, root / form, form) for form in ("ct", "modelopt")}
    decoded = root / "decoded"
    shutil.copytree(plain, decoded)
    with CheckpointReader(dirs["ct"]) as r:
        save_file({k: r.get(k, dtype=torch.float32) for k in r.keys()}, str(decoded / "model.safetensors"),
                  metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(decoded, dtype=torch.float32).eval(), dirs


def test_both_forms_read_as_the_same_logical_weights(nvfp4_dirs, model_dirs):
    model, dirs = nvfp4_dirs
    with CheckpointReader(dirs["ct"]) as a, CheckpointReader(dirs["modelopt"]) as b, \
            CheckpointReader(model_dirs["qwen3_moe"][1]) as plain:
        assert set(a.keys()) == set(b.keys()) == set(plain.keys())  # named and shaped as the unquantized release
        k = "model.layers.1.mlp.experts.3.down_proj.weight"
        assert a.entry(k).encoding == b.entry(k).encoding == "nvfp4" and a.shape(k) == plain.shape(k)
        assert set(a.entry(k).parts) == {"_packed", "_scale", "_global_scale", "/input_global_scale"}
        for key in a.keys():  # (ModelOpt's inverted tensor scale: 1 / x rounds)
            torch.testing.assert_close(a.get(key, dtype=torch.float32), b.get(key, dtype=torch.float32), rtol=1e-6,
                                       atol=0, msg=key)


def test_streamed_logits_equal_transformers_on_the_decoded_weights(nvfp4_dirs):
    model, dirs = nvfp4_dirs
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(stream_logits(dirs["ct"], ids), reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["ct", "modelopt"])
def test_reap_keeps_experts_byte_for_byte(nvfp4_dirs, calib_file, tmp_path, form):
    _, dirs = nvfp4_dirs
    out = tmp_path / "out"
    compress(dirs[form], out, "--experts", 5, "--method", "reap", "--calib", calib_file, "--refit", "off")
    plan = json.loads((out / "ream_plan.json").read_text())
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (dirs[form], out))
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]
    with CheckpointReader(dirs[form]) as a, CheckpointReader(out) as b:
        for layer in plan["layers"]:
            for new, old in enumerate(layer["kept"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = f"model.layers.{layer['layer']}.mlp.experts.{old}.{proj}.weight"
                    dst = f"model.layers.{layer['layer']}.mlp.experts.{new}.{proj}.weight"
                    assert b.entry(dst).encoding == "nvfp4" and set(b.entry(dst).parts) == set(a.entry(src).parts)
                    assert b.read_raw(dst) == a.read_raw(src)  # codes, block scales, tensor and activation scales


def test_merged_experts_within_the_format_error_of_the_float_merge(nvfp4_dirs, calib_file, tmp_path):
    """Paper REAM (no guard, no refit, non-sequential: the plan does not depend on how the output is stored) into
    NVFP4 and, for the float merge, decoded to float32: the merged experts agree within NVFP4's error under their
    expert's own tensor scale, and gate and up still share it."""
    _, dirs = nvfp4_dirs
    args = ("--experts", 5, "--method", "ream", "--guard", "off", "--refit", "off", "--no-sequential", "--calib",
            calib_file)
    compress(dirs["ct"], tmp_path / "q", *args)
    compress(dirs["ct"], tmp_path / "f", *args, "--out-dtype", "fp32")
    plan = json.loads((tmp_path / "q" / "ream_plan.json").read_text())
    merged = [(L["layer"], L["kept"].index(int(c))) for L in plan["layers"] for c, g in L["groups"].items()
              if len(g) > 1]
    assert merged
    with CheckpointReader(tmp_path / "q") as q, CheckpointReader(tmp_path / "f") as f:
        for layer, pos in merged:
            prefix = f"model.layers.{layer}.mlp.experts.{pos}."
            scales = {}
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = prefix + proj + ".weight"
                parts = {sfx: q.read_part(e) for sfx, e in q.entry(key).parts.items()}
                step = (parts["_scale"].float() / parts["_global_scale"]).repeat_interleave(16, dim=-1)
                err = (q.get(key, dtype=torch.float32) - f.get(key, dtype=torch.float32)).abs()
                assert (err <= step + 1e-9).all(), key
                scales[proj] = parts["_global_scale"]
            assert torch.equal(scales["gate_proj"], scales["up_proj"])


def test_output_decodes_with_compressed_tensors_and_loads_as_the_input_does(nvfp4_dirs, calib_file, tmp_path):
    """Every NVFP4 weight of a merged output decodes with compressed-tensors' own decompressor to what ream-lite
    reads, and transformers (with compressed-tensors) loads the output as it loads the input: it builds the model
    with the new expert count and runs. (On a CPU this transformers does not decode NVFP4 experts correctly for the
    input either, so values are compared through the decompressor, not through its forward.)"""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from transformers import AutoModelForCausalLM

    _, dirs = nvfp4_dirs
    out = tmp_path / "out"
    compress(dirs["ct"], out, "--experts", 5, "--method", "ream", "--calib", calib_file)
    scheme = ct_scheme()
    with CheckpointReader(out) as r:
        encoded = [k for k in r.keys() if r.entry(k).encoding == "nvfp4"]
        assert len(encoded) == 3 * (4 + 5 * 3)  # attention and the 5 kept experts' projections of every layer
        for k in encoded:
            parts = {sfx: r.read_part(e) for sfx, e in r.entry(k).parts.items()}
            ref = NVFP4PackedCompressor.decompress({"weight_packed": parts["_packed"], "weight_scale": parts["_scale"],
                                                    "weight_global_scale": parts["_global_scale"]}, scheme)["weight"]
            assert torch.equal(r.get(k, dtype=ref.dtype), ref), k
    for d in (dirs["ct"], out):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
        assert torch.isfinite(reference_logits(m, torch.randint(0, VOCAB, (1, 8))).float()).all()
    assert m.config.num_experts == 5


def test_other_quantized_forms_are_still_refused(model_dirs, tmp_path):
    from click.testing import CliRunner

    from ream_lite.cli import main

    d = save_model(build_model("qwen3_moe"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (d / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["plan", str(d), "--experts", "5", "--device", "cpu", "--no-measure"])
    assert r.exit_code == 2 and "ModelOpt checkpoint quantized as 'FP8'" in r.output


def test_apply_reproduces_compress_byte_for_byte(nvfp4_dirs, calib_file, tmp_path):
    """NVFP4 encoding of what the engine held (merged experts in the compute dtype) is stable: `apply` of the plan
    writes compress's bytes (block scales re-derived from decoded values come out the same)."""
    from click.testing import CliRunner

    from ream_lite.cli import main
    from ream_lite.faults import digests

    _, dirs = nvfp4_dirs
    compress(dirs["ct"], tmp_path / "out", "--experts", 5, "--method", "ream", "--calib", calib_file, "--refit", "off")
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "out"), str(dirs["ct"]), str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    a, b = digests(tmp_path / "out"), digests(tmp_path / "applied")
    weights = [k for k in a if k.endswith(".safetensors")]
    assert weights and all(a[k] == b[k] for k in weights)
