"""`ream-lite compress`: the pruning oracle on every family, merged outputs that load, clean refusals."""

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from tiny_models import FAMILIES, VOCAB, reference_logits, router_of
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.cli import main


def compress(src, out, *args, expect_ok=True):
    r = CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "12", *args])
    if expect_ok:
        assert r.exit_code == 0, r.output
    return r


def masked_reference(model, removed: dict[int, list[int]], ids):
    """transformers' own forward with the removed experts' router logits (and selection bias) set to -inf.
    Routers call F.linear through their modeling module, or through torch's Linear module (nn.Linear routers:
    Llama-4, HunYuan's gate.wg); a shim in both masks the router weight's output columns."""
    masks = {}
    for i, experts in removed.items():
        _, weight, bias, _ = router_of(model, i)
        masks[weight.data_ptr()] = experts
        if bias is not None:  # (Ernie-4.5 stores it [1, E]: experts on the last axis)
            with torch.no_grad():
                bias[..., experts] = float("-inf")
    modules = [m for m in (sys.modules[torch.nn.Linear.__module__], sys.modules[type(model).__module__])
               if hasattr(m, "F")]  # (PhiMoE's modeling module calls its router as an nn.Linear: no F of its own)
    real_f = modules[0].F

    def linear(x, w, b=None):
        y = real_f.linear(x, w, b)
        if w.data_ptr() in masks:
            y = y.clone()
            y[..., masks[w.data_ptr()]] = float("-inf")
        return y

    shim = types.SimpleNamespace(**{k: getattr(real_f, k) for k in dir(real_f) if not k.startswith("__")})
    shim.linear = linear
    saved = [m.F for m in modules]
    for m in modules:
        m.F = shim
    try:
        return reference_logits(model, ids)
    finally:
        for m, f in zip(modules, saved):
            m.F = f


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_pruning_oracle(model_dirs, calib_file, tmp_path, family, method):
    from tiny_models import build_model

    model, src = model_dirs[family]
    n = ModelLayout(str(src)).router_config.num_experts
    keep = n // 2
    # (the pruning identity holds for the plan as it is: --refit off, which also leaves the guard off)
    compress(src, tmp_path / "out", "--experts", str(keep), "--method", method, "--calib", str(calib_file),
             "--refit", "off")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(n)) - set(L["kept"])) for L in plan["layers"]}
    assert all(len(v) == n - keep for v in removed.values()) and plan["layers"]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pruned.config.num_local_experts == keep if hasattr(pruned.config, "num_local_experts") else True
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    oracle = masked_reference(build_model(family), removed, ids)  # a fresh copy: the oracle edits the bias
    torch.testing.assert_close(reference_logits(pruned, ids), oracle, atol=1e-4, rtol=1e-4)
    out = pruned.generate(ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["ream", "hc-smoe", "m-smoe"])
def test_merging_methods_write_loadable_models(model_dirs, calib_file, tmp_path, family, method):
    model, src = model_dirs[family]
    n = ModelLayout(str(src)).router_config.num_experts
    paper = ["--guard", "off"] if method == "ream" else []  # the paper's REAM merges in every layer
    compress(src, tmp_path / "out", "--experts", str(n // 2), "--method", method, "--calib", str(calib_file), *paper)
    layout = ModelLayout(str(tmp_path / "out"))
    assert {x.num_experts for x in layout.moe_layers} == {n // 2}
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert all(L["groups"] for L in plan["layers"]), "merging methods merge something in every layer"
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 8))
    assert torch.isfinite(reference_logits(m, ids)).all()
    assert set(m.state_dict()) == set(model.state_dict())


def test_unchanged_tensors_are_byte_copies_and_merges_are_where_planned(model_dirs, calib_file, tmp_path):
    from ream_lite.checkpoint import CheckpointReader

    _, src = model_dirs["qwen3_moe"]
    compress(src, tmp_path / "out", "--experts", "6", "--method", "ream", "--group-size", "2", "--calib",
             str(calib_file), "--guard", "off")
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    for L in plan["layers"]:
        i = L["layer"]
        assert torch.equal(b.get(f"model.layers.{i}.mlp.gate.weight"), a.get(f"model.layers.{i}.mlp.gate.weight")[L["kept"]])
        for pos, e in enumerate(L["kept"]):
            same = a.read_raw(f"model.layers.{i}.mlp.experts.{e}.up_proj.weight") == b.read_raw(
                f"model.layers.{i}.mlp.experts.{pos}.up_proj.weight")
            assert same == (str(e) not in L["groups"])  # singletons copied byte for byte, centroids merged
        assert a.read_raw(f"model.layers.{i}.self_attn.q_proj.weight") == b.read_raw(f"model.layers.{i}.self_attn.q_proj.weight")


def test_compress_is_deterministic(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["olmoe"]
    for d in ("a", "b"):
        compress(src, tmp_path / d, "--experts", "5", "--calib", str(calib_file), "--seed", "3")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_fused_layout_is_written_back_fused(calib_file, tmp_path):
    from tiny_models import build_model, save_model

    src = save_model(build_model("qwen3_moe", seed=4), tmp_path / "fused", layout="fused")
    compress(src, tmp_path / "out", "--experts", "4", "--calib", str(calib_file))
    layout = ModelLayout(str(tmp_path / "out"))
    assert {x.expert_storage for x in layout.moe_layers} == {"fused"}
    assert layout.reader.shape("model.layers.0.mlp.experts.gate_up_proj") == (4, 32, 32)


@pytest.mark.parametrize(
    "family,args,message",
    [
        ("qwen3_moe", ["--experts", "1"], "at least top-k"),
        ("qwen3_moe", ["--experts", "8"], "below the current count"),
        ("qwen3_moe", ["--experts", "0.1"], "at least top-k"),
        ("deepseek_v3", ["--experts", "6"], "multiple of n_group"),
        ("deepseek_v3", ["--experts", "4"], "keep at least 2 per group"),
        ("qwen3_moe", ["--experts", "2", "--group-size", "2"], "cannot hold"),
    ],
)
def test_refusals_before_any_work(model_dirs, tmp_path, family, args, message):
    _, src = model_dirs[family]
    r = compress(src, tmp_path / "out", *args, expect_ok=False)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_output_inside_input_and_existing_output_refused(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["mixtral"]
    r = compress(src, src / "sub", "--experts", "4", expect_ok=False)
    assert r.exit_code == 2 and "inside" in r.output
    (tmp_path / "out").mkdir()
    r = compress(src, tmp_path / "out", "--experts", "4", "--calib", str(calib_file), expect_ok=False)
    assert r.exit_code == 2 and "already exists" in r.output


def test_mtp_layer_is_compressed_with_the_same_method(calib_file, tmp_path):
    """DeepSeek-V3 layout with an MTP layer stored after the last decoder layer, as released checkpoints have it."""
    from tiny_models import save_mtp_model

    d = save_mtp_model(tmp_path / "ds")
    compress(d, tmp_path / "out", "--experts", "8", "--method", "ream", "--calib", str(calib_file), "--guard", "off")
    plan = json.loads((tmp_path / "out" / "ream_plan.json").read_text())
    assert [L["layer"] for L in plan["layers"]] == [1, 2, 3]
    mtp = plan["layers"][-1]
    assert len(mtp["kept"]) == 8 and mtp["groups"] and sum(mtp["scores"]["frequency"]) > 0
    layout = ModelLayout(str(tmp_path / "out"))
    assert [x.num_experts for x in layout.moe_layers] == [8, 8, 8] and layout.layers[-1].is_mtp
    for k in ("enorm.weight", "eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight"):
        assert f"model.layers.3.{k}" in layout.reader
    assert layout.reader.shape("model.layers.3.mlp.gate.e_score_correction_bias") == (8,)
    # the main model still loads and runs in transformers (which ignores MTP layers)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.isfinite(reference_logits(m, torch.randint(0, VOCAB, (1, 6)))).all()

    compress(d, tmp_path / "nomtp", "--experts", "8", "--calib", str(calib_file), "--drop-mtp")
    dropped = ModelLayout(str(tmp_path / "nomtp"))
    assert not any(x.is_mtp for x in dropped.layers) and dropped.config["num_nextn_predict_layers"] == 0


def test_output_containing_the_input_is_refused_even_with_overwrite(model_dirs, calib_file, tmp_path):
    import shutil

    parent = tmp_path / "models"
    shutil.copytree(model_dirs["olmoe"][1], parent / "src")
    r = compress(parent / "src", parent, "--experts", "4", "--overwrite", "--calib", str(calib_file), expect_ok=False)
    assert r.exit_code == 2 and "contain" in r.output
    assert (parent / "src" / "model.safetensors").exists()


def test_recompressing_writes_its_own_plan(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["qwen3_moe"]
    compress(src, tmp_path / "six", "--experts", "6", "--calib", str(calib_file))
    compress(tmp_path / "six", tmp_path / "four", "--experts", "4", "--calib", str(calib_file))
    plan = json.loads((tmp_path / "four" / "ream_plan.json").read_text())
    assert plan["experts"] == {"before": 6, "after": 4}


@pytest.mark.parametrize("args,message", [
    (["--no-gate-logit-sim", "--no-gated-sim"], "no similarity"),
    (["--max-shard-size", "5XB"], "--max-shard-size"),
    (["--num-sequences", "0"], "--num-sequences"),
    (["--method", "reap", "--guard", "group", "--refit", "off"], "--method ream or --refit auto"),
    (["--holdout", "1.5"], "--holdout"),
    (["--num-sequences", "1"], "at least 2 calibration sequences"),
])
def test_option_mistakes_are_one_line_errors(model_dirs, tmp_path, args, message):
    _, src = model_dirs["qwen3_moe"]
    r = compress(src, tmp_path / "out", "--experts", "4", *args, expect_ok=False)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_fp8_checkpoint_is_refused_not_miscast(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = model_dirs["deepseek_v3"]
    d = tmp_path / "fp8"
    d.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.1.mlp.experts.0.up_proj.weight"] = sd["model.layers.1.mlp.experts.0.up_proj.weight"].to(
        torch.float8_e4m3fn)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((src / "config.json").read_text())
    r = compress(d, tmp_path / "out", "--experts", "8", expect_ok=False)
    assert r.exit_code == 2 and "quantized checkpoint (F8_E4M3)" in r.output
    assert CliRunner().invoke(main, ["inspect", str(d)]).exit_code == 0  # inspect still describes it
