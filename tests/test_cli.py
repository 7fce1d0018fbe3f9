"""The command line: help, inspect, and one-line errors with a non-zero exit for bad input."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig

from ream_lite.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0 and "inspect" in r.output and "eval" in r.output


@pytest.mark.parametrize("family,experts,dense", [("qwen3_moe", 8, 0), ("deepseek_v3", 16, 1), ("mixtral", 8, 0)])
def test_inspect_json(model_dirs, family, experts, dense):
    model, d = model_dirs[family]
    r = run("inspect", str(d), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["family"] == family
    assert info["experts_per_layer"] == [experts] and info["top_k"] == 2
    assert info["dense_layers"] == dense
    assert info["stored_dtypes"] == {"F32": info["total_bytes"]}
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "e_score" in n
    )
    assert info["total_bytes"] == 4 * n_params
    per_expert = 3 * 32 * 16 * 4
    moe_layers = [x for x in info["layers"] if x["kind"] == "moe"]
    assert all(x["expert_bytes"] == experts * per_expert for x in moe_layers)
    assert info["shared_experts"] == (family == "deepseek_v3")


def test_inspect_text(model_dirs):
    r = run("inspect", str(model_dirs["glm4_moe"][1]))
    assert r.exit_code == 0 and "glm4_moe" in r.output and "sigmoid_grouped_topk" in r.output


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_inputs_give_one_line(tmp_path):
    assert "no such directory" in _one_line_error(run("inspect", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    assert "no safetensors" in _one_line_error(run("inspect", str(tmp_path / "empty")))
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    assert "dense model" in _one_line_error(run("inspect", str(tmp_path / "dense")))


def test_truncated_shard_via_cli(model_dirs, tmp_path):
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(model_dirs["olmoe"][1], d)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert "truncated" in _one_line_error(run("inspect", str(d)))
    assert "truncated" in _one_line_error(run("eval", str(d), "--data", str(p)))


def test_eval_missing_data(model_dirs, tmp_path):
    assert "no such file" in _one_line_error(run("eval", str(model_dirs["olmoe"][1]), "--data", str(tmp_path / "x.jsonl")))


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ream_lite", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "ream-lite" in r.stdout
