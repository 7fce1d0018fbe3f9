"""What torchrun ranks send each other, at a real layer's size: a dict of merged experts broadcast from rank 0.

    python benchmarks/transport.py [--gib 1.0] [--nproc 2]

Runs two torchrun jobs (gloo, this machine's 127.0.0.1), one per way of sending: `pickle` (torch.distributed's
broadcast_object_list with the tensors inside the object: what ream-lite did before) and `raw` (ream_lite's
`World.broadcast`: the object pickled without its tensors, then each tensor's bytes). Every rank prints the
broadcast's wall time and its peak resident memory; the receivers check the bytes against rank 0's.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

GiB = 1024**3


def payload(gib: float):
    import torch

    g = torch.Generator().manual_seed(0)
    n = max(1, int(gib * 16) // 3)  # merged experts of three 64 MiB bfloat16 tensors (gate, up, down)
    return {c: tuple(torch.randn(8192, 4096, generator=g).bfloat16() for _ in range(3)) for c in range(n)}


def rank_main(mode: str, gib: float) -> None:
    import torch
    import torch.distributed as dist

    from ream_lite.distributed import World

    world = World.from_env()
    obj = payload(gib) if world.is_main else None
    size = sum(t.nbytes for parts in obj.values() for t in parts) if world.is_main else 0
    dist.barrier()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.monotonic()
    if mode == "pickle":
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
    else:
        got = world.broadcast(obj)
    wall = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ok = True
    if not world.is_main:
        ref = payload(gib)
        ok = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for c in ref for a, b in zip(ref[c], got[c]))
        size = sum(t.nbytes for parts in got.values() for t in parts)
    print(f"{mode:6} rank {world.rank}: {size / GiB:.2f} GiB in {wall:.2f} s, peak RSS {peak / GiB:.2f} GiB "
          f"({(peak - base) / GiB:+.2f} GiB during the broadcast), bytes equal: {ok}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rank-mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_mode:
        return rank_main(args.rank_mode, args.gib)
    for mode in ("pickle", "raw"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--gib", str(args.gib), "--rank-mode", mode]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = sorted(x for x in r.stdout.splitlines() if x.startswith(mode))
        print("\n".join(lines) if r.returncode == 0 else r.stdout[-2000:] + r.stderr[-3000:])


if __name__ == "__main__":
    main()
