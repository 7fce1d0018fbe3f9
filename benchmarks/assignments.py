"""The neuron alignments of merged pairs at a real expert shape: cost matrices (activation part + float64 weight
part) built and their assignments solved, as the merges and the guard's presolve do (`methods.apply.solve_items`).

    python benchmarks/assignments.py [--inter 768] [--hidden 2048] [--pairs 15] [--workers 1 2]

Random bf16 experts (Qwen3-30B-A3B's 768 x 2048 by default) and random activation costs; prints seconds per pair for
each worker count. Run it with PYTHONPATH set to another checkout to compare two versions in one session.
"""

from __future__ import annotations

import argparse
import time

import torch

from ream_lite.engine.experts import ExpertWeights
from ream_lite.lsap import AssignmentPool
from ream_lite.methods.apply import solve_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--pairs", type=int, default=15, help="pairs: 3 centroids x 3 members, then one with the rest")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    inter, hidden = args.inter, args.hidden
    n = 3 + max(3, args.pairs - 6)
    g = torch.Generator().manual_seed(0)
    shapes = ((n, inter, hidden), (n, inter, hidden), (n, hidden, inter))  # (gate, up, down)
    weights = [torch.randn(s, generator=g).bfloat16() for s in shapes]

    def load(ids: list[int]) -> ExpertWeights:
        return ExpertWeights(list(ids), *(w[ids].float() for w in weights))

    def act_cost(c: int, m: int) -> torch.Tensor:
        return torch.rand(inter, inter, generator=torch.Generator().manual_seed(c * 1000 + m))

    items = [("act+weight", c, m) for c in range(3) for m in range(3, 6)]
    items += [("act+weight", 0, m) for m in range(6, n)][: max(0, args.pairs - len(items))]
    for workers in args.workers:
        pool = AssignmentPool(workers)
        perms: dict = {}
        t = time.perf_counter()
        solve_items(items, act_cost, perms, load, pool)
        dt = time.perf_counter() - t
        pool.close()
        print(f"{inter} x {hidden}, {len(items)} pairs, {workers} worker(s): {dt:.2f} s, "
              f"{dt / len(items) * 1000:.0f} ms a pair", flush=True)


if __name__ == "__main__":
    main()
