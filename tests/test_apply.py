"""`ream-lite apply`: a recorded plan re-applied to the base model gives the compressed model's exact bytes."""

import json

import pytest
from click.testing import CliRunner

from ream_lite.cli import main

TEXT = "the quick brown fox jumps over the lazy dog. 12 + 30 = 42. def f(x): return x * 2\n" * 40


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": TEXT[i:], "domain": d}) for i, d in ((0, "a"), (7, "b"))) + "\n")
    return p


def run(*a):
    return CliRunner().invoke(main, [str(x) for x in a])


@pytest.mark.parametrize("family,experts,args", [
    ("qwen3_moe", 4, ["--method", "ream", "--guard", "off", "--group-size", "2"]),
    ("qwen3_moe", 5, ["--method", "ream", "--align", "weight", "--guard", "off"]),
    ("deepseek_v3", 8, ["--method", "ream"]),
    ("mixtral", 4, ["--method", "reap"]),
])
def test_apply_reproduces_compress(model_dirs, calib_file, tmp_path, family, experts, args):
    _, src = model_dirs[family]
    out = tmp_path / "a" / "out"
    r = run("compress", src, out, "--experts", experts, "--calib", calib_file, "--seq-len", 32,
            "--num-sequences", 12, "--device", "cpu", *args)
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "ream_plan.json").read_text())
    if "--group-size" in args:
        assert all(L["groups"] and L["permutations"] for L in plan["layers"])  # merges happened, aligned
    again = tmp_path / "b" / "out"
    r = run("apply", out / "ream_plan.json", src, again)
    assert r.exit_code == 0, r.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text()) == json.loads((out / "config.json").read_text())


def test_apply_refuses_a_plan_for_another_model(model_dirs, calib_file, tmp_path):
    out = tmp_path / "out"
    r = run("compress", model_dirs["qwen3_moe"][1], out, "--experts", 4, "--method", "reap", "--calib", calib_file,
            "--seq-len", 32, "--num-sequences", 12)
    assert r.exit_code == 0, r.output
    r = run("apply", out, model_dirs["deepseek_v3"][1], tmp_path / "x")
    assert r.exit_code == 2 and "experts per layer" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = run("apply", tmp_path / "nothing.json", model_dirs["qwen3_moe"][1], tmp_path / "x")
    assert r.exit_code == 2 and "no such plan" in r.output
