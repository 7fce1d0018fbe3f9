"""What compressing a quantized release costs beyond the quantization itself, on the trained testbed.

    python benchmarks/formats_quality.py [--testbed ../shared/testbed] [--keep 12] [--methods reap ream-guard ream]

The testbed model (float32) is written as an FP8 block-scaled release (128 x 128 blocks, DeepSeek-style scales,
`ream_lite.testing.convert_to_fp8`) and as an NVFP4 release (compressed-tensors nvfp4-pack-quantized,
`convert_to_nvfp4`) and with its routed experts in INT4 as the Kimi-K2-Thinking / K2.5 releases (compressed-tensors
pack-quantized W4A16, groups of 32, `convert_to_int4`). Every model is evaluated on all of data/eval.jsonl against
the float32 original (KL per predicted token, top-1 agreement, perplexity):

- the FP8, NVFP4 and INT4 releases themselves (the cost of the format),
- each method on the float32 model,
- each method on the FP8 release, written back as FP8 (default) and decoded to bf16 (`--out-dtype bf16`),
- each method on the NVFP4 release, written back as NVFP4, and on the INT4 release, written back as INT4,
- each method on the float32 model with `--quantize nf4` (the attention weights in bitsandbytes 4-bit).

`--sources` picks which of these compressions run (default all).

If writing back in kind were lossy beyond FP8, "method on FP8 -> FP8" would sit above "FP8" + "method"; merged
experts re-encoded with fresh scales are the only new rounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ream_lite.engine.streamer import StreamOptions
from ream_lite.evaluate import Evaluator
from ream_lite.pipeline import CompressConfig, compress
from ream_lite.testing import convert_to_fp8, convert_to_int4, convert_to_nvfp4

METHODS = {"reap": ("reap", {}), "ream": ("ream", {"guard": "off"}), "ream-guard": ("ream", {"guard": "group"})}
# compressions per method: (input, compress options)
SOURCES = {"float32": ("float32", {}), "FP8 -> FP8": ("fp8", {}), "FP8 -> bf16": ("fp8", {"out_dtype": "bf16"}),
           "NVFP4 -> NVFP4": ("nvfp4", {}), "INT4 -> INT4": ("int4", {}),
           "float32 -> nf4": ("float32", {"quantize": "nf4"})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(Path(__file__).resolve().parents[2] / "shared" / "testbed"))
    ap.add_argument("--keep", type=int, default=12)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--num-sequences", type=int, default=96)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = ap.parse_args()
    tb = Path(args.testbed)
    model, calib, data = tb / "tiny-qwen3-moe", tb / "data" / "calib.jsonl", tb / "data" / "eval.jsonl"
    work = Path(tempfile.mkdtemp(prefix="ream-formats-"))
    opts = StreamOptions(device="cpu", progress=False)
    ev = Evaluator(str(data), str(model), reference=str(model), seq_len=256, options=opts)
    inputs = {"float32": model, "fp8": convert_to_fp8(model, work / "fp8", (128, 128)),
              "nvfp4": convert_to_nvfp4(model, work / "nvfp4"), "int4": convert_to_int4(model, work / "int4", group=32)}
    rows = []

    def measure(label: str, path: Path, secs: float | None = None) -> None:
        r = ev.run(str(path)).overall
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        rows.append({"run": label, "kl": r["kl"], "top1": r["top1_agreement"], "ppl": r["perplexity"],
                     "bytes": size, "compress_s": secs})
        print(f"{label:<34} KL {r['kl']:.4f}  top-1 {r['top1_agreement']:.3f}  PPL {r['perplexity']:7.2f}  "
              f"{size / 2**20:6.2f} MiB" + (f"  ({secs:.0f} s)" if secs else ""), flush=True)

    measure("float32 original", model)
    measure("FP8 release", inputs["fp8"])
    measure("NVFP4 release", inputs["nvfp4"])
    measure("INT4 release (experts)", inputs["int4"])
    for label in args.methods:
        method, kw = METHODS[label]
        for src_name in args.sources:
            src, extra = inputs[SOURCES[src_name][0]], SOURCES[src_name][1]
            out = work / f"{label}-{src_name.replace(' ', '')}"
            t = time.perf_counter()
            compress(CompressConfig(model=str(src), output=str(out), experts=args.keep, method=method,
                                    calib=[str(calib)], num_sequences=args.num_sequences, seq_len=256, seed=0,
                                    stream=opts, **kw, **extra))
            measure(f"{label} {16}->{args.keep}, {src_name}", out, time.perf_counter() - t)
            shutil.rmtree(out)
    ev.close()
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
