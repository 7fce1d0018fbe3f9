"""Resume after a kill: the output of an interrupted-then-resumed compression is byte for byte an uninterrupted one's,
whether or not the kill lands right after a snapshot."""

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
import torch
from click.testing import CliRunner
from tiny_models import build_model, save_model, save_mtp_model

from ream_lite.checkpoint import files
from ream_lite.checkpoint.writer import CheckpointWriter
from ream_lite.cli import main
from ream_lite.engine.store import HiddenStateStore
from ream_lite.resume import FORMAT, ResumeLog, RunIdentity, SnapshotSchedule, expected_snapshots

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
        raw = (out.with_name(out.name + ".partial") / "resume" / "manifest.json").read_bytes()
        return json.loads(files.unseal(raw))["steps_done"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return 0


@pytest.mark.parametrize("every", ["layer", "2"])
def test_sigkill_then_resume_is_byte_identical(five_layers, calib_file, tmp_path, every):
    """Killed just after layer 2 was written: recorded by its snapshot (every layer), or not (every 2 layers: the
    last snapshot is after layer 1, and the resume redoes layer 2 over bytes the killed run already wrote)."""
    out, ref = tmp_path / "out", tmp_path / "uninterrupted"
    # at the same path: the model card and the plan record the command, which names the output directory
    assert run(*args(five_layers, out, calib_file)).exit_code == 0
    out.rename(ref)

    env = {**os.environ, "REAM_LITE_TEST_LAYER_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "ream_lite", *args(five_layers, out, calib_file),
                             "--snapshot-every", every], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        r = run(*[x or str(out) for x in a], "--snapshot-every", "layer")
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
        assert run(*args(five_layers, out, calib_file, "--snapshot-every", "layer")).exit_code == 2
    done = tmp_path / "done"
    assert run(*args(five_layers, done, calib_file)).exit_code == 0
    r = run("apply", str(done), str(five_layers), str(out))
    assert r.exit_code == 2 and "interrupted compression" in r.output and manifest_steps(out) == 2
    r = run(*args(five_layers, out, calib_file, "--save-stats", str(out / "stats")))
    assert r.exit_code == 2 and "--save-stats" in r.output and "must not be inside" in r.output
    assert manifest_steps(out) == 2


def test_interrupted_after_a_layer_without_snapshot_is_resumed_byte_identical(five_layers, calib_file, tmp_path):
    """--snapshot-every 2, interrupted as layer 3 starts: layers 0-2 are written, the last snapshot is after layer 1.
    The partial output holds bytes past the recorded state (the open shard grew, shards were begun after it); the
    resume drops them, redoes layer 2 (with another interval: it is no part of the run's identity) and writes the
    same bytes as an uninterrupted run."""
    out, ref = tmp_path / "out", tmp_path / "uninterrupted"
    small = ("--max-shard-size", "60KB")  # a shard or so per layer
    assert run(*args(five_layers, out, calib_file, *small)).exit_code == 0
    out.rename(ref)

    with ctrl_c_at_layer(3):
        r = run(*args(five_layers, out, calib_file, *small, "--snapshot-every", "2"))
    assert r.exit_code == 2 and "interrupted: 2 of 5 layers are done" in r.output
    partial = out.with_name("out.partial")
    recorded = ResumeLog(partial).load()["writer"]["shards"]
    assert len(list(partial.glob("shard-*.tmp"))) > len(recorded)  # begun after the snapshot
    last = recorded[-1]
    assert not last["closed"] and (partial / last["file"]).stat().st_size > 8 + 256 * 1024 + last["data_bytes"]

    r = run(*args(five_layers, out, calib_file, *small, "--snapshot-every", "3", "--resume"))
    assert r.exit_code == 0, r.output
    assert digests(out) == digests(ref)


def test_snapshots_off_leave_nothing_to_resume(five_layers, calib_file, tmp_path):
    out = tmp_path / "out"
    r = run(*args(five_layers, out, calib_file, "--snapshot-every", "0"))
    assert r.exit_code == 2 and "--snapshot-every 0: give auto, layer, off or a positive number" in r.output
    with ctrl_c_at_layer(2):
        r = run(*args(five_layers, out, calib_file, "--snapshot-every", "off"))
    assert r.exit_code != 0 and not out.with_name("out.partial").exists() and not out.exists()


def test_writer_resumed_from_an_earlier_state_drops_what_followed(tmp_path):
    """A writer resumed from a state recorded tensors ago: the shard open then is cut back to its recorded length
    (though it grew, and was even closed with its header written, after the state), shards begun after the state
    are deleted, and writing the rest again gives the files of a writer never interrupted."""
    tensors = [(f"t{i}", torch.full((100,), float(i))) for i in range(10)]  # 400 bytes each: two per shard
    ref = CheckpointWriter(tmp_path / "ref", max_shard_bytes=1000)
    for name, t in tensors:
        ref.add(name, t)
    ref.finish({"model_type": "x"})

    w = CheckpointWriter(tmp_path / "out", max_shard_bytes=1000)
    for name, t in tensors[:3]:  # shard 0: t0 t1 (closed); shard 1: t2 (open)
        w.add(name, t)
    state = json.loads(json.dumps(w.state()))  # as the resume record holds it
    for name, t in tensors[3:6]:  # shard 1 grows to t2 t3 and is closed; shard 2 begun
        w.add(name, t)
    w.close_files()
    partial = tmp_path / "out.partial"
    assert (partial / "shard-00002.tmp").exists()
    w = CheckpointWriter(tmp_path / "out", max_shard_bytes=1000, resume=state)
    assert not (partial / "shard-00002.tmp").exists()
    assert (partial / "shard-00001.tmp").stat().st_size == 8 + 256 * 1024 + 400
    for name, t in tensors[3:]:
        w.add(name, t)
    w.finish({"model_type": "x"})
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")


def test_each_commit_writes_only_what_finished_since_the_last(tmp_path):
    """Layer records and the shards' tensor entries go in files written once: a commit's bytes (beyond the hidden
    states) and the manifest stay about the same size however many layers are done; `load` assembles them."""
    identity = RunIdentity({"seed": 0}, {"shards": {}}, "tokens")
    hidden = HiddenStateStore([4, 4], 8, torch.float32, "host")
    hidden.buf.copy_(torch.arange(64, dtype=torch.float32).view(8, 8))
    log = ResumeLog(tmp_path)
    layers, shards, per_commit = [], [], []
    for step in range(1, 31):
        layers.append({"layer": step, "scores": [0.5] * 1000})  # ~6 KB each
        if step % 10 == 1:  # a new shard every 10 layers
            for s in shards:
                s["closed"] = True
            shards.append({"file": f"shard-{len(shards):05d}.tmp", "entries": {}, "sums": {}, "data_bytes": 0,
                           "closed": False})
        shards[-1]["entries"].update({f"layers.{step}.w{k}": {"dtype": "F32", "shape": [1000],
                                      "data_offsets": [0, 4000]} for k in range(100)})
        shards[-1]["sums"].update({f"layers.{step}.w{k}": f"crc32:{k:08x}" for k in range(100)})
        before = log.bytes_written
        state = json.loads(json.dumps({"shards": shards, "bytes_written": 4000 * step}))
        log.commit(identity, step, 31, state, layers, hidden, {"command": None, "model": "m"})
        per_commit.append(log.bytes_written - before - hidden.nbytes)
    assert max(per_commit) < 1.1 * min(per_commit)  # while the records in total grew 30-fold
    assert (tmp_path / "resume" / "manifest.json").stat().st_size < 1500
    m = log.load()
    assert m["format"] == FORMAT and m["steps_done"] == 30 and m["layers"] == layers
    assert m["writer"] == state
    assert [p.name for p in (tmp_path / "resume").glob("hidden-*.bin")] == ["hidden-00030.bin"]

    # resumed from there: the records on disk are not written again, the last step's record holds no hidden
    # states, and the older snapshot goes
    resumed = ResumeLog(tmp_path, continues=m)
    layers.append({"layer": 31})
    resumed.commit(identity, 31, 31, state, layers, None, m["first_run"])
    m = resumed.load()
    assert m["hidden"] is None and resumed.hidden_path(m) is None and len(m["layers"]) == 31 and m["writer"] == state
    assert not list((tmp_path / "resume").glob("hidden-*.bin")) and resumed.snapshots == 0
    assert resumed.bytes_written < 1500 + 100


def test_an_older_resume_format_is_refused_with_a_clear_message(five_layers, calib_file, tmp_path):
    out = tmp_path / "out"
    with ctrl_c_at_layer(2):
        assert run(*args(five_layers, out, calib_file)).exit_code == 2
    manifest = out.with_name("out.partial") / "resume" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(files.unseal(manifest.read_bytes())), "format": 1}))
    r = run(*args(five_layers, out, calib_file, "--resume"))
    assert r.exit_code == 2 and "another version of ream-lite (resume format 1" in r.output
    assert "--overwrite" in r.output


def test_snapshot_schedule():
    now = 0.0
    s = SnapshotSchedule("auto", clock=lambda: now)
    assert s.due(1, 10)  # the first right after the first layer
    now = 2.0
    s.took(2.0)
    now = 41.9
    assert not s.due(2, 10)
    now = 42.0  # 20 x the last snapshot's 2 s since it ended
    assert s.due(2, 10)
    s.took(200.0)
    now += 30 * 60  # slow snapshots: at least every 30 min
    assert s.due(3, 10)
    assert s.due(10, 10)  # the last step's record (no hidden states) whatever the interval

    def due(every):
        return [k for k in range(1, 6) if SnapshotSchedule(every).due(k, 5)]

    assert due("layer") == [1, 2, 3, 4, 5] and due(2) == due("2") == [2, 4, 5] and due("off") == []
    assert expected_snapshots("layer", 48, 30.0, 3.0) == 47 and expected_snapshots(4, 48, 30.0, 3.0) == 11
    assert expected_snapshots("auto", 48, 10.0, 5.0) == 5  # after layers 1, 11, 21, 31, 41
    assert expected_snapshots("off", 48, 10.0, 5.0) == 0
