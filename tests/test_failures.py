"""Every error a user can cause ends with one line saying what is wrong, a non-zero exit, and no output directory
that looks complete; the input directory is never written."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import build_model, save_model
from transformers import AutoModelForCausalLM, LlamaConfig

from ream_lite.cli import main


def compress(src, out, *args):
    return CliRunner().invoke(main, ["compress", str(src), str(out), "--seq-len", "32", "--num-sequences", "12",
                                     "--device", "cpu", *map(str, args)])


def one_line_error(result) -> str:
    """The run ends with exactly one `error: ...` line (the plan may be printed before it), no traceback."""
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[-1]


def nothing_complete(out: Path) -> bool:
    """Neither OUT nor anything that looks like a finished model beside it."""
    partial = out.with_name(out.name + ".partial")
    return not out.exists() and not (partial / "config.json").exists() and not (partial / "model.safetensors").exists()


def tree_digest(d: Path) -> dict:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def qwen(model_dirs, tmp_path):
    """A private copy of the tiny Qwen3-MoE that tests may damage."""
    d = tmp_path / "qwen"
    shutil.copytree(model_dirs["qwen3_moe"][1], d)
    return d


def test_missing_model(tmp_path, calib_file):
    msg = one_line_error(compress(tmp_path / "nope", tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "no such directory" in msg and nothing_complete(tmp_path / "out")


def test_unreadable_model_config(qwen, tmp_path, calib_file):
    (qwen / "config.json").write_text("{not json")
    msg = one_line_error(compress(qwen, tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "config.json: not valid JSON" in msg and nothing_complete(tmp_path / "out")


def test_unsupported_family(qwen, tmp_path, calib_file):
    cfg = json.loads((qwen / "config.json").read_text())
    cfg["model_type"] = "made_up_moe"
    (qwen / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(compress(qwen, tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "'made_up_moe' is not a supported MoE family; supported: " in msg and "qwen3_moe" in msg


def test_dense_model(tmp_path, calib_file):
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    msg = one_line_error(compress(tmp_path / "dense", tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "is a dense model (no routed experts)" in msg and nothing_complete(tmp_path / "out")


@pytest.mark.parametrize("experts,message", [
    ("8", "below the current count (8)"),  # the tiny model has 8 experts
    ("9", "below the current count (8)"),
    ("1", "at least top-k (2)"),
    ("0.1", "at least top-k (2)"),
    ("2.5", "give an integer count"),
    ("abc", "give an integer count"),
    ("0", "give an integer count"),
    ("-3", "give an integer count"),
    ("1.0e999", "give an integer count"),
])
def test_experts_out_of_range(model_dirs, tmp_path, calib_file, experts, message):
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", experts, "--calib",
                                  calib_file))
    assert message in msg and nothing_complete(tmp_path / "out")


def test_cuda_requested_but_absent(model_dirs, tmp_path, calib_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--calib",
                                  calib_file, "--device", "cuda"))
    assert "no CUDA device is available" in msg and nothing_complete(tmp_path / "out")


def test_truncated_shard(qwen, tmp_path, calib_file):
    p = qwen / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 1000])
    msg = one_line_error(compress(qwen, tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "truncated" in msg and nothing_complete(tmp_path / "out")


def test_corrupt_shard_header(qwen, tmp_path, calib_file):
    p = qwen / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:40] = b"\x00garbage garbage garbage garbage"[:32]
    p.write_bytes(bytes(raw))
    msg = one_line_error(compress(qwen, tmp_path / "out", "--experts", 4, "--calib", calib_file))
    assert "model.safetensors" in msg and nothing_complete(tmp_path / "out")


def test_work_dir_without_space(model_dirs, tmp_path, calib_file, monkeypatch):
    """Checked before any work (the plan knows the hidden states' size), not hours later."""
    real = shutil.disk_usage
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000) if Path(p) == work else real(p))
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--calib",
                                  calib_file, "--store", "disk", "--work-dir", work))
    assert "needed for hidden states" in msg and "free" in msg and nothing_complete(tmp_path / "out")


def test_output_disk_without_space(model_dirs, tmp_path, calib_file, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--calib",
                                  calib_file))
    assert "needed for the output" in msg and "free" in msg and nothing_complete(tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()


def test_nan_statistics_name_the_layer_and_expert(tmp_path, calib_file):
    model = build_model("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[5].fill_(float("inf"))
    src = save_model(model, tmp_path / "inf")
    msg = one_line_error(compress(src, tmp_path / "out", "--experts", 4, "--calib", calib_file, "--method", "ream"))
    assert "layer 1, expert 5: non-finite" in msg
    assert not (tmp_path / "out").exists()


def test_input_directory_is_never_written(model_dirs, tmp_path, calib_file):
    src = model_dirs["olmoe"][1]
    before = tree_digest(src)
    assert compress(src, tmp_path / "out", "--experts", 4, "--calib", calib_file).exit_code == 0
    assert compress(src, tmp_path / "out", "--experts", 4, "--calib", calib_file, "--overwrite").exit_code == 0
    assert tree_digest(src) == before


@pytest.mark.parametrize("content,message", [
    (b"", "no documents"),
    (b"\xff\xfe\x00binary", "cannot read as UTF-8"),
    (b'{"txt": "wrong field"}\n', "expected a JSON object with a 'text' field"),
])
def test_empty_or_unreadable_calibration(model_dirs, tmp_path, content, message):
    bad = tmp_path / "calib.jsonl"
    bad.write_bytes(content)
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--calib", bad))
    assert message in msg and nothing_complete(tmp_path / "out")
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--calib",
                                  tmp_path / "missing.jsonl"))
    assert "no such file" in msg


@pytest.mark.parametrize("mix,message", [
    ("1:x:1", "'x' is not a number"),
    ("-1:1:1", "must be a finite number >= 0"),
    ("0:0:0", "sum to 0"),
    ("1:1", "3 domains"),
    ("poetry=1", "poetry"),
])
def test_bad_mix(model_dirs, tmp_path, mix, message):
    msg = one_line_error(compress(model_dirs["qwen3_moe"][1], tmp_path / "out", "--experts", 4, "--mix", mix))
    assert msg.startswith(f"error: --mix {mix}") and message in msg and nothing_complete(tmp_path / "out")
