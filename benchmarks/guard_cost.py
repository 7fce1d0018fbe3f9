"""What the merge guard costs at a real layer shape: `compress` with --guard off, layer and group, same checkpoint,
same calibration, in one run.

    python benchmarks/guard_cost.py [--shape qwen3-30b-a3b] [--layers 1] [--keep 96] [--sequences 8]
                                    [--seq-len 256] [--device cpu] [--dir DIR]

Writes a random-weight bf16 checkpoint with the real tensor shapes (per-expert keys, as released), then runs each
guard mode in a fresh process and prints wall time, peak RSS (the process's own VmHWM), time relative to
`--guard off`, and what each layer chose. Random experts are independent, so the choices themselves mean little;
the cost does: it is what the extra candidates, their shared alignment pass and the held-out passes add.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_scaling import peak_rss_of  # noqa: E402
from shapes import SHAPES  # noqa: E402

from ream_lite.testing import write_random_checkpoint  # noqa: E402

GiB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--keep", type=int, default=96)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", nargs="+", default=["off", "layer", "group"])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ream-guard-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"{args.shape}-{args.layers}L"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        write_random_checkpoint(SHAPES[args.shape](args.layers), src)
        print(f"wrote {src} in {time.perf_counter() - t:.0f} s", flush=True)
    calib = root / "calib.jsonl"
    words = "the quick brown fox jumps over the lazy dog; 12 + 30 = 42. def f(x): return x * 2\n"
    calib.write_text("\n".join(json.dumps({"domain": d, "text": words * 400}) for d in ("a", "b")) + "\n")
    rows = []
    for mode in args.modes:
        out = root / f"out-{mode}"
        rss, secs, _ = peak_rss_of([
            "compress", str(src), str(out), "--experts", str(args.keep), "--calib", str(calib), "--num-sequences",
            str(args.sequences), "--seq-len", str(args.seq_len), "--device", args.device, "--guard", mode,
            "--overwrite",
        ])
        plan = json.loads((out / "ream_plan.json").read_text())
        chosen = [L.get("guard", {}).get("chosen", "paper") for L in plan["layers"]]
        rows.append((mode, secs, rss, chosen))
        print(f"--guard {mode}: {secs:.0f} s, peak RSS {rss / GiB:.2f} GiB, chosen {chosen}", flush=True)
    base = rows[0][1]
    print(f"\nshape {args.shape}, {args.layers} layer(s), {args.sequences} x {args.seq_len} tokens, "
          f"-> {args.keep} experts, device {args.device}")
    print(f"{'guard':<6} {'time':>7} {'x off':>6} {'peak RSS':>9}")
    for mode, secs, rss, _ in rows:
        print(f"{mode:<6} {secs:>6.0f}s {secs / base:>6.2f} {rss / GiB:>7.2f}Gi")


if __name__ == "__main__":
    main()
