"""The plan `compress` makes for real model shapes, from headers only (sparse checkpoints: no disk, no GPU needed).

    python benchmarks/plan_real_shapes.py [--shape qwen3-30b-a3b] [--layers 48] [--experts 96]
           [--num-sequences 3072] [--seq-len 512] [--gpu 24GB] [--cpu 12.8GB] [--device cuda] [--gguf]

Writes a header-only checkpoint of the chosen shape (every layer, real tensor shapes and dtypes; the data is a
sparse hole) and prints `ream-lite plan`'s figures for it: per-layer bytes and expert chunks, the hidden-state store
tier, peak device and host memory, disk, reads, FLOPs and a time estimate at slow-end default rates (nothing is
measured: no GPU is needed to plan for one). These are the figures behind the README's real-model recipe.
`--gguf` plans for the model as a Q4_K_M GGUF instead (header-only too: llama.cpp's names and metadata, experts and
attention Q4_K, the down projections, attn_v and the head Q6_K, as llama-quantize's Q4_K_M mostly chooses).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from shapes import SHAPES  # noqa: E402

from ream_lite.arch.layout import ModelLayout  # noqa: E402
from ream_lite.engine.budget import parse_bytes  # noqa: E402
from ream_lite.engine.streamer import StreamOptions  # noqa: E402
from ream_lite.estimate import estimate_compression  # noqa: E402
from ream_lite.pipeline import CompressConfig, resolve_keep, validate  # noqa: E402
from ream_lite.sparse_checkpoint import write_sparse_checkpoint  # noqa: E402


def sparse_q4_k_m_gguf(src: Path, out: Path) -> Path:
    """A header-only GGUF of the checkpoint `src` in a Q4_K_M-like mix (its data a sparse hole)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType, GGUFWriter

    from ream_lite.checkpoint.gguf_export import _write_metadata, arch_for, choose_type, gguf_tensor_plan
    from ream_lite.checkpoint.gguf_writer import nbytes_of

    layout = ModelLayout(str(src))
    arch = arch_for(layout.spec.model_type)
    w = GGUFWriter(out, arch.arch)
    _write_metadata(w, layout, arch, GGUFValueType)
    total = 0
    for gname, _, shape in gguf_tensor_plan(layout, arch):
        q = choose_type(gname, shape, Q.Q4_K, Q.Q4_K)
        if q == Q.Q4_K and any(p in gname for p in ("ffn_down", "attn_v", "output.weight")):
            q = Q.Q6_K
        n = nbytes_of(q, tuple(reversed(shape)))
        w.add_tensor_info(gname, shape, np.dtype(np.float32), n, q)
        total += -(-n // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    end = -(-fout.tell() // 32) * 32
    w.close()
    layout.close()
    with open(out, "r+b") as f:
        f.truncate(end + total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", default="96")
    ap.add_argument("--method", default="ream")
    ap.add_argument("--num-sequences", type=int, default=3072)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu", default="24GB", help="device memory budget")
    ap.add_argument("--cpu", default="12.8GB", help="host memory budget for hidden states (default: 40%% of 32 GB)")
    ap.add_argument("--gguf", action="store_true", help="plan for the model as a Q4_K_M GGUF")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = write_sparse_checkpoint(SHAPES[args.shape](args.layers), Path(tmp) / args.shape)
        if args.gguf:
            src = sparse_q4_k_m_gguf(src, Path(tmp) / f"{args.shape}-Q4_K_M.gguf")
        layout = ModelLayout(str(src))
        opts = StreamOptions(device=args.device, max_gpu_memory=parse_bytes(args.gpu),
                             max_cpu_memory=parse_bytes(args.cpu), progress=False)
        cfg = CompressConfig(model=str(src), output=str(Path(tmp) / "out"), experts=args.experts, method=args.method,
                             num_sequences=args.num_sequences, seq_len=args.seq_len, stream=opts)
        n_keep = resolve_keep(layout, args.experts)
        validate(layout, n_keep, cfg)
        est = estimate_compression(layout, cfg, n_keep, measure=False)
        print(f"{args.shape}, {args.layers} layers, {args.method} {layout.router_config.num_experts} -> {n_keep}, "
              f"calibration {args.num_sequences} x {args.seq_len} tokens, {args.device} budget {args.gpu}, "
              f"host {args.cpu}")
        print("\n".join(est.lines()))
        layout.close()


if __name__ == "__main__":
    main()
