"""Peak host memory of `ream-lite eval` as the number of layers grows, at a real layer shape.

    python benchmarks/memory_scaling.py [--shape qwen3-30b-a3b] [--layers 2 4 8] [--tokens 2048] [--dir DIR]

Writes random-weight bf16 checkpoints with the real tensor shapes (per-expert keys, as released) and 2, 4 and 8
decoder layers, then runs `ream-lite eval` on each in a fresh process on the CPU and prints its peak RSS (the
process's own VmHWM, see peak_rss.py). Streaming means the peak must not grow with the layer count, and must stay
below about 2x one decoder layer's bytes plus what the hidden-state store holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES  # noqa: E402

from ream_lite.checkpoint.reader import CheckpointReader  # noqa: E402
from ream_lite.testing import write_random_checkpoint  # noqa: E402

GiB = 1024**3


def peak_rss_of(args: list[str]) -> tuple[int, float, str]:
    """Run `ream-lite args` in a fresh process; its own VmHWM, wall time and stdout."""
    t = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).parent / "peak_rss.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    peak = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return peak, time.perf_counter() - t, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (windows of 256)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ream-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "text.jsonl"
    text = "the quick brown fox jumps over the lazy dog; 12 + 30 = 42.\n" * (args.tokens // 55 + 1)
    data.write_text(json.dumps({"domain": "all", "text": text[: args.tokens]}) + "\n")

    rows = []
    for n in args.layers:
        d = root / f"{args.shape}-{n}L"
        if not (d / "config.json").exists():
            t = time.perf_counter()
            write_random_checkpoint(SHAPES[args.shape](n), d)
            print(f"wrote {d} in {time.perf_counter() - t:.0f} s", flush=True)
        r = CheckpointReader(d)
        layer_bytes = sum(e.nbytes for k, e in r.entries.items() if k.startswith("model.layers.0."))
        total = r.total_bytes()
        rss, secs, out = peak_rss_of(
            ["eval", str(d), "--data", str(data), "--seq-len", "256", "--device", "cpu", "--json"]
        )
        store = 2 * args.tokens * SHAPES[args.shape](n).hidden_size * 2  # two bf16 hidden-state buffers
        rows.append((n, total, layer_bytes, store, rss, secs, json.loads(out)["overall"]["perplexity"]))

    print(f"\nshape {args.shape}, {args.tokens} tokens, CPU, bf16; own RSS of this script "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")
    print(f"{'layers':>6} {'checkpoint':>11} {'1 layer':>9} {'store':>8} {'peak RSS':>9} {'bound':>8} "
          f"{'RSS/bound':>9} {'time':>7}")
    for n, total, layer, store, rss, secs, _ in rows:
        bound = 2 * layer + store
        print(f"{n:>6} {total / GiB:>9.2f}Gi {layer / GiB:>7.2f}Gi {store / 1024**2:>6.0f}Mi {rss / GiB:>7.2f}Gi "
              f"{bound / GiB:>6.2f}Gi {rss / bound:>9.2f} {secs:>6.0f}s")
    base = rows[0][4]
    for n, *_, rss, _, _ in rows[1:]:
        print(f"peak RSS {n} layers / {rows[0][0]} layers = {rss / base:.3f}")


if __name__ == "__main__":
    main()
