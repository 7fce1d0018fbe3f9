"""The ranks other than 0 of a `torchrun ... -m ream_lite compress` run: they serve rank 0's passes.

Each message rank 0 broadcasts is a tuple (see `distributed`):
- ("plan", MemoryPlan): the memory plan rank 0 follows (its expert chunks and token batches);
- ("stats", layer, shares, store): this rank runs its share of the layer's expert chunks over the layer's MoE inputs
  and sends each of its experts' statistics back; `store` (lengths, hidden, token ids follow): the inputs follow
  the message (None: the ones this rank holds);
- ("align", layer, pairs, shares, store): the same for the alignment pass (pair Grams and neuron norms), which this
  rank keeps for the layer's merges;
- ("solve", layer, rounds, spec): this rank solves its share of each round of the layer's neuron alignments
  (Hungarian assignments), the activation parts of their costs received from rank 0 (`spec`: their shape and
  dtype), and sends back the permutations, round by round;
- ("merge", layer, plan, shares, perms): this rank merges the groups of its centroids (their alignments solved
  already in `perms`) and sends them back with their neuron alignments (paper REAM's plan, or each of the guard's
  candidates in turn);
- ("attention", layer, ranges, lengths, ids, width): this rank runs the layer but its routed experts (attention,
  a dense MLP) over its share of the token batches, sequences ranges[rank], whose rows (and token ids) rank 0 sends
  next, and sends back the layer's rows and the MoE block's inputs;
- ("sequential", layer, ranges, lengths, ids, width, plan, merged, stats_tokens): the same for the sequential pass:
  the compressed block (kept experts read here, merged ones in the message) over its batches' MoE inputs, added into
  their residual rows, which it sends back with its routing counts;
- ("sums", layer, ranges, stores, out, rest): after a statistics pass, this rank continues the sums over every
  expert (a non-sequential run's MoE output, the refit's target) for its share of the token batches: their rows
  come from rank 0 holding its own chunks' part, this rank adds the `rest` chunks' in order and sends them back;
- ("summary",): this rank's wall time, peak memory and bytes read, for the report;
- ("done",): the run is over (or rank 0 stopped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ream_lite import distributed
from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.streamer import LayerStreamer
from ream_lite.lsap import shared_pool
from ream_lite.methods import METHODS
from ream_lite.methods.apply import build_merged_experts, needs_activation_pass, solve_items
from ream_lite.methods.stats import AlignmentCollector
from ream_lite.passes import (
    RoutingCounter, compressed_loader, gram_park, merge_slice, moe_row_width, stats_collector,
)
from ream_lite.refit import RoutedTarget

log = logging.getLogger(__name__)


def serve(world: distributed.World, cfg) -> None:
    """Answer rank 0 until it says the run is done (`cfg`: the same CompressConfig rank 0 runs)."""
    layout = ModelLayout(cfg.model, trust_remote_code=cfg.stream.trust_remote_code)
    if cfg.stream.work_dir is None:  # (where rank 0 spills too: beside OUTPUT, not the system temp dir)
        cfg.stream.work_dir = str(Path(cfg.output).resolve().parent)
    held = None  # (layer, its MoE inputs): a layer's statistics and alignment passes run over the same tokens
    acts = None  # (layer, this rank's AlignmentCollector): the Grams its merges of that layer need
    perms: tuple[int, dict] = (-1, {})  # (layer, its solved alignments): the guard's candidates share pairs
    try:
        streamer = None
        method = METHODS[cfg.method]
        while True:
            msg = world.broadcast(None)
            kind = msg[0]
            if kind == "done":
                return
            if kind == "plan":
                streamer = LayerStreamer(layout, cfg.stream)
                streamer.plan, streamer.output_format = msg[1], msg[2]
            elif kind == "summary":
                world.gather(world.summary(layout.reader.bytes_read))
            elif kind in ("stats", "align"):
                layer, store = msg[1], msg[-1]
                if store is not None:  # (the layer's MoE inputs follow the message)
                    if held is not None:
                        held[1].close()
                    held = (layer, distributed.receive_store(world, streamer, *store))
                if held is None or held[0] != layer:
                    raise RuntimeError(f"rank {world.rank}: no MoE inputs of layer {layer}")
                if kind == "stats":
                    result = _guarded(layer, _stats, world, streamer, method, cfg, held[1], *msg[1:-1])
                else:
                    result = _guarded(layer, _alignment, world, streamer, held[1], *msg[1:-1])
                if kind == "align":  # (kept for the merges of the same layer)
                    acts = (layer, result.pop("_acts", None))
                world.gather(result)
            elif kind == "sums":
                if held is None or held[0] != msg[1]:
                    raise RuntimeError(f"rank {world.rank}: no MoE inputs of layer {msg[1]}")
                world.gather(_sums(world, streamer, held[1], *msg[1:]))
            elif kind in ("attention", "sequential"):
                world.gather(_rows_job(world, streamer, msg))
            elif kind == "solve":
                _solve(world, streamer, *msg[1:])
            elif kind == "merge":
                layer = msg[1]
                held_acts = acts[1] if acts is not None and acts[0] == layer else None
                if perms[0] != layer:
                    perms = (layer, {})
                perms[1].update(msg[4])  # (the alignments of this rank's groups solved already)
                world.gather(_guarded(layer, _merge, world, streamer, held_acts, perms[1], *msg[1:4]))
            else:
                raise RuntimeError(f"rank {world.rank}: unknown message {kind!r} from rank 0")
    finally:
        if held is not None:
            held[1].close()
        layout.close()


def _guarded(layer: int, job, *args) -> dict:
    """job(*args)'s result (a dict; None: {}), or the error that stopped it (sent to rank 0, which stops the run
    with it: a rank's traceback alone says little)."""
    try:
        return job(*args) or {}
    except Exception as e:
        log.exception("rank %d: layer %d, %s", distributed.current().rank, layer, job.__name__)
        return {"error": f"layer {layer} ({job.__name__.strip('_')}): {type(e).__name__}: {e}"}


def _stats(world, streamer: LayerStreamer, method, cfg, h, layer: int, shares: list[list[list[int]]]) -> dict:
    """This rank's share of layer `layer`'s statistics pass: its experts' rows."""
    mine = shares[world.rank]
    if not mine:
        return {}
    block = streamer.moe_block(layer)
    collector = stats_collector(block, h.hidden, method, cfg.options)
    before = streamer.layout.reader.bytes_read
    streamer.run_moe(block, h, None, observer=collector, chunks=mine)
    world.stats_bytes_read += streamer.layout.reader.bytes_read - before
    return distributed.stats_rows(collector.result(), [e for chunk in mine for e in chunk])


def _alignment(world, streamer: LayerStreamer, h, layer: int, pairs, shares) -> dict:
    """This rank's share of layer `layer`'s alignment pass: its chunks' pair Grams and neuron norms."""
    mine = shares[world.rank]
    if not mine:
        return {}
    block = streamer.moe_block(layer)
    acts = AlignmentCollector([tuple(p) for p in pairs], block.act, park=gram_park(streamer))
    streamer.run_moe(block, h, None, observer=acts, chunks=mine)
    acts.finish()
    return {**distributed.alignment_part(acts), "_acts": acts}


def _merge(world, streamer: LayerStreamer, acts, perm_cache: dict, layer: int, plan, shares: list[list[int]]
           ) -> dict:
    """This rank's share of merging layer `layer`'s `plan`: the merged experts of its centroids' groups (aligned by
    the Grams its alignment pass computed, `acts`, or by the alignments solved already for the layer,
    `perm_cache`) and their neuron alignments."""
    mine = shares[world.rank]
    if not mine:
        return {}
    if acts is None and needs_activation_pass(plan):
        raise RuntimeError(f"rank {world.rank}: no alignment statistics of layer {layer}")

    def load(ids: list[int]):
        return streamer.experts(layer, ids, torch.float32)

    merged = build_merged_experts(streamer.layout, plan, acts, streamer.device, perm_cache, load,
                                  streamer.output_format, streamer.dtype, only=set(mine),
                                  group_slice=merge_slice(streamer))
    world.merged_groups += len(mine)
    pairs = {(c, m) for c in mine for m in plan.groups[c][1:]}
    return {"merged": merged, "perms": {p: v for p, v in plan.perms.items() if p in pairs}}


def _rows_job(world, streamer: LayerStreamer, msg: tuple) -> dict:
    """This rank's share of a pass split by token batches (`passes.attention_pass`, `passes.sequential_pass`): its
    sequences' rows come from rank 0, the results go back to it, and an error is sent after the rows (rank 0 waits
    for them in any case)."""
    kind, layer, ranges, lengths, has_ids, width = msg[:6]
    a, b = ranges[world.rank]
    if a == b:
        return {}
    tpb = streamer.opts.tokens_per_batch
    h = streamer.new_store(lengths[a:b])  # (whole residual rows)
    out = streamer.new_store(lengths[a:b], width=width)
    try:
        if kind == "attention":
            received, back = [h], [h, out]
        else:
            received, back = [h.columns(0, moe_row_width(streamer)), out], [out]
        distributed.recv_rows(received, tpb, ids=has_ids)
        h.token_ids = received[0].token_ids
        if kind == "attention":
            result = _guarded(layer, _attention, streamer, layer, h, out)
        else:
            result = _guarded(layer, _sequential, streamer, h, out, layer, *msg[6:], sum(lengths[:a]))
        distributed.send_back(back, tpb)
        world.ran(kind, h.total_tokens)
        return result
    finally:
        h.close()
        out.close()


def _attention(streamer: LayerStreamer, layer: int, h, out) -> None:
    """The layer but its routed experts over this rank's rows (the MoE block's inputs written into `h`)."""
    streamer.attention_phase(layer, h, out)


def _sequential(streamer: LayerStreamer, h, out, layer: int, plan, merged: dict, stats_tokens: int,
                offset: int) -> dict:
    """The compressed block over this rank's rows (the first of which is row `offset` of the layer's), with the
    routing counts of the statistics tokens among them."""
    counter = RoutingCounter(len(plan.kept), stats_tokens - offset)
    block = streamer.moe_block(layer).restricted(plan.kept)
    streamer.run_moe(block, streamer.moe_input(h), out, observer=counter,
                     experts=compressed_loader(streamer, plan, merged))
    return {"counts": counter.counts}


def _sums(world, streamer: LayerStreamer, h, layer: int, ranges, stores: list, has_out: bool, rest) -> dict:
    """This rank's share of `passes.continue_sums` over the layer's MoE inputs `h` (held since the statistics pass):
    the sums of its batches' rows, continued with the `rest` chunks."""
    a, b = ranges[world.rank]
    if a == b:
        return {}
    tpb = streamer.opts.tokens_per_batch
    mine = h.view(a, b)
    sums = [streamer.new_store(mine.lengths, dtype, width=width) for width, dtype in stores]
    try:
        distributed.recv_rows(sums, tpb)
        block = streamer.moe_block(layer)
        out = sums[0] if has_out else None
        target = RoutedTarget(sums[-1], block.act, block.router_cfg.scales_input) if len(sums) > has_out else None
        result = _guarded(layer, _continue, world, streamer, block, mine, out, target, rest)
        distributed.send_back(sums, tpb)
        world.ran("sums", mine.total_tokens)
        return result
    finally:
        for st in sums:
            st.close()


def _continue(world, streamer: LayerStreamer, block, h, out, target, rest) -> None:
    """The sums of rows `h` continued with the `rest` chunks (into `out` and `target`'s store)."""
    before = streamer.layout.reader.bytes_read
    streamer.run_moe(block, h, out, observer=target, chunks=rest, first_call=False)
    world.sums_bytes_read += streamer.layout.reader.bytes_read - before


def _solve(world, streamer: LayerStreamer, layer: int, rounds: list, spec) -> None:
    """This rank's share of each round of `distributed.solve_alignments`: its items' costs built as one process
    builds them (the weight part from the experts it reads) and solved."""
    def load(ids: list[int]):
        return streamer.experts(layer, ids, torch.float32)

    for shares in rounds:
        mine = shares[world.rank]
        act = distributed.receive_act_costs(mine, spec)  # (every send received, whatever happens next)
        world.gather(_guarded(layer, _solve_share, world, mine, act, load) if mine else {})


def _solve_share(world, mine: list, act: dict, load) -> dict:
    """The permutations of this rank's items of a round (`alignment_costs`, the activation parts in `act`)."""
    perms: dict = {}
    solve_items(mine, lambda c, m: act[(c, m)], perms, load, shared_pool())
    world.alignments_solved += len(perms)
    return {"perms": perms}

