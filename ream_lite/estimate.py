"""What a compression will take, from the checkpoint headers and the settings alone, before any work.

`ream-lite plan` prints it; `compress` uses it to refuse a run whose output will not fit on disk. The figures
follow what `pipeline.compress` does, pass by pass (keep them in step with `pipeline.py`, `guard.py` and
`passes.py`):

- memory: the streamer's `MemoryPlan` (store tier, expert chunk, expert cache) with the buffers `compress`
  allocates (two working hidden-state stores + the guard's float32 held-out buffers), plus what the plan does not
  size (but makes room for beside the expert cache): the guard's alignment Grams (alive while candidates are
  judged, so they are reserved next to the expert chunk), the alignment pass's centroid-with-members chunk, a
  merged group in float32, and merged experts kept in host memory;
- disk: the output (non-expert tensors, router rows and experts of the kept experts, in their stored dtypes), the
  resume snapshots of the hidden states in `<OUT>.partial/` (one buffer; two while the next replaces it; how many
  are written follows `resume.SnapshotSchedule`), and the hidden-state stores in the work dir when they fit neither
  memory budget;
- reads: every byte `compress` reads from the checkpoint, re-reads included: an expert is read again by each pass
  that runs it (statistics, alignment, merging, each judged candidate, the sequential pass), unless the memory plan
  keeps the layer's experts on the device (`MemoryPlan.cache_experts`), when one read serves every pass; the kept
  experts are then written into the output from the cache where it holds their stored bytes (per-expert storage in
  the compute dtype), else read once more and copied as stored;
- FLOPs: expert matmuls per pass (every expert on every statistics token for methods that need dense statistics,
  else top-k), the alignment pass, the guard's candidates on held-out tokens, the sequential re-run, routers, and
  the rest of each layer (~2 x non-expert parameters per token, plus attention scores).

How many candidates the guard judges and how large the merged groups are is found by running the method's own
planning (and the guard's candidate list) on synthetic statistics of the right size: the group structure of REAM,
HC-SMoE and M-SMoE depends on the expert counts and options, hardly on the data.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ream_lite.arch.layout import LayerLayout, ModelLayout
from ream_lite.calib import planned_counts
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.checkpoint.writer import HEADER_RESERVE, OWN_FILES, WEIGHT_SUFFIXES
from ream_lite.engine.budget import (
    MemoryPlan, alignment_chunk_size, expert_width, merge_slice_size, physical_ram, plan_memory, require_device,
)
from ream_lite.engine.expert_cache import holds_exactly, keeps_encoded, writes_as_stored
from ream_lite.engine.experts import expert_bytes
from ream_lite.engine.streamer import checkpoint_dtype
from ream_lite.guard import candidate_plans
from ream_lite.methods import METHODS, LayerPlan, MethodInput, MethodOptions
from ream_lite.methods.apply import alignment_pairs, needs_activation_pass
from ream_lite.methods.stats import LayerStats
from ream_lite.rates import Rates, default_rates, measure_rates
from ream_lite.resume import expected_snapshots, parse_snapshot_every
from ream_lite.write_output import compression_steps, make_output_format, non_layer_keys

if TYPE_CHECKING:  # pipeline imports this module
    from ream_lite.pipeline import CompressConfig

GiB, MiB = 1024**3, 1024**2
# python, torch, transformers and the model skeleton before any weight: ~0.3 GiB measured on CPU; the CUDA
# libraries add about a GiB of host memory
RUNTIME_HOST_BYTES = {"cpu": GiB // 2, "cuda": 3 * GiB // 2}


def compress_stores(dtype: torch.dtype, holdout_sequences: int, sequences: int, streams: int = 1) -> float:
    """Hidden-state buffers `compress` holds at once, in units of one [tokens, residual width] buffer in `dtype`:
    the layer's input and output, and the guard's y, y_hat and best y_hat (float32, held-out tokens only, one
    stream wide: an MoE block's output)."""
    elt = torch.empty(0, dtype=dtype).element_size()
    return 2 + 3 * (4 / elt) * holdout_sequences / max(sequences, 1) / streams


def refit_stores(dtype: torch.dtype, holdout_sequences: int, sequences: int, streams: int = 1) -> float:
    """The refit's target / residual buffer (float32, statistics tokens, one stream wide) in the same units: placed
    after the others (`MemoryPlan.side_tier`)."""
    elt = torch.empty(0, dtype=dtype).element_size()
    return (4 / elt) * (sequences - holdout_sequences) / max(sequences, 1) / streams


def refits_per_layer(cfg: CompressConfig, merging: bool) -> int:
    """Plans `compress` refits per MoE layer (ream_lite.refit): the chosen one, and REAP's too when the guard may
    choose a merge; 0 without refit."""
    if not cfg.refits:
        return 0
    if cfg.guard_mode == "off" or cfg.refit.mode == "on":
        return 1
    return 2 if merging else 1


def expected_holdout(cfg: CompressConfig, sequences: int) -> int:
    """Held-out sequences `compress` will keep for the guard: the calibration's own per-domain counts, as given
    when every domain has text enough."""
    if cfg.guard_mode == "off":
        return 0
    _, held = planned_counts(cfg.calib, num_sequences=sequences, mix=cfg.mix, holdout=cfg.holdout)
    return sum(held.values())


@dataclass(frozen=True)
class MergeShape:
    """The size of what one MoE layer's planning produces: candidates, merged groups, alignment work."""

    judged: int  # candidate plans the guard judges on held-out tokens (0 without the guard), refits included
    refits: int  # plans refit per MoE layer (ream_lite.refit)
    merged_groups: int  # most merged groups of any candidate
    largest_group: int  # most experts in one merged group (centroid included)
    merge_reads: int  # experts read to build the merged experts of every merging candidate
    alignment_pairs: int  # distinct (centroid, member) pairs in the activation-alignment pass
    alignment_chunks: int  # chunks of that pass: one per centroid, with every member any candidate gives it
    alignment_experts: int  # experts loaded by that pass, in total
    largest_alignment_chunk: int
    assignments: int  # distinct merged pairs whose neurons are aligned (a Hungarian assignment each)
    weight_cost_pairs: int  # of those, the pairs aligned on weights too (a float64 cost each)
    merged_sets: int  # candidates' merged experts alive at once in host memory
    undo_groups: int  # merged groups the guard's greedy pass tries to undo
    written_merged: int  # kept experts written from memory, not copied from the checkpoint


def _synthetic_stats(n: int, seed: int, hidden: int = 8) -> LayerStats:
    """Statistics of the right shape with random content: enough for a method to produce its group structure."""
    g = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": g}
    count = torch.randint(1, 1000, (n,), generator=g)
    reap = torch.rand(n, **f64) * count
    logits = torch.randn(4 * n, n, **f64)
    return LayerStats(0, n, int(count.sum()), count, reap, reap * 0.1, reap * 2, logits.T @ logits,
                      torch.randn(n, hidden, **f64), torch.randn(n, hidden, **f64))


def merge_shape(n: int, n_keep: int, n_group: int, method: str, options: MethodOptions, guard_mode: str,
                seed: int = 0, cfg: CompressConfig | None = None) -> MergeShape:
    stats = _synthetic_stats(n, seed)
    if guard_mode == "off":
        plans = [METHODS[method].plan(MethodInput(stats, n_keep, n_group, options, seed))]
    else:
        plans = [c.plan for c in candidate_plans(stats, n_keep, n_group, options, seed, method)]
    merging: list[LayerPlan] = [p for p in plans if p.merged_groups()]
    # the activation pass of `passes.alignment_stats`: every pair of every plan, one chunk per centroid
    pairs = {pair for p in plans if needs_activation_pass(p) for pair in alignment_pairs(p)}
    members = Counter(c for c, _ in pairs)
    # `apply.build_merged_experts`: each distinct pair is aligned once per layer, its permutation then shared
    solved = {pair for p in merging if p.align != "none" for pair in alignment_pairs(p)}
    weighted = {pair for p in merging if "weight" in p.align for pair in alignment_pairs(p)}
    groups = max((len(p.merged_groups()) for p in merging), default=0)
    guarded = guard_mode != "off"
    refine = guard_mode == "group" and bool(merging)  # the greedy pass's refined candidate, judged too
    refits = refits_per_layer(cfg, bool(merging)) if cfg is not None else 0
    return MergeShape(
        judged=len(plans) + refine + refits if guarded else 0,
        refits=refits,
        merged_groups=groups,
        largest_group=max((len(m) for p in merging for m in p.merged_groups().values()), default=0),
        merge_reads=sum(len(m) for p in merging for m in p.merged_groups().values()),
        alignment_pairs=len(pairs),
        alignment_chunks=len(members),
        alignment_experts=len(members) + len(pairs),
        largest_alignment_chunk=1 + max(members.values(), default=-1),
        assignments=len(solved),
        weight_cost_pairs=len(weighted),
        # the guard holds the chosen and the best merging candidate's merged experts, and builds the next one
        merged_sets=min(3, len(merging)) if guarded else int(bool(merging)),
        undo_groups=groups if refine else 0,
        # with the guard, REAP may win: then every kept expert is copied from the checkpoint (the upper bound)
        written_merged=0 if guarded else groups,
    )


@dataclass
class Work:
    """What the passes compute, by the kind of code that does it (each kind runs at its own measured rate)."""

    layers: float = 0.0  # FLOPs: attention, dense MLPs, shared experts, routers (whole-batch matmuls)
    dense: float = 0.0  # FLOPs: dense statistics, every expert on every statistics token
    routed: float = 0.0  # FLOPs: experts on the tokens routed to them (statistics, guard, sequential pass)
    alignment: float = 0.0  # FLOPs: the activation-alignment pass (intermediate activations, cross Grams)
    float64: float = 0.0  # FLOPs: float64 weight-alignment costs of merged pairs
    assignments: int = 0  # Hungarian assignments of merged pairs' neurons (CPU)

    def __add__(self, o: Work) -> Work:
        return Work(*(a + b for a, b in zip(astuple(self), astuple(o))))

    @property
    def flops(self) -> float:
        return self.layers + self.dense + self.routed + self.alignment + self.float64

    def seconds(self, r: Rates) -> float:
        return (self.layers / r.layers + self.dense / r.dense + self.routed / r.routed + self.alignment / r.alignment
                + self.float64 / r.float64 + self.assignments * r.assignment)


@dataclass(frozen=True)
class LayerCost:
    """One row of the per-layer table (bytes as stored in the checkpoint)."""

    index: int
    kind: str  # moe | dense | mtp (an MTP layer with routed experts) | mtp-dense
    non_expert_bytes: int
    expert_bytes: int
    experts: int  # routed experts before
    kept: int  # routed experts written
    experts_per_chunk: int  # 0: no routed experts
    chunks: int
    output_bytes: int  # 0: not written (--drop-mtp)
    read_bytes: int  # re-reads included
    once_bytes: int  # the layer's bytes read at least once (all of it, unless dropped)
    work: Work = field(default_factory=Work, compare=False)

    def row_key(self) -> tuple:
        """What must be equal for consecutive layers to share one row of the table."""
        return (self.kind, self.non_expert_bytes, self.expert_bytes, self.experts, self.kept, self.experts_per_chunk,
                self.chunks, self.output_bytes)


@dataclass
class CompressionEstimate:
    """What `compress` with one configuration will take (see the module docstring): `lines()` prints it for
    people, `to_dict()` for `--json`."""

    model: str
    family: str
    method: str
    guard: str
    sequential: bool
    experts: int
    kept: int
    sequences: int
    seq_len: int
    tokens: int
    holdout_sequences: int
    memory: MemoryPlan
    merge: MergeShape
    layers: list[LayerCost]
    phases: dict[str, int]  # device bytes at the peak of each phase of an MoE layer
    gram_bytes: int  # the activation-alignment Grams of one layer
    gram_host_bytes: int  # of which in host memory (a GPU run parks each chunk's once it is done)
    gram_device_bytes: int  # Grams and norms on the device during the alignment pass
    host_peak_bytes: int
    merged_host_bytes: int  # merged experts held in host memory at once
    input_bytes: int  # the checkpoint's tensor bytes
    other_bytes: int  # tensors outside the decoder layers (embeddings, final norm, head): copied
    embed_bytes: int  # the embedding, read again to embed the calibration tokens
    output_bytes: int  # tensor bytes of the output
    output_disk_bytes: int  # the output directory: tensors, shard headers, side files
    resume_bytes: int  # hidden-state snapshots in <OUT>.partial/ for resume (two at once, briefly)
    rates: Rates
    notes: list[str] = field(default_factory=list)
    snapshot_every: str | int = "auto"  # --snapshot-every
    steps: int = 0  # layers compressed, one after the other (MTP layers unless dropped)
    # how the output stores its tensors (--out-dtype / --quantize): sizes above are by it; compress writes with it
    output_format: OutputFormat | None = None
    format_line: str | None = None  # a GGUF input: its output's types (checkpoint/gguf.describe_types)
    refit_sweeps: int = 0  # --refit-sweeps, --refit-ridge (when the layers are refit)
    refit_ridge: float = 0.0

    # -- totals -------------------------------------------------------------------------------------------------
    @property
    def peak_device_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def work_dir_bytes(self) -> int:
        """Hidden-state stores spilled to files in the work dir (disk tier), else 0."""
        return self.memory.disk_bytes

    def _work_dir_line(self) -> str:
        m = self.memory
        grams = m.gram_spill_bytes if m.gram_tier == "disk" else 0
        spilled = grams + (m.merged_spill_bytes if m.merged_tier == "disk" else 0)
        if not self.work_dir_bytes:
            return "nothing (hidden states stay in memory)"
        parts = [f"{_size(self.work_dir_bytes - spilled)} of hidden-state files"] if self.work_dir_bytes > spilled \
            else []
        if grams:
            parts.append(f"up to {_size(grams)} of a layer's alignment Grams")
        if m.merged_tier == "disk":
            parts.append(f"up to {_size(m.merged_spill_bytes)} of a layer's merged experts")
        return ", ".join(parts)

    @property
    def read_bytes(self) -> int:
        return self.other_bytes + self.embed_bytes + sum(x.read_bytes for x in self.layers)

    @property
    def read_once_bytes(self) -> int:
        """Every tensor byte that is used, read once: the floor of the I/O."""
        return self.other_bytes + sum(x.once_bytes for x in self.layers)

    @property
    def page_cache_bytes(self) -> int:
        """RAM left to the page cache at the host peak: a layer that fits is re-read from memory, not the disk."""
        return max(0, physical_ram() - self.host_peak_bytes)

    def read_seconds(self, rereads: bool = True) -> float:
        r, cache = self.rates, self.page_cache_bytes
        again = lambda nbytes, whole: nbytes / (r.cached_read if whole <= cache else r.read)
        t = self.other_bytes / r.read + (again(self.embed_bytes, self.embed_bytes) if rereads else 0)
        for x in self.layers:
            t += x.once_bytes / r.read + (again(x.read_bytes - x.once_bytes, x.once_bytes) if rereads else 0)
        return t

    def compute_seconds(self) -> float:
        return self.work.seconds(self.rates)

    @property
    def snapshots(self) -> int:
        """Resume snapshots over the run, one hidden-state buffer written and synced each: `resume.SnapshotSchedule`
        run with this estimate's own seconds per layer (reads and compute) and per snapshot (a buffer at the
        write rate); exact for --snapshot-every N / layer / off, an estimate for auto (which also snapshots at
        least every 30 min)."""
        step_seconds = (self.read_seconds() + self.compute_seconds()) / max(self.steps, 1)
        return expected_snapshots(self.snapshot_every, self.steps, step_seconds, self._snapshot_seconds())

    @property
    def snapshot_write_bytes(self) -> int:
        return self.snapshots * self.memory.store_bytes

    def _snapshot_seconds(self) -> float:
        return self.memory.store_bytes / self.rates.read

    def write_seconds(self) -> float:
        """Writing the output and the resume snapshots, at the disk's measured read rate (writes are not
        measured)."""
        return self.output_bytes / self.rates.read + self.snapshots * self._snapshot_seconds()

    @property
    def work(self) -> Work:
        total = Work()
        for x in self.layers:
            total = total + x.work
        return total

    @property
    def seconds(self) -> float:
        return self.read_seconds() + self.compute_seconds() + self.write_seconds()

    @property
    def floor_seconds(self) -> float:
        """Each byte read once from the disk and the same expert FLOPs (DESIGN.md's time floor)."""
        return self.read_seconds(rereads=False) + self.compute_seconds()

    # -- output -------------------------------------------------------------------------------------------------
    def table_rows(self) -> list[tuple[int, int, LayerCost]]:
        """(first index, last index, layer) for runs of consecutive layers that print the same."""
        rows: list[tuple[int, int, LayerCost]] = []
        for x in self.layers:
            if rows and rows[-1][2].row_key() == x.row_key() and rows[-1][1] == x.index - 1:
                rows[-1] = (rows[-1][0], x.index, rows[-1][2])
            else:
                rows.append((x.index, x.index, x))
        return rows

    def lines(self) -> list[str]:
        m, w, r = self.memory, self.work, self.rates
        tiers = {"device": f"on the device ({m.device})", "host": "in host RAM", "disk": "in files in the work dir"}
        out = [
            f"model      {self.model} ({self.family}), {self.method} {self.experts} -> {self.kept} experts per MoE "
            f"layer, guard {self.guard}, {'sequential' if self.sequential else 'not sequential'}",
            f"tokens     {self.sequences:,} sequences of up to {self.seq_len} tokens: {self.tokens:,}"
            + (f", {self.holdout_sequences:,} sequences held out for the guard" if self.holdout_sequences else ""),
            f"compute    {m.device}, {m.dtype}; budgets: device {_size(m.device_budget)}, host {_size(m.host_budget)}",
            "",
            f"{'layers':<9} {'kind':<9} {'other':>10} {'routed':>10} {'experts':>11} {'chunks':>10} "
            f"{'written':>10}",
        ]
        for a, b, x in self.table_rows():
            name = str(a) if a == b else f"{a}-{b}"
            experts = f"{x.experts} -> {x.kept}" if x.experts else "-"
            chunks = f"{x.chunks} x {x.experts_per_chunk}" if x.experts else "-"
            written = _size(x.output_bytes) if x.output_bytes else "dropped"
            routed = _size(x.expert_bytes) if x.experts else "-"
            out.append(f"{name:<9} {x.kind:<9} {_size(x.non_expert_bytes):>10} {routed:>10} "
                       f"{experts:>11} {chunks:>10} {written:>10}")
        g = self.merge
        out += [
            "(bytes per layer as stored: other = attention, norms, router, shared experts; routed = routed experts; "
            "chunks = expert chunks x experts per chunk)",
            "",
            "memory",
            f"  hidden states  {_size(m.store_bytes)} per buffer x {m.stores:.2f} = {_size(m.all_stores_bytes)}, "
            f"{tiers[m.store_tier]}",
            f"  expert chunks  {m.experts_per_chunk} of {m.max_experts} experts, {_size(m.expert_bytes)} each decoded",
            f"  experts        {m.expert_cache_line()}",
        ]
        if g.alignment_pairs:
            out.append(f"  alignment      {g.alignment_pairs} (centroid, member) pairs: {_size(self.gram_bytes)} of "
                       f"float64 Grams, chunks of up to {g.largest_alignment_chunk} experts"
                       + (f"; each chunk's in host memory once it is done ({_size(self.gram_host_bytes)})"
                          if self.gram_host_bytes else "")
                       + (f"; each chunk's to work-dir files once it is done ({_size(m.gram_spill_bytes)}, over the "
                          f"host budget of {_size(m.host_budget)})" if m.gram_tier == "disk" else ""))
        if g.judged:
            out.append(f"  guard          {g.judged} candidate plans judged per MoE layer on held-out tokens")
        if g.refits:
            out.append(f"  refit          {g.refits} plan{'s' if g.refits > 1 else ''} refit per MoE layer "
                       f"({self.refit_sweeps} sweeps, ridge {self.refit_ridge:g}): a float32 target / residual "
                       f"buffer of the statistics tokens, {_size(m.side_store_bytes)}, {tiers[m.side_tier]}")
        out += [
            f"  peak device    {_size(self.peak_device_bytes)} (during the {self.peak_phase}), budget "
            f"{_size(m.device_budget)}" if m.device != "cpu" else
            f"  peak memory    {_size(self.host_peak_bytes)} (during the {self.peak_phase}; cpu: one memory)",
        ]
        if m.device != "cpu":
            out.append(f"  peak host      {_size(self.host_peak_bytes)}"
                       + (f", of which {_size(self.merged_host_bytes)} merged experts" if self.merged_host_bytes else ""))
        out += [
            "",
            "disk",
            f"  output         {_size(self.output_disk_bytes)} ({_size(self.output_bytes)} of tensors, "
            f"{100 * self.output_bytes / max(self.input_bytes, 1):.1f}% of the input's {_size(self.input_bytes)})",
            *([f"  format         {self.format_line}"] if self.format_line else []),
            self._resume_line(),
            "  work dir       " + self._work_dir_line(),
            f"  reads          {_size(self.read_bytes)} from the checkpoint ({self.read_bytes / max(self.input_bytes, 1):.1f}x"
            + (" its size: a layer's experts are read once for all its passes and the output)"
               if m.cache_experts else " its size: experts are read again by each pass that runs them)"),
            "",
            "time",
            f"  work           {_flops(w.flops)}: " + ", ".join(
                f"{name} {_flops(flops)} at {_flops(rate)}/s" for name, flops, rate in (
                    ("dense statistics", w.dense, r.dense), ("routed experts", w.routed, r.routed),
                    ("alignment", w.alignment, r.alignment), ("weight costs", w.float64, r.float64),
                    ("attention and the rest", w.layers, r.layers)) if flops)
            + (f"; {w.assignments:,} Hungarian assignments at {_duration(r.assignment)}" if w.assignments else ""),
            f"  rates          read {r.read / 1e9:.2f} GB/s from the disk, {r.cached_read / 1e9:.1f} GB/s from the "
            f"page cache; {r.note}",
            f"  estimate       {_duration(self.seconds)}: reads {_duration(self.read_seconds())} (a layer's "
            f"re-reads from the page cache where it fits in the {_size(self.page_cache_bytes)} of RAM left), "
            f"experts and layers {_duration(self.compute_seconds())}, writing {_duration(self.write_seconds())}",
            f"  floor          {_duration(self.floor_seconds)}: each byte read once, the same FLOPs",
        ]
        out += [f"note: {n}" for n in self.notes]
        return out

    def _resume_line(self) -> str:
        every = self.snapshot_every
        if every == "off":
            return "  resume         nothing (--snapshot-every off: an interrupted run starts over)"
        how = {"auto": "auto, estimated", 1: "after every layer"}.get(every, f"every {every} layers")
        return (f"  resume         {_size(self.resume_bytes)} in <OUT>.partial/ while it runs (a hidden-state "
                f"snapshot; two for a moment while the next replaces it); {self.snapshots} snapshots ({how}), "
                f"{_size(self.snapshot_write_bytes)} written over the run")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = {**asdict(self.memory), "all_stores_bytes": self.memory.all_stores_bytes}
        d["output_format"] = self.output_format.describe if self.output_format is not None else None
        d.update(
            peak_device_bytes=self.peak_device_bytes, peak_phase=self.peak_phase,
            work_dir_bytes=self.work_dir_bytes, read_bytes=self.read_bytes, read_once_bytes=self.read_once_bytes,
            work={**asdict(self.work), "flops": self.work.flops},
            page_cache_bytes=self.page_cache_bytes, snapshots=self.snapshots,
            snapshot_write_bytes=self.snapshot_write_bytes, read_seconds=self.read_seconds(),
            compute_seconds=self.compute_seconds(), write_seconds=self.write_seconds(), seconds=self.seconds,
            floor_seconds=self.floor_seconds,
        )
        return d


def _size(nbytes: float) -> str:
    if nbytes >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    return f"{nbytes / 1024:.1f} KiB"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e6:,.1f} MFLOP"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min"


def _metadata_bytes(layout: ModelLayout, n_keep: int, inter: int) -> int:
    """ream_plan.json (a few scores per expert as JSON numbers, base64 int32 neuron permutations of merged
    members), README.md and config.json: generously."""
    n = layout.router_config.num_experts
    return MiB + len(layout.moe_layers) * (100 * n + 6 * (n - n_keep) * inter)


def estimate_compression(
    layout: ModelLayout, cfg: CompressConfig, n_keep: int, *, sequences: int | None = None,
    holdout_sequences: int | None = None, tokens: int | None = None, measure: bool = True,
) -> CompressionEstimate:
    """The estimate for compressing `layout` as `cfg` says to `n_keep` experts per MoE layer (`cfg` validated).

    `sequences` / `holdout_sequences` / `tokens`: the real counts once the calibration text is cut (default: what
    `cfg` asks for, every sequence `seq_len` tokens long). `measure=False` uses default rates and, with a device budget given, touches no CUDA API, so a CUDA plan
    can be computed on a machine without one."""
    opts = cfg.stream
    device = torch.device(opts.device)
    if device.type == "cuda" and (measure or opts.max_gpu_memory is None):
        require_device(device)
    dtype = opts.dtype or checkpoint_dtype(layout.config)
    elt = torch.empty(0, dtype=dtype).element_size()
    n_seq = cfg.num_sequences if sequences is None else sequences
    held = expected_holdout(cfg, n_seq) if holdout_sequences is None else holdout_sequences
    tokens = n_seq * cfg.seq_len if tokens is None else tokens
    rc = layout.router_config
    hidden = int(layout.config["hidden_size"])
    e_decoded = max(expert_bytes(layout, x.index, dtype) for x in layout.moe_layers)
    inter = expert_width(e_decoded, elt, hidden)

    shape = merge_shape(rc.num_experts, n_keep, rc.n_group, cfg.method, cfg.options, cfg.guard_mode, cfg.seed, cfg)
    # float64 [I, I] cross Gram per aligned pair and per-neuron norms per expert, accumulated on the device; with
    # the guard they stay alive while every candidate runs expert chunk by expert chunk. On a GPU each chunk's
    # Grams go to host memory once its pass is done (passes.gram_park) and come back one at a time for the
    # merges: the device holds the norms and one chunk's Grams. Elsewhere all of them are reserved beside the chunk.
    gram_bytes = 8 * (shape.alignment_pairs * inter * inter + shape.alignment_experts * inter)
    parked = device.type != "cpu" and shape.alignment_pairs > 0
    norm_bytes = 8 * shape.alignment_experts * inter
    gram_host = gram_bytes - norm_bytes if parked else 0
    reserve = (norm_bytes if parked else gram_bytes) if cfg.guard_mode != "off" else 0
    f32_expert = e_decoded // elt * 4

    def phase_bytes(chunk: int | None) -> tuple[int, int, int]:
        """(alignment pass, merge, Grams on the device in the alignment pass) beside the layer, with expert chunks
        of `chunk` (None: groups held whole, the bound before the chunk is known). The alignment pass runs a
        centroid with at most chunk - 1 of its members at a time (passes.alignment_chunks), a merge loads chunk / 2
        members at a time in float32 beside the centroid, the sum and one permuted copy (passes.merge_slice), and
        the centroid's and a member's float64 weight features where the alignment uses weights."""
        a_chunk = shape.largest_alignment_chunk if chunk is None else min(
            shape.largest_alignment_chunk, alignment_chunk_size(chunk, e_decoded, inter))
        grams = norm_bytes + (8 * max(a_chunk - 1, 1) * inter * inter if parked else gram_bytes - norm_bytes)
        align = a_chunk * e_decoded + grams if shape.alignment_pairs else 0
        members = shape.largest_group - 1 if chunk is None else min(shape.largest_group - 1,
                                                                    merge_slice_size(chunk, e_decoded, elt))
        loaded = (members + (members if chunk is None else 1) + 2) * f32_expert  # (slice, copies, centroid, sum)
        weight = 4 * f32_expert if "weight" in cfg.options.align else 0  # (MERGE_HELD counts these too)
        merge_grams = norm_bytes + 8 * inter * inter if parked else gram_bytes
        merge = merge_grams + loaded + weight if shape.largest_group else 0
        return align, merge, grams

    def memory_plan(chunk: int | None, max_chunk: int | None):
        align, merge, _ = phase_bytes(chunk)
        return plan_memory(
            layout, tokens, device, dtype, opts.max_gpu_memory, opts.max_cpu_memory, opts.tokens_per_batch,
            opts.store_tier, reserve, compress_stores(dtype, held, n_seq, layout.residual_streams), cfg.seq_len,
            opts.expert_cache, max(align, merge) - reserve,
            refit_stores(dtype, held, n_seq, layout.residual_streams) if cfg.refits else 0.0, max_chunk,
        )

    # planned with whole groups first (the stores placed for the largest phases), then again with the phases that
    # chunk bounds, never with a larger chunk than those phases assumed
    memory = memory_plan(None, opts.experts_per_chunk)
    if shape.largest_group or shape.alignment_pairs:
        memory = memory_plan(memory.experts_per_chunk, memory.experts_per_chunk)
    align_bytes, merge_bytes, gram_device = phase_bytes(memory.experts_per_chunk)
    if shape.alignment_pairs:  # (the chunks the alignment pass runs)
        shape = replace(shape, largest_alignment_chunk=min(
            shape.largest_alignment_chunk, alignment_chunk_size(memory.experts_per_chunk, e_decoded, inter)))

    # device bytes per phase of an MoE layer, on top of the layer's weights, activations, device-tier stores and
    # expert cache
    base = memory.max_layer_dense_bytes + memory.activation_bytes - reserve + memory.expert_cache_bytes
    base += (memory.all_stores_bytes if memory.store_tier == "device" else 0) + memory.side_bytes("device")
    phases = {"expert chunks": memory.peak_device_bytes}
    if shape.alignment_pairs:
        phases["alignment pass"] = base + align_bytes
    if shape.largest_group:
        phases["merge"] = base + merge_bytes

    fmt = make_output_format(layout, n_keep, cfg.out_dtype, cfg.quantize, cfg.double_quant,
                             cfg.gguf_type if cfg.out_format == "gguf" else None)
    layers = [_layer_cost(layout, info, cfg, n_keep, memory, shape, tokens, held, inter, fmt)
              for info in layout.layers]
    r = layout.reader
    other = sum(written_bytes(fmt, k, r.entry(k)) for k in non_layer_keys(layout, cfg.drop_mtp))
    e_stored = max(_stored_expert_bytes(layout, x) for x in layout.moe_layers)
    # merged experts are held as written: stored bytes for plain tensors, decoded (compute dtype) for encoded ones
    encoded = any(r.entry(k).is_encoded for x in layout.moe_layers for k in layout.expert_keys(x.index)[:3])
    # (a GGUF output holds merged experts read back in float32, and their llama.cpp blocks, <= ~1 byte a value,
    # until the layer is written: OutputFormat.readback)
    held_bytes = e_decoded // elt * 5 if layout.gguf or fmt.gguf_types else (e_decoded if encoded else e_stored)
    merged_sets = shape.merged_sets * shape.merged_groups * held_bytes
    fitted = n_keep * (e_decoded if encoded else e_stored) if shape.refits else 0  # (a fit holds every kept expert)
    host_store = (memory.all_stores_bytes if memory.store_tier == "host" else 0) + memory.side_bytes("host")
    # what a GPU run can keep in the work dir instead of host memory, where the host budget has no room for it
    # beside the host-tier stores: the parked Grams first (each read back once or twice), then the merged experts
    if gram_host and host_store + gram_host > memory.host_budget:
        memory = replace(memory, gram_tier="disk", gram_spill_bytes=gram_host)
        gram_host = 0
    host_store += gram_host  # (a GPU run's alignment Grams, parked in host memory)
    if device.type != "cpu" and merged_sets and host_store + merged_sets > memory.host_budget:
        memory = replace(memory, merged_tier="disk", merged_spill_bytes=merged_sets)
        merged_sets = 0
    merged_host = merged_sets + fitted
    runtime = RUNTIME_HOST_BYTES.get(device.type, RUNTIME_HOST_BYTES["cpu"])
    if device.type == "cpu":  # one memory: the device figures are host memory
        host_peak = max(phases.values()) + host_store + merged_host + runtime
    else:  # weights are staged through host memory on their way to the device
        host_peak = host_store + memory.max_layer_dense_bytes + merged_host + runtime
    output = other + sum(x.output_bytes for x in layers)
    shards = max(1, math.ceil(output / cfg.max_shard_bytes))
    output_disk = output + shards * HEADER_RESERVE + _side_file_bytes(layout.path) + _metadata_bytes(layout, n_keep, inter)

    rates = default_rates(device, inter)
    if measure:
        rates = measure_rates(layout, device, dtype, opts.tokens_per_batch,
                              one_chunk=memory.experts_per_chunk >= memory.max_experts)
    est = CompressionEstimate(
        model=str(layout.path), family=layout.spec.model_type, method=cfg.method, guard=cfg.guard_mode,
        sequential=cfg.sequential, experts=rc.num_experts, kept=n_keep, sequences=n_seq, seq_len=cfg.seq_len,
        tokens=tokens, holdout_sequences=held, memory=memory, merge=shape, layers=layers, phases=phases,
        gram_bytes=gram_bytes, gram_host_bytes=gram_host, gram_device_bytes=gram_device,
        refit_sweeps=cfg.refit.sweeps, refit_ridge=cfg.refit.ridge,
        host_peak_bytes=host_peak, merged_host_bytes=merged_host, input_bytes=r.total_bytes(), other_bytes=other,
        embed_bytes=r.entry(layout.spec.embed_key).nbytes,
        output_bytes=output, output_disk_bytes=output_disk, resume_bytes=_resume_bytes(cfg, memory), rates=rates,
        snapshot_every=parse_snapshot_every(cfg.snapshot_every), steps=len(compression_steps(layout, cfg.drop_mtp)),
        output_format=fmt,
        format_line=_format_line(layout),
    )
    est.notes = _notes(est, device)
    return est


def _resume_bytes(cfg: CompressConfig, memory: MemoryPlan) -> int:
    """Disk the resume snapshots need at once: a new snapshot is written and synced before the previous one is
    removed (the layer and shard records beside them are small)."""
    return 0 if parse_snapshot_every(cfg.snapshot_every) == "off" else 2 * memory.store_bytes


def _notes(est: CompressionEstimate, device: torch.device) -> list[str]:
    m, notes = est.memory, []
    if device.type != "cpu" and est.peak_device_bytes > m.device_budget:
        if est.peak_phase in ("merge", "alignment pass") and est.merge.largest_group > 0:
            # a merge holds its whole group, and the alignment pass every pair's Gram: neither is chunked
            notes.append(f"the {est.peak_phase} needs {_size(est.peak_device_bytes)}, above the device budget "
                         f"{_size(m.device_budget)}: {est.merge.alignment_pairs} aligned pairs, groups of up to "
                         f"{est.merge.largest_group} experts are held whole; pass "
                         + ("--guard off (the paper's REAM, one plan per layer), " if est.guard != "off" else "")
                         + "--group-size smaller, or --method reap")
        else:
            notes.append(f"the {est.peak_phase} needs {_size(est.peak_device_bytes)}, above the device budget "
                         f"{_size(m.device_budget)}: it is not split into chunks; lower --num-sequences or "
                         f"--batch-tokens, or pass --store host")
    if est.host_peak_bytes > physical_ram():
        notes.append(f"expected host peak {_size(est.host_peak_bytes)} exceeds this machine's RAM "
                     f"({_size(physical_ram())}); lower --max-cpu-memory so hidden states go to disk")
    if est.merge.refits and est.tokens - est.holdout_sequences * est.seq_len < REFIT_ADVISED_TOKENS:
        notes.append(f"the refit fits the kept experts to the statistics tokens and gains from more of them: on the "
                     f"testbed at 16 -> 8 experts KL 0.49 with 96 x 256 tokens, 0.39 with 256 x 512 (REAP alone: "
                     f"1.00 both, docs/quality.md); at least --num-sequences 256 --seq-len 512 is advised")
    notes.append("time leaves out tokenizing the calibration text and copying weights between host and device")
    return notes


REFIT_ADVISED_TOKENS = 256 * 512 * 9 // 10  # the default calibration's statistics tokens (10% held out)


def _non_expert_keys(layout: ModelLayout, info: LayerLayout) -> list[str]:
    experts = set(layout.expert_keys(info.index))
    return [k for k in layout.layer_keys(info.index) if k not in experts]


def _stored_expert_bytes(layout: ModelLayout, info: LayerLayout) -> int:
    """Stored bytes of one routed expert of `info` (per-expert keys, or one row of the fused tensors)."""
    r = layout.reader
    if info.expert_storage == "fused":
        return sum(r.entry(k).nbytes // info.num_experts for k in layout.expert_keys(info.index))  # (biases too)
    return sum(r.entry(k).nbytes for k in layout.per_expert_keys(info.index, 0))


def _router_keys(layout: ModelLayout, info: LayerLayout) -> set[str]:
    spec = layout.spec
    keys = {layout.moe_key(info.index, spec.router_weight)}
    if spec.router_bias:
        keys.add(layout.moe_key(info.index, spec.router_bias))
    return keys


def _layer_output_bytes(layout: ModelLayout, info: LayerLayout, n_keep: int, fmt: OutputFormat) -> int:
    """Bytes `write_layer` writes for the layer: unchanged tensors as the output format stores them, the kept
    experts' router rows, and the kept experts (merged ones in their original's encoding and shape)."""
    r = layout.reader
    keys = _non_expert_keys(layout, info)
    if not info.is_moe:
        return sum(written_bytes(fmt, k, r.entry(k)) for k in keys)
    routers = _router_keys(layout, info)
    total = 0
    rows = info.num_experts + layout.zero_experts  # (router rows; LongCat-Flash's identity experts' are all kept)
    for k in keys:
        b = written_bytes(fmt, k, r.entry(k))
        total += b // rows * (n_keep + layout.zero_experts) if k in routers else b  # ([E, H], [E] or [1, E] rows)
    if info.expert_storage == "fused":
        per_expert = sum(written_bytes(fmt, k, r.entry(k)) // info.num_experts for k in layout.expert_keys(info.index))
    else:
        per_expert = sum(written_bytes(fmt, k, r.entry(k)) for k in layout.per_expert_keys(info.index, 0))
    return total + n_keep * per_expert


def written_bytes(fmt: OutputFormat, name: str, t) -> int:
    """Bytes the output takes for input tensor `t` written as `name` (bnb 4-bit: codes, float32 absmax per block
    and the small quant_map / quant_state tensors)."""
    if fmt.keeps_stored(name, t):
        return t.nbytes
    if fmt.gguf_types:  # --out-format gguf: the llama.cpp type of the tensor (or of each of its parts)
        from ream_lite.checkpoint.gguf_writer import nbytes_of

        parts = fmt.gguf_splits[name][1] if name in fmt.gguf_splits else [name]
        return nbytes_of(fmt.gguf_types.get(parts[0], 0), (t.numel,))
    if fmt.quantize is not None and name in fmt.quantize_keys:
        return t.numel // 2 + 4 * -(-t.numel // fmt.blocksize) + 16 * 4 + 256
    return t.numel * (fmt.decode_to or fmt.compute_dtype).itemsize


def _layer_cost(
    layout: ModelLayout, info: LayerLayout, cfg: CompressConfig, n_keep: int, memory: MemoryPlan,
    shape: MergeShape, tokens: int, held: int, inter: int, fmt: OutputFormat,
) -> LayerCost:
    r, c = layout.reader, layout.config
    keys = _non_expert_keys(layout, info)
    non_expert = sum(r.entry(k).nbytes for k in keys)
    e_stored = _stored_expert_bytes(layout, info) if info.is_moe else 0
    kind = ("mtp" if info.is_mtp else "moe") if info.is_moe else ("mtp-dense" if info.is_mtp else "dense")
    chunk = min(memory.experts_per_chunk, info.num_experts) if info.is_moe else 0
    chunks = math.ceil(info.num_experts / chunk) if chunk else 0
    cost = {"index": info.index, "kind": kind, "non_expert_bytes": non_expert, "expert_bytes": info.num_experts * e_stored,
                "experts": info.num_experts, "kept": n_keep if info.is_moe else 0, "experts_per_chunk": chunk, "chunks": chunks}
    if info.is_mtp and cfg.drop_mtp:
        return LayerCost(**cost, output_bytes=0, read_bytes=0, once_bytes=0)
    # the rest of the layer: ~2 FLOPs per parameter per token (not the router, counted per pass; not an MTP
    # layer's embedding or head, which are looked up or unused), plus causal attention scores and mixing
    skip = _router_keys(layout, info) if info.is_moe else set()
    spec = layout.spec
    skip |= {spec.mtp_key(info.prefix, spec.mtp_embed), spec.mtp_key(info.prefix, spec.mtp_head)} if info.is_mtp \
        else set()
    params = sum(r.entry(k).numel for k in keys if k not in skip)
    heads = int(c.get("num_attention_heads") or 1)
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    work = Work(layers=tokens * (2.0 * params + 2.0 * cfg.seq_len * heads * head_dim))
    reads = 2 * non_expert + _mtp_read_correction(layout, info)  # built to run the layer, then copied
    if info.is_moe:
        writes = memory.cache_experts and writes_as_stored(layout, info.index, getattr(torch, memory.dtype))
        moe_work, experts_read = _moe_work(layout, info, cfg, n_keep, chunk, shape, tokens, held, inter,
                                           _cached_dtypes(layout, info, memory), writes,
                                           feature_room=memory.activation_bytes // 2)
        work = work + moe_work
        reads += experts_read * e_stored
    return LayerCost(**cost, output_bytes=_layer_output_bytes(layout, info, n_keep, fmt), read_bytes=reads,
                     once_bytes=non_expert + cost["expert_bytes"], work=work)


def _mtp_read_correction(layout: ModelLayout, info: LayerLayout) -> int:
    """An MTP layer's head is only copied, never run (read once, not twice); its input is made with the norm of
    what precedes it (the final norm, or the previous MTP layer's head norm), read once more, while its own head
    norm is read a second time only as the next MTP layer's."""
    if not info.is_mtp:
        return 0
    r, spec = layout.reader, layout.spec
    mtp = [x for x in layout.layers if x.is_mtp]
    k = mtp.index(info)
    prev_norm = spec.final_norm_key if k == 0 else spec.mtp_key(mtp[k - 1].prefix, spec.mtp_head_norm)
    in_layer = set(layout.layer_keys(info.index))
    own = [spec.mtp_key(info.prefix, spec.mtp_head), spec.mtp_key(info.prefix, spec.mtp_head_norm)]
    # input parts kept apart from the layer (Qwen3-Next's mtp.fc, mtp.pre_fc_norm_*) are copied with the tensors
    # outside the layers, and read once more to make the layer's input
    apart = [spec.mtp_key(info.prefix, n) for n in (spec.mtp_enorm, spec.mtp_hnorm, spec.mtp_proj)]
    if spec.mtp_key(info.prefix, spec.mtp_embed) not in r:  # (no embedding of its own: the model's, read again)
        apart.append(spec.embed_key)
    return (r.entry(prev_norm).nbytes - sum(r.entry(key).nbytes for key in own if key in in_layer)
            + sum(r.entry(key).nbytes for key in apart if key in r and key not in in_layer))


def _cached_dtypes(layout: ModelLayout, info: LayerLayout, memory: MemoryPlan) -> str:
    """Which expert loads of the layer `LayerStreamer.layer_experts` serves from its one read: 'none' (no cache),
    'compute' (loads in the compute dtype; the merges' float32 loads are read from the checkpoint, since the cast to
    the compute dtype lost precision) or 'all'."""
    if not memory.cache_experts:
        return "none"
    dtype = getattr(torch, memory.dtype)
    # the merges load float32: the cache serves them when it is float32 itself, or when the cast lost nothing
    exact = dtype == torch.float32 or holds_exactly(layout, info.index, dtype) or keeps_encoded(layout, info.index)
    return "all" if exact else "compute"


def _moe_work(
    layout: ModelLayout, info: LayerLayout, cfg: CompressConfig, n_keep: int, chunk: int, shape: MergeShape,
    tokens: int, held: int, inter: int, cached: str = "none", written_from_cache: bool = False,
    feature_room: int = 0,
) -> tuple[Work, int]:
    """What one MoE layer's passes in `pipeline.compress_moe_layer` compute, and how many experts they read
    (`cached`: which loads the layer's expert cache serves, see `_cached_dtypes`; `written_from_cache`: the kept
    experts go to the output from the cache, which holds their stored bytes, instead of being read again;
    `feature_room`: the refit's `Refitter.feature_room`)."""
    h, n, k = int(layout.config["hidden_size"]), info.num_experts, layout.router_config.top_k
    expert = 6.0 * h * inter  # gate, up and down matmuls, per token
    route = lambda experts, chunks: 2.0 * h * experts * chunks
    chunks, kept_chunks = math.ceil(n / chunk), math.ceil(n_keep / chunk)
    stats_tokens = tokens - held
    seq = cfg.sequential
    # statistics: every expert on every token (dense statistics), else the routed ones; without --sequential the
    # same pass also adds the original MoE output
    dense = METHODS[cfg.method].needs_dense(cfg.options)
    work = Work(layers=stats_tokens * route(n, chunks), dense=stats_tokens * n * expert if dense else 0.0,
                routed=stats_tokens * k * expert * ((0 if dense else 1) + (0 if seq else 1)))
    reads = n
    # activation alignment: gate and up of each chunk's experts on every statistics token, a cross Gram per pair;
    # then per distinct pair a float64 weight cost and a Hungarian assignment (solved once for all candidates)
    work = work + Work(
        layers=stats_tokens * route(n, shape.alignment_chunks),
        alignment=stats_tokens * (shape.alignment_experts * 4.0 * h * inter + shape.alignment_pairs * 2.0 * inter**2),
        float64=shape.weight_cost_pairs * 2.0 * inter**2 * 3 * h, assignments=shape.assignments)
    reads += shape.alignment_experts + shape.merge_reads
    if cfg.guard_mode != "off":
        originals = 1 if seq else 2  # the judge's reference output (+ the layer output without --sequential)
        undo_tokens = 2 * 2 * held * k / n_keep  # per undone group: two experts, twice, on the centroid's tokens
        work = work + Work(
            layers=held * (route(n, chunks) * originals + route(n_keep, kept_chunks) * shape.judged)
            + shape.undo_groups * 2 * held * route(n_keep, 1),
            routed=held * k * expert * (originals + shape.judged) + shape.undo_groups * undo_tokens * expert,
        )
        reads += n * originals + n_keep * shape.judged + shape.undo_groups
    if shape.refits:  # ream_lite.refit, per fitted plan: the routing index, the residual of the plan, then per sweep
        # each routed token's gate / up once, or twice beyond the room where an expert's features are kept between
        # accumulating and updating, its down projection twice, the expert's Gram and cross term; the statistics
        # pass adds y up (the first fit), later fits run the original block again
        sweeps = cfg.refit.sweeps
        feature_bytes = max(1.0, stats_tokens * k / max(n_keep, 1) * (inter + 1) * 4)  # (an average expert's)
        again = 1.0 - min(1.0, feature_room / feature_bytes)
        per_token = 6.0 * h * inter + sweeps * ((8.0 + 4.0 * again) * h * inter + 2.0 * inter * inter)
        # and per expert and sweep a solve: the Cholesky factor (float64) and the triangular solves for H rows
        solves = shape.refits * sweeps * n_keep
        work = work + Work(
            layers=stats_tokens * (route(n_keep, 1) * shape.refits + route(n, chunks) * (shape.refits - 1)),
            routed=stats_tokens * k * (per_token * shape.refits + expert * shape.refits),
            float64=solves * (inter**3 / 3 + 2.0 * inter * inter * h))
        # expert loads: the plan's chunks once per sweep and for the residual, the refit experts' float32 values
        # once per sweep (their output values), and the original experts for every fit after the first
        reads += shape.refits * (n_keep * (1 + 2 * sweeps)) + n * (shape.refits - 1)
    if seq:  # the compressed block run again to produce the next layer's input
        work = work + Work(layers=tokens * route(n_keep, kept_chunks), routed=tokens * k * expert)
        reads += n_keep
    else:  # the compressed router alone, to count its routing
        work = work + Work(layers=stats_tokens * route(n_keep, 1))
    if cached != "none":  # one read of every expert serves the passes (the merges' too, where that is exact)
        reads = n + (shape.merge_reads if cached == "compute" else 0)
    if not written_from_cache:
        reads += n_keep - shape.written_merged  # kept experts copied into the output, as stored
    return work, reads


def _format_line(layout: ModelLayout) -> str | None:
    if not layout.gguf:
        return None
    from ream_lite.checkpoint.gguf import describe_types

    return describe_types(layout.reader)


def _side_file_bytes(directory: Path) -> int:
    """Tokenizer, generation config ...: what `copy_side_files` carries into the output (nothing for a GGUF, which
    holds its tokenizer)."""
    if directory.is_file():
        return 0
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
               and p.name not in OWN_FILES)
