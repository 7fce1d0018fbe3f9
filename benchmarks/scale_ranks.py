"""`compress` on 1 and on N processes (torchrun, gloo on this machine's CPU) at a real layer shape.

    python benchmarks/scale_ranks.py [--shape qwen3-30b-a3b] [--layers 2] [--nproc 2] [--methods reap ream]
                                     [--sequences 16] [--seq-len 256] [--experts-per-chunk 32] [--dir DIR]

Writes (once) a random-weight checkpoint with the model's real tensor shapes (benchmarks/synth.py), then for each
method runs: one process on one thread, one process on N threads (the same cores as N ranks), and N ranks of one
thread each under torchrun. All runs pin the expert chunks (--experts-per-chunk) and re-read experts per pass
(--expert-cache off), so the statistics pass's reads split over the ranks; the N-rank output is checked byte for
byte against the one-thread run's. Prints wall time, the speed-up, each rank's peak RSS, bytes read (all, and in
its statistics passes), and rank 0's time by phase: where the rest goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synth import synthesize  # noqa: E402

GiB = 1024**3


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["reap", "ream"])
    ap.add_argument("--experts", default="0.75")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--experts-per-chunk", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=1024,
                    help="tokens per batch: the passes split by token batches need several")
    ap.add_argument("--extra", default="", help="more compress arguments, one string")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--ranks-only", action="store_true",
                    help="run the N-rank command alone (e.g. an older commit's, beside a full run of this one)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="ream-ranks-"))
    src = synthesize(args.shape, base / args.shape, args.layers)
    common = ["--experts", args.experts, "--num-sequences", str(args.sequences), "--seq-len", str(args.seq_len),
              "--device", "cpu", "--experts-per-chunk", str(args.experts_per_chunk), "--expert-cache", "off",
              "--batch-tokens", str(args.batch_tokens),
              "--overwrite", *args.extra.split()]
    n = args.nproc
    print(f"{args.shape}, {args.layers} layers, {args.sequences} x {args.seq_len} tokens in batches of "
          f"{args.batch_tokens}, chunks of {args.experts_per_chunk} experts, {os.cpu_count()} CPU cores")
    for method in args.methods:
        outs = {k: base / f"out-{method}-{k}" for k in ("1x1", f"1x{n}", f"{n}x1")}
        one = [sys.executable, "-m", "ream_lite", "compress", str(src)]
        wall = {f"{n}x1": run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(n), "-m", "ream_lite", "compress", str(src), str(outs[f"{n}x1"]), "--method",
                               method, *common], 1)}
        report = json.loads((outs[f"{n}x1"] / "ream_report.json").read_text())
        ranks = report["totals"]["distributed"]["ranks"]
        parts = report["totals"].get("time", {}).get("parts_seconds", {})
        if args.ranks_only:
            print(f"\n{method}: wall {n} ranks x 1 thread {wall[f'{n}x1']:.1f} s")
        else:
            wall["1x1"] = run([*one, str(outs["1x1"]), "--method", method, *common], 1)
            wall[f"1x{n}"] = run([*one, str(outs[f"1x{n}"]), "--method", method, *common], n)
            same = (outs["1x1"] / "model.safetensors").read_bytes() == \
                (outs[f"{n}x1"] / "model.safetensors").read_bytes()
            print(f"\n{method}: wall 1 process x 1 thread {wall['1x1']:.1f} s, 1 process x {n} threads "
                  f"{wall[f'1x{n}']:.1f} s, {n} ranks x 1 thread {wall[f'{n}x1']:.1f} s: speed-up "
                  f"{wall['1x1'] / wall[f'{n}x1']:.2f}x over one thread, {wall[f'1x{n}'] / wall[f'{n}x1']:.2f}x "
                  f"over {n} threads; output byte-identical to the one-process run: {same}")
        for r in ranks:
            print(f"  rank {r['rank']}: peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB, read {r['bytes_read'] / GiB:.2f} "
                  f"GiB, of which statistics passes {r['stats_pass_bytes_read'] / GiB:.2f} GiB, wall {r['wall_s']:.1f} s")
        if parts:
            top = sorted(parts.items(), key=lambda kv: -kv[1])[:8]
            print("  rank 0 by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in top))
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)


if __name__ == "__main__":
    main()
