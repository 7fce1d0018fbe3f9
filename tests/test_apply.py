"""`ream-lite apply`: a recorded plan re-applied to the base model gives the compressed model's exact bytes."""

import json

import pytest
from click.testing import CliRunner

from ream_lite.cli import main


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


def test_saved_statistics_replan_at_another_ratio(model_dirs, calib_file, tmp_path):
    """--no-sequential statistics saved once; REAP at another ratio from them equals REAP calibrated afresh."""
    _, src = model_dirs["qwen3_moe"]
    common = ["--calib", calib_file, "--seq-len", 32, "--num-sequences", 12, "--no-sequential", "--method", "reap",
              "--guard", "off"]
    r = run("compress", src, tmp_path / "six", "--experts", 6, *common, "--save-stats", tmp_path / "stats")
    assert r.exit_code == 0, r.output
    r = run("compress", src, tmp_path / "a" / "four", "--experts", 4, *common)
    assert r.exit_code == 0, r.output
    r = run("compress", src, tmp_path / "b" / "four", "--experts", 4, "--method", "reap", "--from-stats",
            tmp_path / "stats")
    assert r.exit_code == 0, r.output
    a, b = tmp_path / "a" / "four", tmp_path / "b" / "four"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    kept = lambda d: [L["kept"] for L in json.loads((d / "ream_plan.json").read_text())["layers"]]  # noqa: E731
    assert kept(a) == kept(b)
    # merging on weights alone works from statistics; on activations it cannot, and says so
    r = run("compress", src, tmp_path / "m", "--experts", 4, "--method", "ream", "--align", "act", "--guard", "off",
            "--from-stats", tmp_path / "stats")
    assert r.exit_code == 2 and "every expert's output" in r.output  # REAP statistics are not dense
    r = run("compress", src, tmp_path / "seq", "--experts", 6, "--calib", calib_file, "--seq-len", 32,
            "--num-sequences", 12, "--method", "reap", "--save-stats", tmp_path / "seqstats")
    assert r.exit_code == 0, r.output
    r = run("compress", src, tmp_path / "x", "--experts", 4, "--method", "reap", "--from-stats", tmp_path / "seqstats")
    assert r.exit_code == 2 and "sequentially" in r.output and not (tmp_path / "x").exists()


def test_dense_statistics_allow_weight_aligned_merging(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["qwen3_moe"]
    r = run("compress", src, tmp_path / "six", "--experts", 6, "--calib", calib_file, "--seq-len", 32,
            "--num-sequences", 12, "--no-sequential", "--method", "ream", "--guard", "off", "--save-stats",
            tmp_path / "stats")
    assert r.exit_code == 0, r.output
    r = run("compress", src, tmp_path / "four", "--experts", 4, "--method", "ream", "--guard", "off", "--align",
            "weight", "--from-stats", tmp_path / "stats")
    assert r.exit_code == 0, r.output
    r = run("compress", src, tmp_path / "act", "--experts", 4, "--method", "ream", "--guard", "off",
            "--from-stats", tmp_path / "stats")
    assert r.exit_code == 2 and "--align weight" in r.output


def test_statistics_of_two_runs_are_never_mixed(model_dirs, calib_file, tmp_path):
    _, src = model_dirs["qwen3_moe"]
    common = ["--calib", calib_file, "--seq-len", 32, "--num-sequences", 12, "--no-sequential", "--method", "reap"]
    stats = tmp_path / "stats"
    assert run("compress", src, tmp_path / "a", "--experts", 6, *common, "--save-stats", stats).exit_code == 0
    stale = stats / "layer-00099.safetensors"
    stale.write_bytes(b"from an older run")
    assert run("compress", src, tmp_path / "b", "--experts", 6, *common, "--seed", 1, "--save-stats",
               stats).exit_code == 0
    assert not stale.exists()  # a fresh run clears the layer files of an earlier one
    good = (stats / "stats.json").read_text()
    (stats / "stats.json").write_text(json.dumps({**json.loads(good), "run": "something else"}))
    r = run("compress", src, tmp_path / "c", "--experts", 4, "--method", "reap", "--from-stats", stats)
    assert r.exit_code == 2 and "another run" in r.output and "Traceback" not in r.output
    (stats / "stats.json").write_text(good)
    (stats / "layer-00001.safetensors").write_bytes(b"truncated")
    r = run("compress", src, tmp_path / "c", "--experts", 4, "--method", "reap", "--from-stats", stats)
    assert r.exit_code == 2 and "layer-00001.safetensors: unreadable statistics" in r.output
    assert not (tmp_path / "c").exists()
