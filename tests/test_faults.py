"""What a compression survives and what it detects (README: "What survives what"): kills at write boundaries, a
full disk, damaged partial outputs and inputs, a second run into the same output. Hostile and malformed input
files are in test_hostile_files.py. `benchmarks/faults.py` runs the same with larger counts."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from ream_lite import faults
from ream_lite.checkpoint.lock import OutputLock, lock_path
from ream_lite.cli import main

KILL_POINTS = 24  # boundaries killed at in the suite (every sync, rename and removal, the rest writes); more in
# benchmarks/faults.py
RANDOM_FLIPS = 12  # random bytes of a partial output damaged, each resumed


digests = faults.digests


class Run(faults.CompressRun):
    """The tiny 3-layer Qwen3-MoE into `out`, snapshots after every layer, several output shards (so that
    finishing renames files), REAP (no process pool: the kill harness forks)."""

    def __init__(self, src: Path, out: Path, calib: Path, *extra: str):
        super().__init__(src, out, "--experts", "5", "--calib", str(calib), "--seq-len", "32", "--num-sequences",
                         "12", "--device", "cpu", "--method", "reap", "--snapshot-every", "layer",
                         "--max-shard-size", "60KB", *extra)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.fixture(scope="module")
def reference(model_dirs, calib_file, tmp_path_factory):
    """The uninterrupted run's boundaries and output digests, made at the path the faulted runs write to (the model
    card and plan record the command, which names it)."""
    run = Run(model_dirs["qwen3_moe"][1], tmp_path_factory.mktemp("faults") / "out", calib_file)
    with faults.single_threaded():
        seen = faults.boundaries(run)
    assert run.out.exists()
    ref = digests(run.out)
    run.clear()
    return run, seen, ref


def test_killed_at_write_boundaries_resumes_byte_identical(reference):
    """Killed (as by SIGKILL) just before a write, sync, rename or removal; `--resume` gives the uninterrupted
    output byte for byte, also when the resume itself is killed once more."""
    run, seen, ref = reference
    kinds = Counter(kind for kind, _ in seen)
    assert kinds["write"] > 50 and kinds["sync"] and kinds["rename"] and kinds["remove"]
    others = [i for i, (kind, _) in enumerate(seen) if kind != "write"]
    writes = [i for i, (kind, _) in enumerate(seen) if kind == "write"]
    points = sorted(others + [writes[i] for i in faults.spread(len(writes), max(2, KILL_POINTS - len(others)))])
    outcomes = Counter()
    with faults.single_threaded():
        for n, k in enumerate(points):
            run.clear()
            assert faults.killed_at(run, k) == faults.KILLED
            assert not run.out.exists(), f"killed at {seen[k]}, the output looks complete"
            if n % 8 == 3:  # the resume killed too, a few boundaries in
                assert faults.killed_at(lambda: run("--resume"), 5) == faults.KILLED
            r = run.invoke("--resume")
            assert r.exit_code == 0, (seen[k], r.output)
            assert digests(run.out) == ref, f"killed at boundary {k} {seen[k]}: the resumed output differs"
            outcomes[seen[k][0]] += 1
    assert sum(outcomes.values()) == len(points)


# -- a full disk ---------------------------------------------------------------------------------------------------
@pytest.fixture(params=["real", "injected"])
def small_disk(tmp_path, request):
    """(directory, real): a real 16 MiB filesystem (tmpfs; skipped where this process may not mount one), or a
    plain directory whose writes the test fails with ENOSPC by injection."""
    d = tmp_path / "small"
    d.mkdir()
    if request.param == "injected":
        yield d, False
        return
    with faults.small_disk(d) as real:
        if not real:
            pytest.skip("cannot mount a tmpfs here (not root): the injected variant runs instead")
        yield d, True


disk_fills = faults.disk_fills


def resume_after_freeing(run: Run, disk: Path, ref: dict, resume: bool = True) -> None:
    (disk / "ballast").unlink(missing_ok=True)
    r = run.invoke("--resume") if resume else run.invoke()
    assert r.exit_code == 0, r.output
    assert digests(run.out) == ref


def _uninterrupted(run: Run) -> dict:
    assert run() == 0
    ref = digests(run.out)
    run.clear()
    return ref


@pytest.mark.parametrize("where", ["shard", "snapshot"])
def test_disk_full_in_the_output_says_how_much_and_resumes(small_disk, model_dirs, calib_file, where):
    disk, real = small_disk
    run = Run(model_dirs["qwen3_moe"][1], disk / "out", calib_file)
    ref = _uninterrupted(run)
    recorded = run.partial / "resume" / "manifest.json"
    if where == "shard":  # a tensor of a later layer, after a snapshot
        when = lambda kind, path: kind == "write" and path.suffix == ".tmp" and recorded.exists()
    else:  # the second hidden-state snapshot
        when = lambda kind, path: kind == "write" and path.name.startswith("hidden-0000") and path.name != \
            "hidden-00001.bin"
    try:
        with disk_fills(disk, real, when) as state:
            r = run.invoke()
    except OSError as e:  # (a real ENOSPC must come back as the run's error, never out of the test's own ballast)
        pytest.fail(f"ENOSPC escaped: {e}")
    assert state["filled"]
    msg = one_line_error(r)
    assert "disk full while writing" in msg and "GiB more are needed for the output" in msg, msg
    assert "--resume" in msg and "layers are done" in msg
    assert not run.out.exists() and recorded.exists()
    resume_after_freeing(run, disk, ref)


def test_disk_full_in_the_work_dir(small_disk, model_dirs, calib_file, tmp_path):
    """The hidden states spill into the work dir: its file is reserved when made (fallocate), so a disk filled by
    something else is one clear line, never a SIGBUS in the middle of a layer."""
    disk, real = small_disk
    run = Run(model_dirs["qwen3_moe"][1], tmp_path / "out", calib_file, "--store", "disk", "--work-dir", str(disk))
    ref = _uninterrupted(run)
    with disk_fills(disk, real, lambda kind, path: kind == "allocate"):
        r = run.invoke()
    msg = one_line_error(r)
    assert "disk full while writing hidden states" in msg and "needed for the hidden states (--work-dir)" in msg
    assert "run the command again" in msg and not run.out.exists()
    resume_after_freeing(run, disk, ref, resume=False)


# -- damage detected -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory):
    """A pristine partial output: the reference run stopped (Ctrl-C) as it began its last layer, two recorded."""
    from ream_lite import pipeline

    run, _, ref = reference
    run.clear()
    real = pipeline.compress_layer

    def stop(*a, **k):
        if a[2] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    pipeline.compress_layer = stop
    try:
        r = run.invoke()
    finally:
        pipeline.compress_layer = real
    assert r.exit_code == 2 and "interrupted: 2 of 3 layers are done" in r.output, r.output
    keep = tmp_path_factory.mktemp("pristine") / "partial"
    shutil.copytree(run.partial, keep)
    shutil.rmtree(run.partial)
    return run, keep, ref


def resume_damaged(interrupted, damage) -> tuple[str, str]:
    """Copy the pristine partial output, `damage(partial)` it, resume: ("refused", line) or ("identical", "")."""
    run, pristine, ref = interrupted
    run.clear()
    shutil.copytree(pristine, run.partial)
    damage(run.partial)
    r = run.invoke("--resume")
    if r.exit_code == 0:
        assert digests(run.out) == ref, "a damaged partial output was resumed into a different model"
        return "identical", ""
    return "refused", one_line_error(r)


def _recorded_shard_byte(partial: Path) -> tuple[Path, int]:
    """A byte inside the recorded tensor data of the first shard."""
    return partial / "shard-00000.tmp", 8 + 256 * 1024 + 100


@pytest.mark.parametrize("target,expected", [
    ("shard data", "the partial output was damaged since it was written (the bytes of"),
    ("closed shard header", "its header differs from the one written"),
    ("layer record", "resume record damaged since it was written"),
    ("entry record", "resume record damaged since it was written"),
    ("manifest", "resume record damaged since it was written"),
    ("hidden states", "saved hidden states damaged since they were written"),
])
def test_damaged_partial_output_is_refused(interrupted, target, expected):
    def damage(partial: Path) -> None:
        if target == "shard data":
            faults.flip_byte(*_recorded_shard_byte(partial))
        elif target == "closed shard header":
            faults.flip_byte(partial / "shard-00000.tmp", 40)
        elif target == "layer record":
            faults.flip_byte(partial / "resume" / "layers" / "00000.json", 20)
        elif target == "entry record":
            faults.flip_byte(partial / "resume" / "shards" / "00000-00000.json", 30)
        elif target == "manifest":
            faults.flip_byte(partial / "resume" / "manifest.json", 60)
        else:
            faults.flip_byte(next((partial / "resume").glob("hidden-*.bin")), 33)

    outcome, msg = resume_damaged(interrupted, damage)
    assert outcome == "refused" and expected in msg and "--overwrite" in msg, msg


def test_random_damage_is_detected_or_harmless(interrupted):
    """Bytes flipped at random in the partial output: each resume refuses, or (where the byte is one the resume
    rewrites anyway: past a shard's recorded length, an open shard's unwritten header) gives the uninterrupted
    output; never a silently different model."""
    import random

    rng = random.Random(0)
    _, pristine, _ = interrupted
    candidates = [p.relative_to(pristine) for p in sorted(pristine.rglob("*")) if p.is_file() and p.stat().st_size]
    outcomes = Counter()
    for _ in range(RANDOM_FLIPS):
        rel = rng.choice(candidates)
        offset = rng.randrange((pristine / rel).stat().st_size)
        outcome, _ = resume_damaged(interrupted, lambda partial, r=rel, o=offset: faults.flip_byte(partial / r, o))
        outcomes[outcome] += 1
    print(f"random damage: {dict(outcomes)}")
    assert outcomes["refused"] >= RANDOM_FLIPS // 3, outcomes  # (most bytes of a partial output are recorded)


def test_input_rewritten_in_place_is_refused(model_dirs, calib_file, tmp_path):
    """Same names, shapes, size and even modification time, other bytes: caught by the sampled content hash."""
    import os

    src = tmp_path / "src"
    shutil.copytree(model_dirs["qwen3_moe"][1], src)
    run = Run(src, tmp_path / "out", calib_file)
    from ream_lite import pipeline

    real = pipeline.compress_layer
    pipeline.compress_layer = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[2] == 1 else real(*a, **k)
    try:
        r = run.invoke()
    finally:
        pipeline.compress_layer = real
    assert r.exit_code == 2 and "interrupted: 1 of 3 layers are done" in r.output, r.output
    shard = src / "model.safetensors"
    st = shard.stat()
    faults.flip_byte(shard, st.st_size - 10)  # inside the last tensor
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = one_line_error(run.invoke("--resume"))
    assert "the input model changed (model.safetensors: contents)" in msg


# -- one run per output --------------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_output_is_refused(model_dirs, calib_file, tmp_path):
    run = Run(model_dirs["qwen3_moe"][1], tmp_path / "out", calib_file)
    with OutputLock(run.out, "the other run"):  # (flock: a second open file of this process conflicts as another's)
        msg = one_line_error(run.invoke())
        assert "another ream-lite run is writing this output" in msg and "pid" in msg
        done = tmp_path / "done"
        assert Run(model_dirs["qwen3_moe"][1], done, calib_file)() == 0
        msg = one_line_error(CliRunner().invoke(main, ["apply", str(done), str(model_dirs["qwen3_moe"][1]),
                                                       str(run.out)]))
        assert "another ream-lite run is writing this output" in msg
    assert not run.out.exists() and not run.partial.exists()


def test_a_stale_lock_from_a_killed_run_is_taken_over(model_dirs, calib_file, tmp_path, caplog):
    run = Run(model_dirs["qwen3_moe"][1], tmp_path / "out", calib_file)
    lock_path(run.out).write_text(json.dumps({"host": "h", "pid": 999999999, "started": 0, "command": "x"}))
    assert run() == 0
    assert "taking over a stale lock" in caplog.text
    assert not lock_path(run.out).exists()  # (removed when the run ends)
