"""Where a run's wall time goes: reading the checkpoint, moving hidden states, writing the output, the resume
snapshots; what is left is compute. Also the bytes that move where no other counter sees them (the work dir's
hidden-state files, the snapshots).

    from ream_lite import timing
    timing.enable(sync="cuda")   # benchmarks only; off by default, and then `phase` costs one branch
    ...
    timing.totals()               # {"read": s, "store": s, "write": s, "snapshot": s}
    timing.byte_totals()          # {"work_dir_read": n, "work_dir_written": n, "snapshot_written": n}

The code that does each kind of work marks it with `with timing.phase("read"):`. Phases nest: time spent in an
inner phase is counted there and not in the outer one, so the totals add up to at most the wall time.

On a GPU, work is queued and runs later, so a host clock would charge a kernel to whichever phase next waits for
the device (a host-to-device copy waits for every kernel before it). With `sync` set, each phase boundary
synchronizes the device first: the figures are then attributable, at the cost of the overlap that would
otherwise hide part of the reading. `REAM_LITE_TIMING=1` in the environment enables it at import (with sync on
CUDA when available), for runs in a fresh process.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("read", "store", "write", "snapshot")
# parts of the compute, by pass (each excludes the reads, stores and writes inside it)
PASSES = ("attention", "stats", "alignment", "assignment", "merge", "guard", "refit", "sequential")

_enabled = False
_sync_cuda = False
_t_enabled = 0.0
_seconds: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_stack: list[list] = []  # [name, seconds spent in nested phases]
_bytes: dict[str, int] = defaultdict(int)


def enable(sync: str | None = None) -> None:
    """Start recording (and reset); `sync="cuda"` synchronizes the GPU at every phase boundary."""
    global _enabled, _sync_cuda, _t_enabled
    _enabled = True
    _sync_cuda = sync == "cuda"
    _t_enabled = time.perf_counter()
    reset()


def synchronized() -> bool:
    """Whether phase boundaries synchronize the GPU (the parts are then attributable on CUDA)."""
    return _sync_cuda


def elapsed() -> float:
    """Seconds since `enable` (the wall time the totals are parts of)."""
    return time.perf_counter() - _t_enabled


def disable() -> None:
    global _enabled
    _enabled = False


def enabled() -> bool:
    return _enabled


def reset() -> None:
    _seconds.clear()
    _calls.clear()
    _stack.clear()
    _bytes.clear()


def count_bytes(name: str, nbytes: int) -> None:
    """Add to a byte counter (only while enabled)."""
    if _enabled:
        _bytes[name] += nbytes


def byte_totals() -> dict[str, int]:
    return dict(_bytes)


def totals() -> dict[str, float]:
    """Seconds per phase so far (each phase's own time, nested phases excluded)."""
    return {name: _seconds.get(name, 0.0) for name in sorted(set(PHASES) | set(_seconds))}


def calls() -> dict[str, int]:
    return dict(_calls)


def _synchronize() -> None:
    if _sync_cuda:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


@contextmanager
def phase(name: str):
    """Charge the wall time of the block to `name` (see the module docstring)."""
    if not _enabled:
        yield
        return
    _synchronize()
    t0 = time.perf_counter()
    _stack.append([name, 0.0])
    try:
        yield
    finally:
        _synchronize()
        dt = time.perf_counter() - t0
        _, nested = _stack.pop()
        _seconds[name] += dt - nested
        _calls[name] += 1
        if _stack:
            _stack[-1][1] += dt


if os.environ.get("REAM_LITE_TIMING", "") not in ("", "0"):
    enable(sync="cuda")
