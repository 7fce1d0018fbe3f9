"""A Q4_K_M GGUF at Qwen3-30B-A3B's real layer shape, compressed by ream-lite, then run by llama.cpp.

    python benchmarks/gguf_real_shape.py WORK [--layers 2] [--keep 96] [--num-sequences 8] [--seq-len 128]

1. benchmarks/synth.py writes a random-weight Qwen3-30B-A3B checkpoint with `--layers` layers (bf16 safetensors:
   hidden 2048, 128 experts x 768, vocab 151936);
2. ream-lite's exporter writes it as an F16 GGUF, and llama.cpp's llama-quantize makes the Q4_K_M mix from it
   (experts Q4_K, down projections of some layers and the head Q6_K, as llama.cpp chooses);
3. `ream-lite compress` (REAP, and REAM with the default guard), each in a subprocess, on the safetensors checkpoint
   and on the Q4_K_M GGUF: wall time, peak host memory and bytes read (from each run's ream_report.json);
4. the compressed GGUF in llama.cpp's runtime: it loads and generates, and its next-token distribution is compared
   with ream-lite's streamed forward of the same file (KL per token, float32 KV cache), beside the same comparison
   on the input Q4_K_M file. Random weights: the figures check the file and the numbers, not quality.

Needs llama.cpp (benchmarks/llama_runtime.py says how to install it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import llama_runtime as lr  # noqa: E402
from gguf_testbed import kl_to_llama  # noqa: E402
from synth import synthesize  # noqa: E402

from ream_lite.checkpoint.gguf_export import export_gguf  # noqa: E402

GiB = 2**30


def run(src: Path, out: Path, keep: int, method: list[str], calib: Path, n_seq: int, seq_len: int,
        extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ream_lite", "compress", str(src), str(out), "--experts", str(keep), *method,
           "--calib", str(calib), "--num-sequences", str(n_seq), "--seq-len", str(seq_len), "--device", "cpu",
           "--overwrite", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    r = json.loads((out / "ream_report.json").read_text())["totals"]
    return {"seconds": round(time.perf_counter() - t, 1), "peak_host_GiB": round(r["peak_host_bytes"] / GiB, 2),
            "read_GiB": round(r["bytes_read"] / GiB, 2), "in_GiB": round(r["size_before_bytes"] / GiB, 2),
            "out_GiB": round(r["size_after_bytes"] / GiB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--keep", type=int, default=96)
    ap.add_argument("--num-sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    st = synthesize("qwen3-30b-a3b", w / "safetensors", args.layers)
    f16, q4 = w / "model-F16.gguf", w / "model-Q4_K_M.gguf"
    if not q4.exists():
        t = time.perf_counter()
        export_gguf(st, f16, expert_type=1, other_type=1)
        lr.quantize_gguf(str(f16), str(q4), "Q4_K_M")
        print(f"GGUF written ({time.perf_counter() - t:.0f} s): F16 {f16.stat().st_size / GiB:.2f} GiB, Q4_K_M "
              f"{q4.stat().st_size / GiB:.2f} GiB", flush=True)
    calib = w / "calib.txt"
    calib.write_text(("The quick brown fox jumps over the lazy dog. 12 + 30 = 42. def f(x): return x * 2\n") * 400)
    tok = ["--tokenizer", str(st)]  # (the synthetic model's character tokenizer; the GGUF lists its tokens)
    rows = {}
    for label, method in (("reap", ["--method", "reap", "--refit", "off"]), ("ream", ["--method", "ream"])):
        for src_label, src in (("safetensors bf16", st), ("GGUF Q4_K_M", q4)):
            out = w / f"out-{label}-{src_label.split()[0]}"
            rows[f"{label} {src_label}"] = r = run(src, out, args.keep, method, calib, args.num_sequences,
                                                   args.seq_len, tok)
            print(f"{label:<5} {src_label:<17} {r}", flush=True)
    ids = [[(7 * i + 13 * j) % 90 + 4 for j in range(64)] for i in range(4)]
    for label, path in (("input Q4_K_M", q4), ("reap output", w / "out-reap-GGUF" / q4.name),
                        ("ream output", w / "out-ream-GGUF" / q4.name)):
        k, kmax, top1 = kl_to_llama(path, ids)
        gen = lr.llama_generate(str(path), ids[0][:8], 8)
        lr.close_all()
        rows[f"llama.cpp {label}"] = {"kl_mean": k, "kl_max": kmax, "top1": top1, "generated_ids": gen}
        print(f"llama.cpp vs ream-lite, {label:<13} KL mean {k:.2e} max {kmax:.2e} top-1 {top1:.3f}; "
              f"greedy ids {gen}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
