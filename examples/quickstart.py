"""Offline quickstart: build a tiny random Qwen3-MoE checkpoint, compress it with REAM, evaluate the result.

    python examples/quickstart.py [WORKDIR]

Needs no network and no GPU. It writes a tiny model (4 layers, 16 experts, top-2) to WORKDIR/tiny-qwen3-moe and
some text to WORKDIR/text.jsonl, then runs, as a user would:
    ream-lite inspect  WORKDIR/tiny-qwen3-moe
    ream-lite compress WORKDIR/tiny-qwen3-moe WORKDIR/tiny-qwen3-moe-12 --experts 12   (built-in calibration text)
    ream-lite eval     WORKDIR/tiny-qwen3-moe-12 --data WORKDIR/text.jsonl --reference WORKDIR/tiny-qwen3-moe
and prints the size before and after, what the merge guard chose in each layer, and the quality of the compressed
model against the original (perplexity, KL, top-1 agreement). The model's weights are random, so the figures only show that
everything runs end to end.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from ream_lite.testing import save_char_tokenizer


def build(work: Path) -> Path:
    out = work / "tiny-qwen3-moe"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                         num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=2,
                         bos_token_id=1, pad_token_id=0, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    save_char_tokenizer(out, cfg.vocab_size)
    return out


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "ream-lite-quickstart"
    work.mkdir(parents=True, exist_ok=True)
    model = build(work)
    data = work / "text.jsonl"
    docs = [{"domain": "prose", "text": "It was the best of times, it was the worst of times. " * 20},
            {"domain": "math", "text": "Solve 3x + 5 = 20. Subtract 5: 3x = 15. Divide by 3: x = 5. " * 20},
            {"domain": "code", "text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 20}]
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    cli = [sys.executable, "-m", "ream_lite"]
    small = work / "tiny-qwen3-moe-12"
    subprocess.run([*cli, "inspect", str(model)], check=True)
    print()
    subprocess.run([*cli, "compress", str(model), str(small), "--experts", "12", "--num-sequences", "48",
                    "--seq-len", "128", "--overwrite"], check=True)
    report = json.loads((small / "ream_report.json").read_text())
    t, cal = report["totals"], report["calibration"]
    print(f"calibration: {cal['sequences']} sequences of {cal['seq_len']} tokens, "
          + ", ".join(f"{d} {n:,} tokens" for d, n in cal["tokens_per_domain"].items()))
    print(f"size: {t['size_before_bytes'] / 2**20:.2f} MiB -> {t['size_after_bytes'] / 2**20:.2f} MiB "
          f"(routed experts per layer {report['experts']['before']} -> {report['experts']['after']}), "
          f"{t['seconds']:.1f} s, peak RSS {t['peak_host_bytes'] / 2**30:.2f} GiB")
    for layer in report["layers"]:  # what the merge guard chose in each layer, judged on held-out calibration text
        g = layer["guard"]
        errors = ", ".join(f"{c['name']} {c['error']:.3f}" for c in g["candidates"])
        print(f"layer {layer['layer']}: chose {g['chosen']} (held-out error: {errors})")
    print()
    subprocess.run([*cli, "eval", str(small), "--data", str(data), "--reference", str(model), "--seq-len", "128"],
                   check=True)


if __name__ == "__main__":
    main()
