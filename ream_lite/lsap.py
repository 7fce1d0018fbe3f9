"""Linear sum assignment (the Hungarian step of neuron alignment) for many expert pairs at once, on every CPU core.

scipy's solver is single-threaded: ~20-75 ms for a 768-neuron expert, ~1 s at 2048. Guarded REAM solves every
distinct (centroid, member) pair of all its candidate plans, ~140 per layer at Qwen3-30B-A3B scale. It releases the
GIL while it solves (measured: 8 solves of 768 x 768, 1.74x faster on 2 threads than one by one), so a pool of
threads solves pairs in parallel with each other and with the main thread, which builds the next pairs' cost
matrices meanwhile (`submit`). Threads start in no time and share the matrices; a process pool, used before, took
seconds to start, copied 4.5 MiB per matrix, and was only worth it on 3 or more cores. `REAM_LITE_ASSIGN_WORKERS=N`
sets the count (1 = solved in the calling thread, as they are needed). Results are the same either way: each pair
is solved by the same deterministic solver on the same float64 matrix.
"""

from __future__ import annotations

import atexit
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from scipy.optimize import linear_sum_assignment

from ream_lite.engine.budget import usable_cores

MAX_WORKERS = 16
K = TypeVar("K")


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
    return max(1, min(usable_cores(), MAX_WORKERS))


class AssignmentPool:
    """Solves cost matrices on worker threads when more than one worker is allowed, else in the calling thread."""

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else max(1, workers)
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def submit(self, cost: np.ndarray) -> Future:
        """`solve(cost)`, started now on a worker (or solved here and then, with one worker)."""
        if self.workers == 1:
            done: Future = Future()
            done.set_result(solve(cost))
            return done
        if self._executor is None or self._pid != os.getpid():  # (a forked child has none of the threads: its own)
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="ream-lsap")
            self._pid = os.getpid()
        return self._executor.submit(solve, cost)

    def solve_all(self, costs: list[np.ndarray]) -> list[np.ndarray]:
        return [f.result() for f in [self.submit(c) for c in costs]]

    def in_order(self, jobs: Iterable[tuple[K, Future]]) -> Iterator[tuple[K, object]]:
        """(key, result) of each (key, future) of `jobs`, in their order, drawing up to 2 per worker ahead of the
        one awaited: a lazy `jobs` builds the next costs (and submits them) while the workers solve, and holds at
        most that many cost matrices at once (4.5 MiB each at 768 neurons, 32 at 2048)."""
        pending: deque[tuple[K, Future]] = deque()
        for job in jobs:
            pending.append(job)
            if len(pending) > 2 * self.workers:
                key, done = pending.popleft()
                yield key, done.result()
        for key, done in pending:
            yield key, done.result()

    def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
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
