"""How fast this machine reads a checkpoint and runs the passes of a compression: quick measurements for time
estimates.

Taken in a few seconds, at plan time, on the machine and device that will do the work: a timed sequential read of
the start of the largest shard (then the same range again, from the page cache), and the engine's own code timed
at the model's shape in the compute dtype on random weights — one expert over a token batch, the dense statistics
collector, experts over the tokens top-k routing sends them, the alignment collector, the float64 weight-alignment
cost and one Hungarian assignment. Timing the real code, not a bare matmul, counts the gathers, float32 sums and
scatters around the matmuls, which on a CPU take as long as the matmuls themselves. Where measuring is skipped
(tests, `--no-measure`), slow-end defaults stand in and are labelled so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.budget import expert_width
from ream_lite.engine.experts import ExpertWeights, add_routed_output, expert_bytes, expert_output
from ream_lite.engine.router import route
from ream_lite.methods.align import hungarian, weight_cost, weight_features
from ream_lite.methods.stats import AlignmentCollector, StatsCollector

MiB = 1024**2
READ_SAMPLE_BYTES = 256 * MiB
READ_BLOCK = 16 * MiB
SECONDS_EACH = 0.3
CPU_FLOPS_PER_CALL = 2e10  # on a CPU, fewer rows per timed call so that one call stays near 0.2 s


@dataclass(frozen=True)
class Rates:
    read: float  # checkpoint bytes per second from the disk
    cached_read: float  # bytes per second of a re-read served by the page cache
    layers: float  # FLOP/s of whole-batch matmuls: attention, dense MLPs, shared experts, routers
    dense: float  # FLOP/s of dense statistics: every expert on every token, with its float32 sums
    routed: float  # FLOP/s of experts over the tokens top-k routing sends them (gathers and scatter included)
    alignment: float  # FLOP/s of the activation-alignment pass: intermediate activations and cross Grams
    float64: float  # FLOP/s of the float64 weight-alignment cost (cdist)
    assignment: float  # seconds of one Hungarian assignment of an expert's neurons (on the CPU)
    measured: bool
    note: str = ""


# Slow-end guesses, used only when measuring is skipped: a SATA SSD; a consumer GPU well below its peak (small
# routed matmuls are far from it; float64 at 1/64 rate); a few CPU cores.
DEFAULT_READ, DEFAULT_CACHED_READ = 400 * MiB, 4 * 1024**3
DEFAULT_FLOPS = {"cuda": (30e12, 15e12, 8e12, 10e12, 0.3e12), "cpu": (50e9, 30e9, 20e9, 20e9, 10e9)}


def default_rates(device: torch.device, inter: int) -> Rates:
    layers, dense, routed, alignment, f64 = DEFAULT_FLOPS.get(device.type, DEFAULT_FLOPS["cpu"])
    assignment = 1e-10 * inter**3  # scipy's solver on an expert's neurons: ~0.05 s at 768, ~1 s at 2048
    return Rates(DEFAULT_READ, DEFAULT_CACHED_READ, layers, dense, routed, alignment, f64, assignment,
                 measured=False, note="assumed slow-end rates, not measured (`ream-lite plan` measures them here)")


def measure_read_speed(layout: ModelLayout, max_bytes: int = READ_SAMPLE_BYTES) -> tuple[float, float]:
    """Bytes per second of a sequential read of up to `max_bytes` from the start of the largest shard, then of the
    same range again (now from the page cache).

    The range is first dropped from the page cache where the OS allows it (posix_fadvise); pages it keeps cached
    still make the first figure look faster than the disk."""
    shards = {e.path for e in layout.reader.entries.values()}
    path = max(shards, key=os.path.getsize)
    n = min(os.path.getsize(path), max_bytes)
    buf = bytearray(min(READ_BLOCK, max(n, 1)))
    view = memoryview(buf)

    def timed_read(fd: int) -> float:
        got, t0 = 0, time.perf_counter()
        while got < n:
            k = os.preadv(fd, [view[: min(len(buf), n - got)]], got)
            if k == 0:
                break
            got += k
        return got / max(time.perf_counter() - t0, 1e-6)

    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
        return timed_read(fd), timed_read(fd)
    finally:
        os.close(fd)


def timed_rate(flops: float, fn: Callable[[], object], device: torch.device, seconds: float = SECONDS_EACH) -> float:
    """FLOP/s of `fn` (doing `flops` per call): one warm-up call, then calls for at least `seconds`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()  # kernel selection, lazy initialisation
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return flops * n / dt


def measure_rates(
    layout: ModelLayout, device: torch.device, dtype: torch.dtype, tokens_per_batch: int, one_chunk: bool = True
) -> Rates:
    """Every rate of `Rates`, at `layout`'s expert shape and router, in `dtype` on `device`; `one_chunk`: a layer's
    experts fit in one chunk (then the streamer accumulates routed outputs in `dtype`, else in float32)."""
    from transformers.activations import ACT2FN

    rc, hidden = layout.router_config, int(layout.config["hidden_size"])
    inter = expert_width(expert_bytes(layout, layout.moe_layers[0].index, torch.float32), 4, hidden)
    act = ACT2FN[layout.config.get("hidden_act", "silu")]
    per_token = 6.0 * hidden * inter  # one expert: gate, up, down
    rows = tokens_per_batch if device.type == "cuda" else max(64, min(tokens_per_batch, int(CPU_FLOPS_PER_CALL / per_token)))
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=g, device=device, dtype=dt)
    chunk = min(4, rc.num_experts)
    w = ExpertWeights(list(range(chunk)), rand(chunk, inter, hidden) * 0.02, rand(chunk, inter, hidden) * 0.02,
                      rand(chunk, hidden, inter) * 0.02)
    x = rand(rows, hidden)
    bias = torch.zeros(rc.num_experts, device=device) if rc.kind == "sigmoid_grouped_topk" else None
    routing = route(x, rand(rc.num_experts, hidden), rc, bias)
    one = ExpertWeights([0], w.gate[:1], w.up[:1], w.down[:1])
    pair = ExpertWeights([0, 1], w.gate[:2], w.up[:2], w.down[:2]) if chunk > 1 else one

    layers = timed_rate(per_token * rows, lambda: expert_output(w, 0, x, act), device)
    stats = StatsCollector(rc.num_experts, hidden, act, rc.kind, dense=True, gram=False)
    stats.on_routing(0, None, x, routing)
    dense = timed_rate(per_token * rows, lambda: stats.on_experts(0, None, x, routing, one), device)
    routed_pairs = max(1, int((routing.indices < chunk).sum()))
    acc = torch.zeros(rows, hidden, dtype=dtype if one_chunk else torch.float32, device=device)
    routed = timed_rate(per_token * routed_pairs,
                        lambda: add_routed_output(acc, x, routing.indices, routing.weights, w, act), device)
    align = AlignmentCollector([(0, 1)], act)
    alignment = timed_rate(len(pair.ids) * 4.0 * hidden * inter * rows + 2.0 * rows * inter * inter,
                           lambda: align.on_experts(0, None, x, routing, pair), device)
    features = weight_features(w.gate[0], w.up[0], w.down[0])
    part = features[: min(inter, 256)]  # the cost scales as I^2 x 3H: a slice is timed
    float64 = timed_rate(2.0 * len(part) ** 2 * 3 * hidden, lambda: weight_cost(part, part), device)
    # an I x I cost of the same kind, from fewer feature columns (the assignment's time depends on I, not on them)
    cols = min(features.shape[1], 512)
    cost = weight_cost(features[:, :cols], weight_features(w.gate[-1], w.up[-1], w.down[-1])[:, :cols])
    t0 = time.perf_counter()
    hungarian(cost)
    assignment = time.perf_counter() - t0
    read, cached = measure_read_speed(layout)
    note = (f"measured: reads of the largest shard (the page cache may inflate the first), the engine's expert, "
            f"statistics and alignment code at [{rows} x {hidden}] x [{hidden} x {inter}] in "
            f"{str(dtype).replace('torch.', '')} on {device}")
    return Rates(read, cached, layers, dense, routed, alignment, float64, assignment, measured=True, note=note)
