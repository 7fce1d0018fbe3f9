"""What a compression survives and detects, counted: the figures of README's "What survives what" table.

    python benchmarks/faults.py [--kill-points all] [--resume-kills 10] [--flips 100] [--verify-mib 1024]
                                [--dir DIR]

On a tiny 3-layer Qwen3-MoE (REAP 8 -> 5, snapshots after every layer, 60 KB shards so that finishing renames
files), single-threaded so that a killed run and its resume round alike:
- kills: the run killed (forked child, `os._exit`, as SIGKILL leaves it) just before each write, sync, rename,
  removal and allocation it makes (`--kill-points all`, or N spread over them), each followed by `--resume`;
  `--resume-kills` of them have the resume killed too, before it resumes once more. Each outcome is byte-identical
  to the uninterrupted run, a one-line refusal, or (the failure) something else;
- disk full: ENOSPC in an output shard, a resume snapshot, the resume record and the work-dir spill (a real tmpfs
  where this process may mount one, else injected), then space freed and `--resume` (or a rerun, where nothing was
  recorded yet);
- damage: bytes flipped in a partial output (one in each kind of file, then `--flips` at random), and an input
  shard rewritten in place with its modification time kept; each resume refused or byte-identical;
- hostile files: every malformed safetensors header and index of `ream_lite.faults`, and config.json with each
  numeric key deleted or set to each of 8 bad values: refused in one line, or run to completion;
- the price: how fast a resume checks a partial output against its checksums (`--verify-mib` of tensors).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import build_model, save_model  # noqa: E402

from ream_lite import faults  # noqa: E402
from ream_lite.checkpoint.reader import INDEX_NAME, CheckpointReader  # noqa: E402
from ream_lite.errors import ReamLiteError  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. 12 + 30 = 42. def f(x): return x * 2\n" * 40


def outcome(result, out: Path, ref: dict) -> str:
    """identical | refused | failed (a traceback, or an output that differs from the uninterrupted one)."""
    if result.exit_code == 0:
        return "identical" if faults.digests(out) == ref else "failed"
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    clean = result.exit_code == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in result.output
    return "refused" if clean else "failed"


def kills(run, ref, points, resume_kills) -> Counter:
    counts = Counter()
    run.clear()
    seen = faults.boundaries(run)
    run.clear()
    picks = range(len(seen)) if points == "all" else faults.spread(len(seen), int(points))
    double = set(faults.spread(len(picks), resume_kills)) if resume_kills else set()
    for n, k in enumerate(picks):
        run.clear()
        if faults.killed_at(run, k) != faults.KILLED:
            counts["not reached"] += 1
            continue
        if n in double:
            counts["resume killed too"] += faults.killed_at(lambda: run("--resume"), 7) == faults.KILLED
        counts[outcome(run.invoke("--resume"), run.out, ref)] += 1
    counts["boundaries"] = len(seen)
    return counts


def disk_full(make_run, work: Path) -> Counter:
    counts = Counter()
    disk = work / "small"
    disk.mkdir()
    with faults.small_disk(disk) as real:
        counts["real tmpfs" if real else "injected"] += 1
        cases = {
            "shard": (False, lambda k, p: k == "write" and p.suffix == ".tmp" and (p.parent / "resume").exists()),
            "snapshot": (False, lambda k, p: k == "write" and p.name == "hidden-00002.bin"),
            "resume record": (False, lambda k, p: k == "write" and p.parent.name == "layers" and p.name != "00000.json"),
            "work dir": (True, lambda k, p: k == "allocate"),
        }
        for name, (spill, when) in cases.items():
            run = make_run(work / f"out-{name.replace(' ', '-')}" if spill else disk / "out",
                           *(("--store", "disk", "--work-dir", str(disk)) if spill else ()))
            run.clear()
            assert run() == 0
            ref = faults.digests(run.out)
            run.clear()
            with faults.disk_fills(disk, real, when) as state:
                r = run.invoke()
            said = r.exit_code == 2 and "disk full while writing" in r.output and "GiB more are needed" in r.output
            (disk / "ballast").unlink(missing_ok=True)
            again = run.invoke("--resume") if run.partial.exists() else run.invoke()
            ok = state["filled"] and said and again.exit_code == 0 and faults.digests(run.out) == ref
            counts["resumed byte-identical" if ok else f"failed: {name}"] += 1
            run.clear()
    return counts


def damage(run, ref, flips: int, work: Path) -> Counter:
    from ream_lite import pipeline

    counts = Counter()
    real = pipeline.compress_layer
    pipeline.compress_layer = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[2] == 2 else real(*a, **k)
    try:
        run.clear()
        assert run() == 2
    finally:
        pipeline.compress_layer = real
    pristine = work / "pristine"
    shutil.copytree(run.partial, pristine)

    def attempt(rel: Path, offset: int) -> str:
        run.clear()
        shutil.copytree(pristine, run.partial)
        faults.flip_byte(run.partial / rel, offset)
        return outcome(run.invoke("--resume"), run.out, ref)

    targeted = [Path("shard-00000.tmp"), Path("resume/manifest.json"), Path("resume/layers/00000.json"),
                Path("resume/shards/00000-00000.json"), next(Path("resume").joinpath(p.name) for p in
                                                          (pristine / "resume").glob("hidden-*.bin"))]
    for rel in targeted:
        counts[f"targeted {attempt(rel, (pristine / rel).stat().st_size // 2)}"] += 1
    rng = random.Random(0)
    files = [p.relative_to(pristine) for p in sorted(pristine.rglob("*")) if p.is_file() and p.stat().st_size]
    for _ in range(flips):
        rel = rng.choice(files)
        counts[f"random {attempt(rel, rng.randrange((pristine / rel).stat().st_size))}"] += 1
    return counts


def rewritten_input(make_run, src: Path, work: Path) -> str:
    """An input shard rewritten in place between a run and its resume, modification time kept."""
    import os

    from ream_lite import pipeline

    copy = work / "src-copy"
    shutil.copytree(src, copy)
    run = make_run(work / "out-rewritten")
    run.args[1] = str(copy)
    real = pipeline.compress_layer
    pipeline.compress_layer = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[2] == 1 else real(*a, **k)
    try:
        assert run() == 2
    finally:
        pipeline.compress_layer = real
    shard = copy / "model.safetensors"
    st = shard.stat()
    faults.flip_byte(shard, st.st_size - 10)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run.invoke("--resume")
    return "refused" if r.exit_code == 2 and "the input model changed" in r.output else "failed"


def hostile(src: Path, sharded: Path, calib: Path, work: Path) -> Counter:
    import os

    counts = Counter()
    raw = (src / "model.safetensors").read_bytes()
    for name, bad in faults.header_mutations(raw):
        d = work / "h"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / "model.safetensors").write_bytes(bad)
        try:
            CheckpointReader(d)
            counts["header accepted"] += 1
        except ReamLiteError as e:
            counts["header refused" if "\n" not in str(e) else "header failed"] += 1
        except Exception:  # noqa: BLE001 (counted: the figure this benchmark exists for)
            counts["header failed"] += 1
    weight_map = json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    for name, value in faults.index_mutations(weight_map):
        d = work / "i"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(sharded, d)
        (d / INDEX_NAME).write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        try:
            CheckpointReader(d)
            counts["index accepted"] += 1
        except ReamLiteError:
            counts["index refused"] += 1
        except Exception:  # noqa: BLE001
            counts["index failed"] += 1
    config = json.loads((src / "config.json").read_text())
    for i, (name, cfg) in enumerate(faults.config_mutations(config)):
        d = work / "c"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        (d / "config.json").write_text(json.dumps(cfg))
        run = faults.CompressRun(d, work / "c-out", "--experts", "5", "--calib", str(calib), "--seq-len", "16",
                                 "--num-sequences", "6", "--device", "cpu")
        run.clear()
        r = run.invoke()
        if r.exit_code == 0:
            counts["config ran"] += 1
        else:
            ok = r.exit_code == 2 and "Traceback" not in r.output and not run.partial.exists()
            counts["config refused" if ok else "config failed"] += 1
            if not ok:
                print(f"  config {name}: exit {r.exit_code}: {r.output.strip().splitlines()[-1:]}")
    os.sync()
    return counts


def verify_speed(mib: int, work: Path) -> str:
    import torch

    from ream_lite.checkpoint.writer import CheckpointWriter

    w = CheckpointWriter(work / "v", max_shard_bytes=10**12)
    t = torch.randint(0, 255, (64 * 2**20,), dtype=torch.uint8)
    for i in range(max(1, mib // 64)):
        w.add(f"t{i}", t)
    state = json.loads(json.dumps(w.state()))
    w.close_files()
    t0 = time.perf_counter()
    CheckpointWriter(work / "v", max_shard_bytes=10**12, resume=state).close_files()
    dt = time.perf_counter() - t0
    size = mib * 2**20
    return f"{size / 2**30:.2f} GiB checked in {dt:.2f} s ({size / 2**30 / dt:.2f} GiB/s, page cache warm)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill-points", default="all", help="all, or how many boundaries to kill at")
    ap.add_argument("--resume-kills", type=int, default=10)
    ap.add_argument("--flips", type=int, default=100)
    ap.add_argument("--verify-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="ream-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model("qwen3_moe")
    src = save_model(model, work / "src")
    sharded = save_model(model, work / "sharded", max_shard_size="100KB")
    calib = work / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i:], "domain": d}) for i, d in ((0, "a"), (7, "b"))) + "\n")

    def make_run(out: Path, *extra: str) -> faults.CompressRun:
        return faults.CompressRun(src, out, "--experts", "5", "--calib", str(calib), "--seq-len", "32",
                                  "--num-sequences", "12", "--device", "cpu", "--method", "reap",
                                  "--snapshot-every", "layer", "--max-shard-size", "60KB", *extra)

    run = make_run(work / "out")
    with faults.single_threaded():
        run.clear()
        assert run() == 0
        ref = faults.digests(run.out)
        t0 = time.perf_counter()
        k = kills(run, ref, a.kill_points, a.resume_kills)
        print(f"kills          {dict(k)}  ({time.perf_counter() - t0:.0f} s)")
        print(f"disk full      {dict(disk_full(make_run, work))}")
        print(f"damage         {dict(damage(run, ref, a.flips, work))}, input rewritten in place: "
              f"{rewritten_input(make_run, src, work)}")
    print(f"hostile files  {dict(hostile(src, sharded, calib, work))}")
    print(f"verify         {verify_speed(a.verify_mib, work)}")
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
