"""The passes a compression makes over one MoE layer's cached inputs, shared by `compress`, the guard and the
benchmarks: statistics, the alignment Grams of merged groups, and loading the compressed layer's experts. Every
expert load goes through `LayerStreamer.experts`, so inside `layer_experts` they all share one read of the layer."""

from __future__ import annotations

import torch

from ream_lite import distributed, timing
from ream_lite.engine.budget import alignment_chunk_size, expert_width, merge_slice_size
from ream_lite.engine.experts import ExpertWeights
from ream_lite.engine.router import Routing
from ream_lite.engine.store import Batch, HiddenStateStore, spill
from ream_lite.engine.streamer import LayerStreamer, MoEBlock, Observers
from ream_lite.errors import ReamLiteError
from ream_lite.lsap import shared_pool
from ream_lite.methods import LayerPlan, MethodOptions
from ream_lite.methods.apply import (
    act_cost_of, alignment_items, alignment_pairs, build_merged_experts, needs_activation_pass, solve_alignments,
)
from ream_lite.methods.stats import AlignmentCollector, LayerStats, StatsCollector, collected_gate


def stats_collector(block: MoEBlock, hidden: int, method, opts: MethodOptions) -> StatsCollector:
    """The observer gathering what `method` needs of `block` (experts `hidden` wide on their input)."""
    rc = block.router_cfg
    width = block.latent_in.weight.shape[0] if block.latent_in is not None else hidden  # (the experts' width)
    return StatsCollector(rc.num_experts, width, block.act, rc.kind, dense=method.needs_dense(opts),
                          gate=collected_gate(opts.saliency_gate), gram=method.needs_gram(opts))


def collect_stats(
    streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, method, opts: MethodOptions,
    out: HiddenStateStore | None = None, also=None,
) -> LayerStats:
    """One pass of the MoE block over its cached inputs with the statistics `method` needs (adding the original
    MoE output into `out` when given, for non-sequential compression; `also`: another observer fed by the same
    pass, e.g. the refit's target). Under torchrun the expert chunks are split over the ranks (`distributed`)."""
    collector = stats_collector(block, h.hidden, method, opts)
    world = distributed.current()
    chunks = streamer.expert_chunks(block.router_cfg.num_experts)
    if world.size == 1 or len(chunks) == 1 or (block.post_norm is not None and out is not None):
        streamer.run_moe(block, h, out, observer=Observers(collector, also))
        return collector.result()
    # each rank its contiguous share of the chunks (rank 0 the first); rank 0 sends the MoE inputs, gathers rows
    shares = world.shares(chunks)
    distributed.start_job(world, ("stats", block.layer, shares), h, streamer.opts.tokens_per_batch)
    before = streamer.layout.reader.bytes_read
    streamer.run_moe(block, h, out, observer=Observers(collector, also), chunks=shares[0])
    world.stats_bytes_read += streamer.layout.reader.bytes_read - before
    stats = collector.result()
    distributed.merge_rows(stats, world.gather(None), [[e for c in s for e in c] for s in shares])
    rest = [c for s in shares[1:] for c in s]
    if out is not None or also is not None:  # sums over every expert, added in the one-process chunk order
        continue_sums(streamer, block, h, out, also, rest)
    return stats


def continue_sums(streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, out: HiddenStateStore | None,
                  also, rest: list[list[int]]) -> None:
    """Rank 0, after a statistics pass split by expert chunks: add the `rest` chunks' routed outputs (the other
    ranks' chunks, in order) into `out` and `also`'s store (the refit's target), which hold rank 0's chunks' part.
    Exact only in the one-process order, chunk after chunk, so this is split by token batches instead: each rank
    continues the sums of its share of the batches (rows sent there and back; the other ranks hold the MoE inputs
    since the statistics pass, and read the rest chunks again). Several residual streams: on rank 0 alone (the
    ranks' MoE inputs lack the stream weights)."""
    world = distributed.current()
    tpb = streamer.opts.tokens_per_batch
    before = streamer.layout.reader.bytes_read
    ranges = batch_split(streamer, h) if streamer.streams == 1 else None
    if ranges is None:
        streamer.run_moe(block, h, out, observer=also, chunks=rest, first_call=False)
    else:
        sums = [st for st in (out, also.store if also is not None else None) if st is not None]
        world.broadcast(("sums", block.layer, ranges, [(st.hidden, st.dtype) for st in sums], out is not None, rest))
        distributed.send_rows(world, sums, ranges, tpb, ids=False)
        a, b = ranges[0]
        mine = h.view(a, b)
        view = also.at(a, b) if also is not None else None
        streamer.run_moe(block, mine, out.view(a, b) if out is not None else None, observer=view, chunks=rest,
                         first_call=False)
        world.ran("sums", mine.total_tokens)
        distributed.receive_all(world, sums, ranges, tpb)
        distributed.rows_served(world, ranges, "sums")
    world.sums_bytes_read += streamer.layout.reader.bytes_read - before


STAT_FIELDS = {"reap_sum": "REAP saliency", "ean_sum": "expert output norm", "gated_out_sum": "gated output",
               "out_sum": "expert output", "logit_gram": "router logits"}


def check_finite(stats: LayerStats) -> None:
    """Refuse NaN / Inf statistics, naming the layer and the first expert affected: a plan built on them would be
    silently arbitrary."""
    for name, what in STAT_FIELDS.items():
        t = getattr(stats, name)
        if t is None:
            continue
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            e = int(bad.nonzero()[0, 0])
            raise ReamLiteError(
                f"layer {stats.layer}, expert {e}: non-finite {what} statistics (NaN or Inf); the weights or the "
                "activations overflow in the compute dtype (try --dtype float32) or the checkpoint is corrupt"
            )


class RoutingCounter:
    """Observer counting the tokens routed to each expert, over the first `tokens` rows of the store only (the
    statistics sequences, not the held-out ones)."""

    def __init__(self, num_experts: int, tokens: int):
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.tokens = tokens

    def on_routing(self, layer: int, batch: Batch, x: torch.Tensor, routing: Routing) -> None:
        rows = min(batch.end, self.tokens) - batch.start
        if rows > 0:
            idx = routing.indices[:rows].reshape(-1)
            self.counts += torch.bincount(idx, minlength=len(self.counts))[: len(self.counts)].cpu()

    def on_experts(self, *args) -> None:
        pass


def routing_counts(streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, tokens: int) -> list[int]:
    """Tokens routed to each of `block`'s experts over the first `tokens` rows of `h`: the router alone."""
    counter = RoutingCounter(block.router_cfg.num_experts, tokens)
    with torch.inference_mode():
        for b in h.batches(streamer.opts.tokens_per_batch):
            if b.start >= tokens:
                break
            x = h.read(b, streamer.device).reshape(-1, h.hidden)
            counter.on_routing(block.layer, b, x, block.route(x, h.batch_ids(b)))
    return counter.counts.tolist()


def alignment_stats(
    streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, plans: list[LayerPlan]
) -> AlignmentCollector | None:
    """One activation pass for the neuron alignment of every merged group of every plan in `plans` (the guard's
    candidates share their centroids, so each expert chunk is a centroid with all the members any plan gives it)."""
    pairs = sorted({p for plan in plans if needs_activation_pass(plan) for p in alignment_pairs(plan)})
    if not pairs:
        return None
    members: dict[int, list[int]] = {}
    for c, m in pairs:
        members.setdefault(c, []).append(m)
    acts = AlignmentCollector(pairs, block.act, park=gram_park(streamer))
    chunks = alignment_chunks(streamer, members)
    world = distributed.current()
    with timing.phase("alignment"):
        if world.size == 1 or len(chunks) == 1 or not pairs_in_one_chunk(pairs, chunks):
            streamer.run_moe(block, h, None, observer=acts, chunks=chunks)
            return acts.finish()
        # each rank a contiguous share of the centroids, with all their chunks: every pair's Gram is computed in one
        # chunk, every expert's norms in the first chunk it is in (AlignmentCollector), so the rank owning it has
        # them whole, and each centroid's Grams are on one rank (its merges go there)
        by_centroid: dict[int, list[list[int]]] = {}
        for ch in chunks:
            by_centroid.setdefault(ch[0], []).append(ch)
        shares = [[ch for cs in share for ch in cs] for share in world.shares(list(by_centroid.values()))]
        distributed.start_job(world, ("align", block.layer, pairs, shares), h, streamer.opts.tokens_per_batch)
        streamer.run_moe(block, h, None, observer=acts, chunks=shares[0])
        distributed.merge_alignment(acts.finish(), world.gather(None), shares, streamer.device)
        world.align_split = (block.layer, [list(dict.fromkeys(ch[0] for ch in share)) for share in shares])
    return acts


def gram_park(streamer: LayerStreamer):
    """Where an alignment pass keeps each chunk's Grams once that chunk is done: when the pass runs on a GPU, host
    memory, or work-dir files where the plan says they would not fit the host budget (`MemoryPlan.gram_tier`);
    the merges bring each back as they need it. On a CPU, where they are."""
    if streamer.device.type == "cpu":
        return None
    if streamer.plan is not None and streamer.plan.gram_tier == "disk":
        work_dir = streamer.opts.work_dir
        return lambda t: spill(t, work_dir, "alignment Grams")
    return lambda t: t.to("cpu")


def merged_hold(streamer: LayerStreamer):
    """Where merged experts wait until their layer is written: host memory, or work-dir files where the plan says
    they would not fit the host budget (`MemoryPlan.merged_tier`; the guard holds up to three candidates' sets)."""
    if streamer.plan is None or streamer.plan.merged_tier != "disk":
        return None
    work_dir = streamer.opts.work_dir
    return lambda parts: tuple(spill(t, work_dir, "merged experts") for t in parts)


def pairs_in_one_chunk(pairs: list[tuple[int, int]], chunks: list[list[int]]) -> bool:
    """Whether each pair's experts share exactly one chunk: a pair's Gram sums over every chunk holding both, so the
    alignment pass splits over ranks only then (the guard's candidates sharing their centroids make it the rule)."""
    where: dict[int, set[int]] = {}
    for i, chunk in enumerate(chunks):
        for e in chunk:
            where.setdefault(e, set()).add(i)
    return all(len(where[c] & where[j]) == 1 for c, j in pairs)


def presolve_alignments(streamer: LayerStreamer, plans: list[LayerPlan], acts: AlignmentCollector | None,
                        perm_cache: dict) -> None:
    """Solve the neuron alignments of `plans` all at once instead of one by one as the merges need them: under
    torchrun over the ranks (`distributed.solve_alignments`, balanced by pair whatever the groups' sizes), else on
    the assignment threads (ream_lite.lsap) where that reads nothing extra (the layer's experts cached on the
    device). Elsewhere the merges hand each pair to those threads as they go (`build_merged_experts`)."""
    if not plans:
        return
    pool, layer = shared_pool(), plans[0].layer

    def load(ids: list[int]) -> ExpertWeights:
        return streamer.experts(layer, ids, torch.float32)

    world = distributed.current()
    if world.size > 1:
        items = alignment_items(plans, perm_cache)
        if len(items) > 1:
            with timing.phase("assignment"):
                distributed.solve_alignments(world, layer, items, lambda c, m: act_cost_of(acts, c, m), perm_cache,
                                             load, pool)
        return
    if pool.workers < 2 or not streamer.holds_experts(layer, torch.float32):
        return
    with timing.phase("assignment"):
        solve_alignments(plans, acts, perm_cache, load, pool)


def merge_plan(
    streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, plan: LayerPlan,
    acts: AlignmentCollector | None = None, perm_cache: dict | None = None, split: bool = False,
) -> dict:
    """Merged experts of `plan` (host memory, stored dtype), after the activation pass its alignment needs (unless
    `acts` already holds it; `perm_cache` shares solved alignments between plans). `split`: under torchrun, each
    rank merges the groups of the centroids whose alignment chunks it ran (`merge_shares`)."""
    if acts is None and needs_activation_pass(plan):
        acts = alignment_stats(streamer, block, h, [plan])
    perm_cache = {} if perm_cache is None else perm_cache
    shares = merge_shares(streamer, plan) if split else None
    presolve_alignments(streamer, [plan], acts, perm_cache)

    def load(ids: list[int]) -> ExpertWeights:  # the merges run in float32
        return streamer.experts(plan.layer, ids, torch.float32)

    with timing.phase("merge"):  # (assignments not solved in advance are solved here, on the assignment threads)
        if shares is None:
            return build_merged_experts(streamer.layout, plan, acts, streamer.device, perm_cache, load,
                                        streamer.output_format, streamer.dtype, group_slice=merge_slice(streamer),
                                        hold=merged_hold(streamer))
        world = distributed.current()
        theirs = {c for share in shares[1:] for c in share}  # (their groups' alignments, where solved already)
        world.broadcast(("merge", plan.layer, plan, shares, {p: v for p, v in perm_cache.items() if p[0] in theirs}))
        merged = build_merged_experts(streamer.layout, plan, acts, streamer.device, perm_cache, load,
                                      streamer.output_format, streamer.dtype, only=set(shares[0]),
                                      group_slice=merge_slice(streamer), hold=merged_hold(streamer))
        world.merged_groups += len(shares[0])
        distributed.merge_groups(plan, merged, world.gather(None), shares)
        return {c: merged[c] for c in plan.merged_groups()}  # (the one-process order)


def merge_slice(streamer: LayerStreamer) -> int | None:
    """Members a merge loads at once (`build_merged_experts`), in an expert chunk's room (`merge_slice_size`; None
    without a memory plan: the whole group)."""
    m = streamer.plan
    return merge_slice_size(m.experts_per_chunk, m.expert_bytes, streamer.dtype.itemsize) if m else None


def alignment_chunks(streamer: LayerStreamer, members: dict[int, list[int]]) -> list[list[int]]:
    """The alignment pass's chunks: each centroid with the members any plan gives it, in an expert chunk's room
    with their Grams (`alignment_chunk_size`; the centroid in each: a pair's Gram is summed where both run, so the
    numbers are the same however the members are cut)."""
    m = streamer.plan
    inter = expert_width(m.expert_bytes, streamer.dtype.itemsize, streamer.hidden) if m else 0
    size = alignment_chunk_size(m.experts_per_chunk, m.expert_bytes, inter) if m else None
    out = []
    for c, ms in sorted(members.items()):
        step = size - 1 if size else max(1, len(ms))
        out += [[c, *ms[a : a + step]] for a in range(0, len(ms), step)]
    return out


def plain_output(streamer: LayerStreamer, layer: int) -> bool:
    """Whether the layer's merged experts are written as plain tensors: an encoded output remembers the bytes it
    encoded (OutputFormat.readback) in the process that merged them, which must then be the writing rank 0."""
    out, r = streamer.output_format, streamer.layout.reader
    return out.quantize is None and not out.gguf_types and not any(
        r.entry(k).is_encoded for k in streamer.layout.expert_keys(layer))


def merge_shares(streamer: LayerStreamer, plan: LayerPlan) -> list[list[int]] | None:
    """Each rank's centroids for merging `plan`'s groups under torchrun (None: merge on rank 0 alone): the ones
    whose alignment chunks it ran (it holds their Grams), or, for merges that need no activations, contiguous
    shares of the centroids."""
    world = distributed.current()
    centroids = sorted(plan.merged_groups())
    if world.size == 1 or len(centroids) < 2 or not plain_output(streamer, plan.layer):
        return None
    if not needs_activation_pass(plan):
        return world.shares(centroids)
    split = world.align_split
    if split is None or split[0] != plan.layer:
        return None
    # (the guard's candidates each merge some of the centroids the shared alignment pass ran)
    wanted = set(centroids)
    shares = [[c for c in share if c in wanted] for share in split[1]]
    return shares if sum(map(len, shares)) == len(centroids) else None


def compressed_loader(streamer: LayerStreamer, plan: LayerPlan, merged: dict):
    """Load experts of the compressed layer by position (0..N'-1): merged (or refit) ones from memory, the others
    as `streamer.experts` gives them (the layer's expert cache, or the checkpoint)."""
    kept = plan.kept

    def load(positions: list[int]) -> ExpertWeights:
        ids = [kept[p] for p in positions]
        w = streamer.experts(plan.layer, ids, copy=bool(merged))  # (merged experts are written into the chunk)
        for j, e in enumerate(ids):
            if e in merged:
                for dst, t in zip(w.parts, merged[e], strict=True):  # (gate, up, down[, biases])
                    dst[j].copy_(t)
        w.ids = list(positions)
        return w

    return load


# -- passes split by token batches under torchrun ----------------------------------------------------------------------
def attention_pass(streamer: LayerStreamer, i: int, h: HiddenStateStore, out: HiddenStateStore) -> MoEBlock | None:
    """Layer i but its routed experts (`LayerStreamer.attention_phase`: attention, a dense layer's MLP, the MoE
    block's input into `h`). Under torchrun the token batches are split over the ranks: rank 0 sends each rank its
    sequences' rows, runs its own and takes back theirs (every batch computed as in one process)."""
    ranges = batch_split(streamer, h)
    if ranges is None:
        return streamer.attention_phase(i, h, out)
    world, tpb = distributed.current(), streamer.opts.tokens_per_batch
    world.broadcast(("attention", i, ranges, list(h.lengths), h.token_ids is not None, out.hidden))
    distributed.send_rows(world, [h], ranges, tpb)
    a, b = ranges[0]
    mine = h.view(a, b)
    block = streamer.attention_phase(i, mine, out.view(a, b))
    world.ran("attention", mine.total_tokens)
    out.token_ids = h.token_ids  # (the same tokens, one layer on)
    distributed.receive_all(world, [h, out], ranges, tpb)
    distributed.rows_served(world, ranges, "attention outputs")
    return block


def sequential_pass(streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, out: HiddenStateStore,
                    plan: LayerPlan, merged: dict, stats_tokens: int) -> list[int]:
    """The compressed MoE block (`block` restricted to `plan.kept`, merged experts from `merged`) over the layer's
    MoE inputs `h`, added into `out` (the next layer's input); returns the tokens routed to each kept expert among
    the first `stats_tokens` rows. Under torchrun the token batches are split over the ranks as in
    `attention_pass`; the ranks read the kept experts themselves and are sent the merged ones."""
    counter = RoutingCounter(len(plan.kept), stats_tokens)
    loader = compressed_loader(streamer, plan, merged)
    ranges = batch_split(streamer, h)
    if ranges is None:
        streamer.run_moe(block, h, out, observer=counter, experts=loader)
        return counter.counts.tolist()
    world, tpb = distributed.current(), streamer.opts.tokens_per_batch
    world.broadcast(("sequential", plan.layer, ranges, list(h.lengths), h.token_ids is not None, out.hidden, plan,
                     merged, stats_tokens))
    distributed.send_rows(world, [h.columns(0, moe_row_width(streamer)), out], ranges, tpb)
    a, b = ranges[0]
    mine = h.view(a, b)
    streamer.run_moe(block, mine, out.view(a, b), observer=counter, experts=loader)
    world.ran("sequential", mine.total_tokens)
    distributed.receive_all(world, [out], ranges, tpb)
    for _, part in distributed.served(world.gather(None), [b > a for a, b in ranges], "routing counts"):
        counter.counts += part["counts"]
    return counter.counts.tolist()


def batch_split(streamer: LayerStreamer, h: HiddenStateStore) -> list[tuple[int, int]] | None:
    """Each rank's share of `h`'s token batches, as sequence ranges (`distributed.batch_ranges`), for a pass split
    by batches under torchrun; None where it runs in this process alone (one process, or a single batch)."""
    world = distributed.current()
    batches = h.batches(streamer.opts.tokens_per_batch)
    return distributed.batch_ranges(world, batches) if world.size > 1 and len(batches) > 1 else None


def moe_row_width(streamer: LayerStreamer) -> int:
    """Values per token the MoE block reads from its layer's rows: its input, and with several residual streams
    the weights its output enters them with (`LayerStreamer.stream_weights`)."""
    return streamer.hidden + (streamer.streams if streamer.streams > 1 else 0)

