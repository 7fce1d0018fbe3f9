"""Peak host memory of `ream-lite compress` against the number of layers, with and without the oneDNN cache caps.

    python benchmarks/host_memory_layers.py [--layers 2 12] [--dtype bfloat16] [--method reap] [--dir DIR]

Writes (once) random Qwen3-MoE checkpoints of each layer count (hidden 1024, 64 experts of 512, bf16), then runs the
CLI in a fresh process for each: with ream-lite's default caps (ream_lite/__init__.py: 128 cached oneDNN primitives
and ideep operands) and with oneDNN's own default (1024 each, set in the environment), printing wall time and peak
RSS (GNU time). On a CPU, bf16 matmuls are compiled per operand shape and experts see a new token count in nearly
every batch, so the uncapped caches grow with the layers; float32 runs never touch them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def checkpoint(layers: int, root: Path) -> Path:
    d = root / f"qwen3moe-{layers}L"
    if not (d / "config.json").exists():
        import torch
        import transformers as tf

        from ream_lite.testing import write_random_checkpoint

        cfg = tf.Qwen3MoeConfig(vocab_size=8192, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=128, intermediate_size=2048, moe_intermediate_size=512,
                                num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
                                max_position_embeddings=4096)
        write_random_checkpoint(cfg, d, dtype=torch.bfloat16)
    return d


def run(model: Path, out: Path, args, env: dict) -> tuple[float, float]:
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "ream_lite", "compress", str(model), str(out),
           "--experts", "48", "--method", args.method, "--num-sequences", "16", "--seq-len", "256", "--overwrite",
           "--dtype", args.dtype]
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    m = re.search(r"TIME ([\d.]+) (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        raise SystemExit(p.stderr[-2000:])
    return float(m.group(1)), int(m.group(2)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--method", default="reap")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "ream-host-memory"))
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    caps = {"ream-lite caps (128)": {}, "oneDNN default (1024)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
                                                                  "LRU_CACHE_CAPACITY": "1024"}}
    print(f"{'caches':<24}" + "".join(f"{f'{n} layers':>24}" for n in args.layers))
    for label, env in caps.items():
        cells = []
        for n in args.layers:
            wall, peak = run(checkpoint(n, root), root / "out", args, env)
            cells.append(f"{peak:6.2f} GiB {wall:6.1f} s")
        print(f"{label:<24}" + "".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
