"""Linear sum assignment (the Hungarian step of neuron alignment) for many expert pairs at once, on every CPU core.

scipy's solver is single-threaded and holds the GIL: ~75 ms for a 768-neuron expert, ~1 s at 2048. Guarded REAM
solves every distinct (centroid, member) pair of all its candidate plans, ~300 per layer at Qwen3-30B-A3B scale,
which measured 23 s of a 60 s layer on an H100 (benchmarks/scale.py, docs/performance.md) while the GPU idled. A
pool of worker processes solves a batch of pairs in parallel. The pool is started once, on first use, with the
`spawn` method (never `fork`: the parent holds a CUDA context and library threads), and only where it can help (3 or
more usable cores); `REAM_LITE_ASSIGN_WORKERS=N` overrides the count (1 = in process). Results are the same either
way: each pair is solved by the same deterministic solver on the same float64 matrix.

This module imports numpy and scipy only, so the workers start light.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
from scipy.optimize import linear_sum_assignment

MAX_WORKERS = 16


def solve(cost: np.ndarray) -> np.ndarray:
    """perm such that column perm[p] is matched to row p, at minimum total cost."""
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def default_workers() -> int:
    env = os.environ.get("REAM_LITE_ASSIGN_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # one core stays with the main process (it feeds the GPU); on 2 cores a pool only adds start-up time
    return min(cores - 1, MAX_WORKERS) if cores > 2 else 1


class AssignmentPool:
    """Solves lists of cost matrices, in worker processes when more than one worker is allowed."""

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else max(1, workers)
        self._executor = None

    def solve_all(self, costs: list[np.ndarray]) -> list[np.ndarray]:
        if self.workers == 1 or len(costs) < 2:
            return [solve(c) for c in costs]
        self.warm_up()
        return list(self._executor.map(solve, costs))

    def warm_up(self) -> None:
        """Start the workers now, without waiting: each imports the main program's modules on start (seconds), which
        then overlaps the first layer's GPU work instead of stalling its first batch of assignments."""
        if self.workers > 1 and self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):
                self._executor.submit(os.getpid)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None


_shared: AssignmentPool | None = None


def shared_pool() -> AssignmentPool:
    """The process's pool (created on first use, shut down at exit)."""
    global _shared
    if _shared is None:
        _shared = AssignmentPool()
        atexit.register(_shared.close)
    return _shared
