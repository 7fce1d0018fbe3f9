"""GGUF in, GGUF out on the trained testbed, checked in llama.cpp's own runtime.

    python benchmarks/gguf_testbed.py [--testbed ../shared/testbed] [--keep 8] [--types F32 Q8_0 Q4_0 MXFP4_MOE]
                                      [--methods reap ream] [--json OUT.json]

Needs llama.cpp (benchmarks/llama_runtime.py says how to install it): its converter writes the testbed as GGUF
(F32, Q8_0), llama-quantize makes Q4_0 and MXFP4_MOE from the F32 file. Then, per input type and method:

- `ream-lite compress IN.gguf OUT` (a subprocess: its report's peak host memory and bytes read are its own),
- quality against the float32 original on all of data/eval.jsonl (ream-lite eval: KL per predicted token, top-1
  agreement, perplexity), beside the input GGUF's own and the same method on the safetensors original,
- the output in llama.cpp: it loads, generates, and its next-token distribution is compared with ream-lite's own
  streamed forward of the same file (KL(ream-lite || llama.cpp) per token, float32 KV cache, 5 x 64 eval tokens).

(The testbed's rows are 128 wide: K-quant types do not apply to it; llama-quantize would fall back to Q5_0/Q8_0.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import llama_runtime as lr  # noqa: E402

from ream_lite.arch.layout import ModelLayout  # noqa: E402
from ream_lite.engine.streamer import LayerStreamer, StreamOptions  # noqa: E402
from ream_lite.evaluate import Evaluator  # noqa: E402

# the defaults of each method (guard + refit), and the paper's REAM (every merged expert quantized into the output)
METHODS = {"reap": ["--method", "reap"], "ream": ["--method", "ream"],
           "reap-paper": ["--method", "reap", "--guard", "off", "--refit", "off"],
           "ream-paper": ["--method", "ream", "--guard", "off", "--refit", "off"]}


def ream_logits(path: Path, ids: list[list[int]]) -> np.ndarray:
    """ream-lite's streamed float32 forward of `path`: [n, T, vocab]."""
    layout = ModelLayout(str(path))
    s = LayerStreamer(layout, StreamOptions(device="cpu", dtype=torch.float32, progress=False))
    t = torch.tensor(ids)
    s.make_plan(t.numel())
    h = s.forward_layers(s.embed(list(t)))
    out = torch.cat([lg.cpu() for _, lg in s.logits(h)]).reshape(*t.shape, -1)
    h.close()
    layout.close()
    return out.float().numpy()


def kl_to_llama(path: Path, ids: list[list[int]]) -> tuple[float, float, float]:
    """(mean, max KL(ream-lite || llama.cpp) per token, top-1 agreement) on the sequences `ids`."""
    ours = ream_logits(path, ids)
    kls, agree = [], []
    for seq, mine in zip(ids, ours):
        theirs = lr.llama_logits(str(path), seq)
        p, q = _log_softmax(mine), _log_softmax(theirs)
        kls.append((np.exp(p) * (p - q)).sum(-1))
        agree.append(mine.argmax(-1) == theirs.argmax(-1))
    lr.close_all()
    k = np.concatenate(kls)
    return float(k.mean()), float(k.max()), float(np.concatenate(agree).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compress(src: Path, out: Path, keep: int, method: list[str], calib: Path, n_seq: int) -> dict:
    cmd = [sys.executable, "-m", "ream_lite", "compress", str(src), str(out), "--experts", str(keep), *method,
           "--calib", str(calib), "--num-sequences", str(n_seq), "--seq-len", "256", "--device", "cpu",
           "--overwrite"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads((out / "ream_report.json").read_text())["totals"]
    return {"seconds": time.perf_counter() - t, "peak_host_bytes": report["peak_host_bytes"],
            "bytes_read": report["bytes_read"], "size_before": report["size_before_bytes"],
            "size_after": report["size_after_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(Path(__file__).resolve().parents[2] / "shared" / "testbed"))
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--types", nargs="+", default=["F32", "Q8_0", "Q4_0", "MXFP4_MOE"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--num-sequences", type=int, default=96)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tb = Path(args.testbed)
    model, calib, data = tb / "tiny-qwen3-moe", tb / "data" / "calib.jsonl", tb / "data" / "eval.jsonl"
    work = Path(args.work or tempfile.mkdtemp(prefix="ream-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for t in args.types:
        p = work / f"testbed-{t}.gguf"
        if not p.exists():
            if t in ("F32", "Q8_0", "F16"):
                lr.convert_hf_to_gguf(str(model), str(p), outtype=t.lower())
            else:
                if not (work / "testbed-F32.gguf").exists():
                    lr.convert_hf_to_gguf(str(model), str(work / "testbed-F32.gguf"), outtype="f32")
                lr.quantize_gguf(str(work / "testbed-F32.gguf"), str(p), t)
        inputs[t] = p
    opts = StreamOptions(device="cpu", progress=False)
    ev = Evaluator(str(data), str(model), reference=str(model), seq_len=256, options=opts)
    tok = ev.tokenizer if hasattr(ev, "tokenizer") else None
    from transformers import AutoTokenizer

    tok = tok or AutoTokenizer.from_pretrained(model)
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()[:40:8]]
    seqs = [tok(d)["input_ids"][:64] for d in docs]
    rows = []

    def quality(label: str, path: Path, extra: dict | None = None) -> dict:
        r = ev.run(str(path)).overall
        row = {"run": label, "kl": r["kl"], "top1": r["top1_agreement"], "ppl": r["perplexity"], **(extra or {})}
        rows.append(row)
        line = f"{label:<30} KL {r['kl']:.4f}  top-1 {r['top1_agreement']:.3f}  PPL {r['perplexity']:7.2f}"
        if "llama_kl" in row:
            line += f"  | llama.cpp vs ream-lite: KL mean {row['llama_kl']:.2e} max {row['llama_kl_max']:.2e} " \
                    f"top-1 {row['llama_top1']:.3f}"
        if "seconds" in row:
            line += f"  | {row['seconds']:.0f} s, peak host {row['peak_host_bytes'] / 2**20:.0f} MiB, read " \
                    f"{row['bytes_read'] / 2**20:.1f} MiB, {row['size_before'] / 2**20:.2f} -> " \
                    f"{row['size_after'] / 2**20:.2f} MiB"
        print(line, flush=True)
        return row

    quality("float32 original", model)
    for label in args.methods:
        out = work / f"st-{label}"
        quality(f"{label} 16->{args.keep} safetensors", out, compress(model, out, args.keep, METHODS[label], calib,
                                                                      args.num_sequences))
    for t, p in inputs.items():
        k, kmax, top1 = kl_to_llama(p, seqs)
        quality(f"{t} GGUF input", p, {"llama_kl": k, "llama_kl_max": kmax, "llama_top1": top1})
        for label in args.methods:
            out = work / f"{t}-{label}"
            extra = compress(p, out, args.keep, METHODS[label], calib, args.num_sequences)
            produced = out / p.name
            k, kmax, top1 = kl_to_llama(produced, seqs)
            extra.update(llama_kl=k, llama_kl_max=kmax, llama_top1=top1)
            text = lr.llama_detokenize(str(produced), lr.llama_generate(str(produced), seqs[0][:16], 16))
            extra["llama_generates"] = text
            lr.close_all()
            quality(f"{label} 16->{args.keep} {t} -> {t}", produced, extra)
    ev.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
