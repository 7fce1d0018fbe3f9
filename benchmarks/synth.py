"""Write a random-weight checkpoint with the real tensor shapes of a released MoE model, but few layers.

    python benchmarks/synth.py SHAPE OUT [--layers 4] [--dense-layers K] [--device cpu|cuda] [--seed 0]

SHAPE is one of benchmarks/shapes.py: qwen3-30b-a3b, qwen3-next-80b, deepseek-v3, glm-4.5-air. The checkpoint is
what `save_pretrained` writes for that model (per-expert keys, bf16, shards of 5 GB, index, config.json) plus a
character tokenizer, so `ream-lite inspect / plan / compress / eval` run on it as on the release. It is written
one tensor at a time: memory stays at one tensor, whatever the size. `--device cuda` draws the weights on the GPU
(a DeepSeek-V3 MoE layer is 22.5 GB: about a minute on 2 CPU cores, seconds on a GPU; the disk is then the limit).

Prints the checkpoint's size and its largest layer, and the time taken.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES  # noqa: E402

from ream_lite.checkpoint.reader import CheckpointReader  # noqa: E402
from ream_lite.testing import write_random_checkpoint  # noqa: E402

GiB = 1024**3


def synthesize(shape: str, out: Path, layers: int, dense_layers: int | None = None, device: str = "cpu",
               seed: int = 0, fp8: bool = False) -> Path:
    """The checkpoint at `out` (written unless a complete one with the same config is already there); `fp8`: as
    the FP8 releases store it (128 x 128 blocks)."""
    config = SHAPES[shape](layers, dense_layers)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        import json

        have = json.loads((out / "config.json").read_text())
        if (have.get("num_hidden_layers") == layers and have.get("hidden_size") == config.hidden_size
                and ("quantization_config" in have) == fp8):
            return out
    return write_random_checkpoint(config, out, seed=seed, device=device, fp8_block=(128, 128) if fp8 else None)


def describe(path: Path) -> str:
    r = CheckpointReader(path)
    per_layer: dict[int, int] = {}
    for k, e in r.tensors.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            per_layer[i] = per_layer.get(i, 0) + e.nbytes
    biggest = max(per_layer.values()) if per_layer else 0
    return (f"{path}: {r.total_bytes() / GiB:.2f} GiB in {len(r.entries):,} tensors "
            f"({'/'.join(sorted(r.encodings))}), {len(per_layer)} layers, "
            f"largest layer {biggest / GiB:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    ap.add_argument("--dense-layers", type=int, default=None,
                    help="leading dense layers for DeepSeek-V3 / GLM shapes (default: as released, leaving >= 1 MoE)")
    ap.add_argument("--device", default="cpu", help="where to draw the random weights (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", action="store_true", help="FP8 block-scaled as released (DeepSeek-V3, Kimi-K2, Qwen3-FP8)")
    args = ap.parse_args()
    t = time.perf_counter()
    synthesize(args.shape, args.out, args.layers, args.dense_layers, args.device, args.seed, args.fp8)
    print(f"{describe(args.out)}; {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
