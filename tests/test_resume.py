"""Resume after a kill: the output of an interrupted-then-resumed compression is byte for byte an uninterrupted one's."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import build_model, save_model, save_mtp_model

from ream_lite.cli import main

# ream_report.json holds wall times and peak memory: the only file that may differ between two runs
VARYING = {"ream_report.json"}



@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    return save_model(build_model("qwen3_moe", num_hidden_layers=5), tmp_path_factory.mktemp("five"))


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.name not in VARYING}


def args(src, out, calib, *extra):
    return ["compress", str(src), str(out), "--experts", "5", "--calib", str(calib), "--seq-len", "32",
            "--num-sequences", "12", "--device", "cpu", *extra]


def run(*a):
    return CliRunner().invoke(main, list(a))


@contextmanager
def ctrl_c_at_layer(layer: int):
    """Within the block, `compress` gets a KeyboardInterrupt as it starts layer `layer` (as Ctrl-C would)."""
    import ream_lite.pipeline as pipeline

    real = pipeline.compress_layer

    def interrupted(*a, **k):
        if a[2] == layer:  # compress_layer(streamer, writer, index, ...)
            raise KeyboardInterrupt
        return real(*a, **k)

    pipeline.compress_layer = interrupted
    try:
        yield
    finally:
        pipeline.compress_layer = real


def manifest_steps(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + ".partial") / "resume" / "manifest.json").read_text())["steps_done"]
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_then_resume_is_byte_identical(five_layers, calib_file, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "uninterrupted"
    # at the same path: the model card and the plan record the command, which names the output directory
    assert run(*args(five_layers, out, calib_file)).exit_code == 0
    out.rename(ref)

    env = {**os.environ, "REAM_LITE_TEST_LAYER_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "ream_lite", *args(five_layers, out, calib_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while manifest_steps(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # into the next layer: its tensors are (being) written, not yet recorded
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a complete-looking output"
    done = manifest_steps(out)
    assert 2 <= done < 5

    r = run(*args(five_layers, out, calib_file))  # without --resume: refused, the partial output kept
    assert r.exit_code == 2 and "--resume" in r.output and "interrupted run" in r.output
    r = run(*args(five_layers, out, calib_file, "--seed", "1", "--resume"))
    assert r.exit_code == 2 and "settings differ: seed" in r.output
    assert manifest_steps(out) == done

    r = run(*args(five_layers, out, calib_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert digests(out) == digests(ref)
    assert not (out / "resume").exists() and not out.with_name("out.partial").exists()
    report = json.loads((out / "ream_report.json").read_text())
    assert [L["layer"] for L in report["layers"]] == [0, 1, 2, 3, 4]


def test_ctrl_c_keeps_the_partial_output_and_says_how_to_resume(calib_file, tmp_path):
    """DeepSeek-V3 with an MTP layer: interrupted in the MTP layer (after the decoder layers), resumed there."""
    src = save_mtp_model(tmp_path / "ds")
    a = ["compress", str(src), "", "--experts", "8", "--calib", str(calib_file), "--seq-len", "32",
         "--num-sequences", "12", "--device", "cpu"]
    ref, out = tmp_path / "uninterrupted", tmp_path / "out"
    assert run(*[x or str(out) for x in a]).exit_code == 0
    out.rename(ref)

    with ctrl_c_at_layer(3):  # the MTP layer
        r = run(*[x or str(out) for x in a])
    assert r.exit_code == 2 and "interrupted: 3 of 4 layers are done" in r.output and "--resume" in r.output
    assert not out.exists() and out.with_name("out.partial").exists()

    r = run(*[x or str(out) for x in a], "--resume")
    assert r.exit_code == 0, r.output
    assert digests(out) == digests(ref)


def test_resume_refuses_a_changed_input(five_layers, calib_file, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(five_layers, src)
    out = tmp_path / "out"
    with ctrl_c_at_layer(2):
        assert run(*args(src, out, calib_file)).exit_code == 2
    cfg = json.loads((src / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(cfg))
    r = run(*args(src, out, calib_file, "--resume"))
    assert r.exit_code == 2 and "the input model changed (config.json)" in r.output
    # --overwrite starts over
    assert run(*args(src, out, calib_file, "--overwrite")).exit_code == 0
    assert (out / "model.safetensors").exists()


def test_resume_of_a_complete_output_does_nothing(five_layers, calib_file, tmp_path):
    out = tmp_path / "out"
    assert run(*args(five_layers, out, calib_file)).exit_code == 0
    before = digests(out)
    r = run(*args(five_layers, out, calib_file, "--resume"))
    assert r.exit_code == 0 and digests(out) == before


def test_interrupted_while_finishing_is_resumed(five_layers, calib_file, tmp_path, monkeypatch):
    """Killed after every layer is recorded and the shards got their final names, before the output is in place:
    the resume takes the shards back and finishes; never starts over, never loses the layers."""
    import ream_lite.resume as resume

    out, ref = tmp_path / "out", tmp_path / "uninterrupted"
    a = args(five_layers, out, calib_file, "--max-shard-size", "60KB")  # several shards: renamed in finish()
    assert run(*a).exit_code == 0
    out.rename(ref)
    assert len(list(ref.glob("model-*.safetensors"))) > 1

    real = resume.ResumeLog.remove
    monkeypatch.setattr(resume.ResumeLog, "remove", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    r = run(*a)
    assert r.exit_code == 2 and "interrupted: 5 of 5 layers are done" in r.output
    partial = out.with_name("out.partial")
    assert not out.exists() and list(partial.glob("model-*.safetensors"))  # renamed, not yet published
    monkeypatch.setattr(resume.ResumeLog, "remove", real)
    r = run(*a, "--resume")
    assert r.exit_code == 0, r.output
    assert digests(out) == digests(ref)


def test_resume_with_overwrite_replaces_an_existing_output(five_layers, calib_file, tmp_path):
    out = tmp_path / "out"
    assert run(*args(five_layers, out, calib_file)).exit_code == 0
    before = digests(out)
    with ctrl_c_at_layer(3):
        assert run(*args(five_layers, out, calib_file, "--overwrite")).exit_code == 2
    assert out.exists()  # the old output stays until the new one is complete
    r = run(*args(five_layers, out, calib_file, "--overwrite", "--resume"))
    assert r.exit_code == 0, r.output
    assert digests(out) == before and not out.with_name("out.partial").exists()


def test_other_commands_never_discard_an_interrupted_run(five_layers, calib_file, tmp_path):
    out = tmp_path / "out"
    with ctrl_c_at_layer(2):
        assert run(*args(five_layers, out, calib_file)).exit_code == 2
    done = tmp_path / "done"
    assert run(*args(five_layers, done, calib_file)).exit_code == 0
    r = run("apply", str(done), str(five_layers), str(out))
    assert r.exit_code == 2 and "interrupted compression" in r.output and manifest_steps(out) == 2
    r = run(*args(five_layers, out, calib_file, "--save-stats", str(out / "stats")))
    assert r.exit_code == 2 and "--save-stats" in r.output and "must not be inside" in r.output
    assert manifest_steps(out) == 2
