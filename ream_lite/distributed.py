"""`compress` on several processes: `torchrun --nproc-per-node N -m ream_lite compress ...`.

One process per device (rank). Rank 0 runs the compression as a one-process run does (calibration, plans, the
guard's judging, the refit, the output and its resume record); the other ranks serve it, taking over the passes
that run many experts or many tokens, split two ways:

- **by expert chunks**: each MoE layer's statistics pass, REAM's alignment pass (one chunk per centroid with its
  members) and the merges (paper REAM's plan, and every merging candidate of the guard: each rank aligns and
  merges the groups of the centroids it aligned, holding their Grams). The pass's expert chunks (for the
  statistics pass the one-process run's chunks, which `--experts-per-chunk` pins) are split into contiguous
  ranges, one per rank; rank 0 broadcasts the layer's MoE inputs once (and their token ids), every rank reads
  **only its own chunks** from the checkpoint and runs every calibration batch through them, and rank 0 gathers
  each expert's statistics (each pair's Gram, each expert's neuron norms, each merged expert) from the rank that
  computed them.
- **by pair**: the layer's neuron alignments (Hungarian assignments with their float64 costs), before the merges:
  a candidate group may hold dozens of members, so a split by centroid alone leaves one rank most of the work.
- **by token batches**: each layer's attention (and a dense layer's MLP), the sequential re-run of the compressed
  MoE block, and the sums over every expert (a non-sequential run's original MoE output, the refit's target).
  Rank 0 sends each rank the rows of its contiguous share of the batches, runs its own share, and takes theirs
  back. Sums must be added in the one-process chunk order to stay exact, so they are not split by chunks: rank 0
  adds its own chunks' part during the statistics pass, then each rank continues its batches' rows with the
  other chunks, reading those again.

Each number is computed on one rank, by the same operations in the same order as in one process, so plans and
outputs do not depend on the world size (tested byte for byte on CPU with 1, 2 and 3 ranks, one thread per
process as torchrun starts them).

Decisions and data travel over a gloo group (CPU tensors; no rank ever waits inside an NCCL collective for
another's disk), with an explicit timeout (REAM_LITE_DIST_TIMEOUT_MIN, default a week: see `_timeout`). If any
rank dies, torchrun stops the others; `--resume` under torchrun continues from rank 0's last snapshot, with any
world size.
"""

from __future__ import annotations

import datetime
import os
import resource
import time
from dataclasses import dataclass, field

import torch

from ream_lite.errors import ReamLiteError


def _timeout() -> datetime.timedelta:
    """How long a collective waits. The other ranks wait in one through all that rank 0 does alone (calibration,
    merges, the guard, the refit, writing: hours on a large model), so the default is a week: a rank that dies is
    caught by torchrun, which stops the others; the timeout only bounds a rank that hangs alive."""
    return datetime.timedelta(minutes=float(os.environ.get("REAM_LITE_DIST_TIMEOUT_MIN", str(7 * 24 * 60))))


@dataclass
class World:
    """This process's place among the ranks of one run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.monotonic)
    stats_bytes_read: int = 0  # checkpoint bytes this rank read in its shares of the statistics passes
    sums_bytes_read: int = 0  # rank 0: the other ranks' experts read again for sums over every expert
    merged_groups: int = 0  # merged groups this rank built
    alignments_solved: int = 0  # neuron alignments (Hungarian assignments) this rank solved in shared rounds
    tokens: dict = field(default_factory=dict)  # pass -> tokens this rank ran in the passes split by token batches
    sent_layer: int | None = None  # rank 0: the layer whose MoE inputs the other ranks hold
    align_split: tuple | None = None  # rank 0: (layer, each rank's centroids) of the last alignment pass split

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK and its rendezvous), joined over gloo; a
        world of one otherwise."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=_timeout())
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str) -> str:
        """The device of this rank: `cuda` becomes this rank's own card (cuda:LOCAL_RANK); anything else as given."""
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.size > 1 else requested

    def share(self, n: int, rank: int | None = None) -> range:
        """Rank `rank`'s contiguous share of n items (the first n % size ranks take one more; a rank may get none)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def shares(self, items: list) -> list[list]:
        """Every rank's contiguous share of `items`, in rank order (`share`)."""
        return [[items[i] for i in self.share(len(items), r)] for r in range(self.size)]

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank. Tensors in it (in dicts, lists and tuples) travel as raw bytes after the
        rest (`pack`): a layer's merged experts are gigabytes, which pickling would copy twice on each side."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        tensors: list[torch.Tensor] = []
        box = [pack(obj, tensors) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        skeleton, metas = box[0]
        if not self.is_main:
            tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]
        for t in tensors:
            if t.numel():
                dist.broadcast(as_bytes(t), src=0)
        return unpack(skeleton, tensors)

    def broadcast_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor into `t` (same shape and dtype on every rank)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(t, src=0)
        return t

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); tensors in it travel as raw bytes, as in
        `broadcast`."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        tensors: list[torch.Tensor] = []
        packed = pack(obj, tensors)
        out = [None] * self.size if self.is_main else None
        dist.gather_object(packed, out, dst=0)
        if not self.is_main:
            for t in tensors:
                if t.numel():
                    dist.send(as_bytes(t), dst=0)
            return None
        result = [obj]
        for r in range(1, self.size):
            skeleton, metas = out[r]
            received = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]
            for t in received:
                if t.numel():
                    dist.recv(as_bytes(t), src=r)
            result.append(unpack(skeleton, received))
        return result

    def ran(self, what: str, tokens: int) -> None:
        """Count `tokens` this rank ran in its share of pass `what` (split by token batches), for the report."""
        self.tokens[what] = self.tokens.get(what, 0) + tokens

    def summary(self, bytes_read: int) -> dict:
        """What the report records of this rank: wall time so far, peak resident memory, checkpoint bytes read."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)
        out = {"rank": self.rank, "wall_s": round(time.monotonic() - self.started, 3), "peak_rss_bytes": peak,
               "bytes_read": int(bytes_read), "stats_pass_bytes_read": self.stats_bytes_read,
               "sums_bytes_read": self.sums_bytes_read, "merged_groups": self.merged_groups,
               "alignments_solved": self.alignments_solved,
               "tokens": dict(self.tokens)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
        return out

    def close(self) -> None:
        """Leave the group, once every rank is there (one tearing its connections down while another still reads
        from them aborts that one)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if self.is_main:  # (the other ranks exit without tearing the group down: ream_lite.cli)
                    dist.destroy_process_group()


class _Slot(int):
    """Where a tensor was in an object `pack` took it out of: its index in the tensor list."""


def pack(obj, tensors: list[torch.Tensor]):
    """(obj with every tensor inside dicts, lists and tuples replaced by its index in `tensors`, which receives the
    tensors on the host, contiguous; each tensor's (shape, dtype))."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach().to("cpu").contiguous())
            return _Slot(len(tensors) - 1)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if type(x) in (list, tuple):  # (not their subclasses: named tuples travel pickled, whole)
            return type(x)(walk(v) for v in x)
        return x

    skeleton = walk(obj)
    return skeleton, [(tuple(t.shape), t.dtype) for t in tensors]


def unpack(skeleton, tensors: list[torch.Tensor]):
    """`pack`'s inverse."""
    if isinstance(skeleton, _Slot):
        return tensors[int(skeleton)]
    if isinstance(skeleton, dict):
        return {k: unpack(v, tensors) for k, v in skeleton.items()}
    if type(skeleton) in (list, tuple):
        return type(skeleton)(unpack(v, tensors) for v in skeleton)
    return skeleton


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous host tensor, as a uint8 view (any dtype travels, bfloat16 and FP8 included)."""
    return t.reshape(-1).view(torch.uint8)


_CURRENT = World()


def current() -> World:
    """The world this process runs in (set by `ream-lite compress` under torchrun)."""
    return _CURRENT


def set_current(world: World) -> None:
    global _CURRENT
    _CURRENT = world


# -- the statistics pass, split by expert chunks ---------------------------------------------------------------------
STAT_ROWS = ("reap_sum", "reap2_sum", "ean_sum", "gated_out_sum", "out_sum")  # per expert (LayerStats fields)


def start_job(world: World, message: tuple, h, tokens_per_batch: int) -> None:
    """Rank 0: a pass's job `message` ("stats" | "align", layer, ...) to every rank, then the layer's MoE inputs `h`
    unless they hold them already (a layer's statistics and alignment passes run over the same statistics tokens).
    The message ends with what follows it: (lengths, hidden, whether token ids follow) of the store, or None."""
    layer = message[1]
    if world.sent_layer == layer:
        world.broadcast((*message, None))
        return
    world.broadcast((*message, (list(h.lengths), h.hidden, h.token_ids is not None)))
    send_store(world, h, tokens_per_batch)
    world.sent_layer = layer


def batch_rows(st, b) -> torch.Tensor:
    """Batch `b`'s rows of store `st` as one contiguous [rows, width] host tensor: what travels between ranks."""
    return st.read(b, "cpu").reshape(b.end - b.start, st.hidden).contiguous()


def empty_rows(st, b) -> torch.Tensor:
    """A host buffer for batch `b`'s rows of store `st`, to receive them into."""
    return torch.empty((b.end - b.start, st.hidden), dtype=st.dtype)


def send_store(world: World, h, tokens_per_batch: int) -> None:
    """Rank 0: the rows of store `h` (and their token ids) to every rank, batch by batch (CPU tensors)."""
    for b in h.batches(tokens_per_batch):
        world.broadcast_tensor(batch_rows(h, b))
    if h.token_ids is not None:
        world.broadcast_tensor(h.token_ids.clone())


def receive_store(world: World, streamer, lengths: list[int], hidden: int, has_ids: bool):
    """The other ranks: a store like rank 0's `send_store` sent, in this rank's planned tier."""
    h = streamer.new_store(lengths, width=hidden)
    for b in h.batches(streamer.opts.tokens_per_batch):
        h.write(b, world.broadcast_tensor(empty_rows(h, b)))
    if has_ids:
        h.token_ids = world.broadcast_tensor(torch.empty(h.total_tokens, dtype=torch.long))
    return h


def stats_rows(stats, experts: list[int]) -> dict[str, torch.Tensor | None]:
    """The rows of `experts` (a rank's own) of each per-expert statistic: what the rank sends rank 0."""
    idx = torch.tensor(experts, dtype=torch.long)
    return {k: None if getattr(stats, k) is None else getattr(stats, k)[idx].clone() for k in STAT_ROWS}


def served(parts: list[dict | None], shares: list[list], what: str):
    """(rank, its part) of every rank > 0 that had a share of a job (`shares[r]`), rank 0 stopping the run with the
    first error a rank sent (or the part it failed to send)."""
    for r, part in enumerate(parts):
        if r == 0 or not shares[r]:
            continue
        if part is None or "error" in part:
            raise ReamLiteError(f"rank {r}: {part.get('error') if part else 'no ' + what}")
        yield r, part


def merge_rows(stats, parts: list[dict | None], owners: list[list[int]]) -> None:
    """Into rank 0's `stats`: each expert's rows from the rank that computed them (`owners[r]`: rank r's experts)."""
    for r, part in served(parts, owners, "statistics"):
        idx = torch.tensor(owners[r])
        with torch.inference_mode():  # (the collector's tensors are inference tensors)
            for k in STAT_ROWS:
                dst = getattr(stats, k)
                if dst is not None:
                    dst[idx] = part[k].to(dst.dtype)


# -- the neuron alignments of a layer's merges, split by pair -------------------------------------------------------
SOLVE_ROUND = 4  # alignments per rank per round: bounds the cost matrices in flight


def solve_alignments(world: World, layer: int, items: list[tuple[str, int, int]], act_cost, perm_cache: dict, load,
                     pool) -> None:
    """Rank 0: solve the alignments `items` ((align, centroid, member), `methods.apply.alignment_items`) over the
    ranks, into `perm_cache`. Balanced by pair, not by group: the guard's largest candidate groups hold dozens of
    members. In rounds of SOLVE_ROUND items per rank: rank 0 sends each rank the activation part of its items'
    costs (the ranks hold only their own chunks' Grams), every rank builds each cost as one process does
    (`alignment_costs`: the weight part from the experts it reads) and solves it, and rank 0 gathers the
    permutations. A permutation depends only on its cost matrix, so where it is solved changes no bit."""
    import torch.distributed as dist

    from ream_lite.methods.apply import solve_items

    step = SOLVE_ROUND * world.size
    rounds = [world.shares(items[a : a + step]) for a in range(0, len(items), step)]
    first = next(((c, m) for align, c, m in items if "act" in align), None)
    spec = None
    if first is not None:  # (the shape and dtype of every activation cost: the ranks receive into them)
        t = act_cost(*first)
        spec = (tuple(t.shape), t.dtype)
    world.broadcast(("solve", layer, rounds, spec))
    for shares in rounds:
        sends = []
        for r in range(1, world.size):
            for align, c, m in shares[r]:
                if "act" in align:
                    t = act_cost(c, m).cpu().contiguous()
                    sends.append((t, dist.isend(t, dst=r)))
        solve_items(shares[0], act_cost, perm_cache, load, pool)
        world.alignments_solved += len(shares[0])
        for _, work in sends:
            work.wait()
        for _, part in served(world.gather(None), shares, "alignments"):
            perm_cache.update(part["perms"])


def receive_act_costs(share: list[tuple[str, int, int]], spec) -> dict[tuple[int, int], torch.Tensor]:
    """A rank > 0: the activation parts of its round's costs, as `solve_alignments` sends them."""
    import torch.distributed as dist

    out = {}
    for align, c, m in share:
        if "act" in align:
            out[(c, m)] = torch.empty(spec[0], dtype=spec[1])
            dist.recv(out[(c, m)], src=0)
    return out


# -- what `ream-lite plan --nproc N` says of each rank ---------------------------------------------------------------
def rank_plan(est, layout, nproc: int) -> list[dict]:
    """Per rank of an N-process run planned by `est` (estimate.CompressionEstimate): checkpoint bytes read in the
    statistics passes (its share of each MoE layer's expert chunks; rank 0 reads a layer's experts once for all its
    passes where the expert cache holds them) and again for the sums over every expert (the chunks rank 0 did not
    run, for its share of the token batches), and the peak device bytes of a rank > 0 (the layer's MoE inputs of
    the statistics tokens and activations, beside one expert chunk and the statistics accumulators, or the
    largest alignment chunk and the layer's Grams, or its share of the rows in the passes split by token batches).
    Rank 0's other figures are the plan's."""
    world = World(0, nproc)
    m = est.memory
    elt = torch.empty(0, dtype=getattr(torch, m.dtype)).element_size()
    hidden = int(layout.config["hidden_size"])
    stats_tokens = est.tokens - est.holdout_sequences * est.seq_len
    inputs = stats_tokens * hidden * elt
    dense = 2 * m.max_experts * hidden * 8 if est.method in ("ream", "hc-smoe") else 0
    reads = [0] * nproc
    sums = 0  # the other ranks' experts read again for sums over every expert (refit target, --no-sequential)
    for x in est.layers:
        if x.kind not in ("moe", "mtp") or not x.experts_per_chunk:
            continue
        per_expert = x.expert_bytes // max(x.experts, 1)
        sizes = [min(x.experts_per_chunk, x.experts - a) for a in range(0, x.experts, x.experts_per_chunk)]
        per_rank = [sum(s) for s in world.shares(sizes)]  # (experts of each rank's chunks)
        for r in range(nproc):
            reads[r] += per_expert * per_rank[r]
        if len(sizes) > 1 and (est.merge.refits or not est.sequential):
            sums += per_expert * sum(per_rank[1:])
    sums_0 = sums
    if m.cache_experts:  # (rank 0 reads each layer's experts once, into its cache, whatever its share)
        reads[0], sums_0 = sum(x.expert_bytes for x in est.layers if x.kind in ("moe", "mtp")), 0
    stats_phase = m.experts_per_chunk * m.expert_bytes + dense
    align_phase = est.merge.largest_alignment_chunk * m.expert_bytes + est.gram_device_bytes if est.gram_bytes else 0
    # split by token batches: a share of the rows (whole residual rows in and out, or the float32 target too)
    width = hidden * int(layout.residual_streams)
    rows = -(-est.tokens // nproc) * width * (2 * elt + 4) + m.experts_per_chunk * m.expert_bytes
    peak = m.activation_bytes + max(inputs + max(stats_phase, align_phase), inputs + rows)
    return [{"rank": r, "stats_pass_bytes_read": reads[r], "sums_bytes_read": sums_0 if r == 0 else sums,
             "peak_device_bytes": None if r == 0 else peak} for r in range(nproc)]


def rank_lines(ranks: list[dict]) -> list[str]:
    from ream_lite.estimate import _size as g
    lines = [f"ranks      {len(ranks)} processes (torchrun): the statistics and alignment passes' expert chunks "
             "and the merges split over them, attention, the sequential pass and sums over every expert by token "
             "batches; the guard's judging and the refit on rank 0 (the figures above)"]
    for r in ranks:
        peak = "as above" if r["peak_device_bytes"] is None else f"peak device {g(r['peak_device_bytes'])}"
        again = f" (and {g(r['sums_bytes_read'])} of the others' again, for sums over every expert)" \
            if r["sums_bytes_read"] else ""
        lines.append(f"  rank {r['rank']:<3} reads {g(r['stats_pass_bytes_read'])} in the statistics passes{again}; "
                     f"{peak}")
    return lines


def alignment_part(acts) -> dict:
    """A rank's share of an alignment pass, on the CPU: its pairs' cross Grams and its experts' neuron norms."""
    return {"cross": {k: v.cpu() for k, v in acts.cross.items()}, "sq": {k: v.cpu() for k, v in acts.sq.items()}}


def merge_alignment(acts, parts: list[dict | None], shares: list[list[list[int]]], device) -> None:
    """Into rank 0's AlignmentCollector `acts`: each pair's Gram from the rank whose chunk holds it, each expert's
    norms from the rank holding the first chunk it is in."""
    first: dict[int, int] = {}  # expert -> the rank of the first chunk it is in
    for r, share in enumerate(shares):
        for chunk in share:
            for e in chunk:
                first.setdefault(e, r)
    for r, part in served(parts, shares, "alignment statistics"):
        for pair, g in part["cross"].items():
            acts.cross[pair] = acts.park(g) if acts.park is not None else g.to(device)
        for e, s in part["sq"].items():
            if first[e] == r:
                acts.sq[e] = s.to(device)


def merge_groups(plan, merged: dict, parts: list[dict | None], shares: list[list[int]]) -> None:
    """Into rank 0's `merged` and `plan.perms`: the merged experts and neuron alignments of the other ranks'
    groups."""
    for _, part in served(parts, shares, "merged experts"):
        merged.update(part["merged"])
        plan.perms.update(part["perms"])


# -- passes split by token batches: attention and the rest of each layer, the sequential pass -----------------------
def batch_ranges(world: World, batches: list) -> list[tuple[int, int]]:
    """Every rank's contiguous share of a store's `batches` (`HiddenStateStore.batches`), as its sequences
    (first, last): a view of those sequences batches exactly as the whole store does there. An empty share is
    (n, n) at the end."""
    end = batches[-1].seqs.stop if batches else 0
    return [(s[0].seqs.start, s[-1].seqs.stop) if s else (end, end) for s in world.shares(batches)]


def send_rows(world: World, stores: list, ranges: list[tuple[int, int]], tokens_per_batch: int,
              ids: bool = True) -> None:
    """Rank 0: the rows of each store in `stores` (sequences ranges[r], batch by batch, CPU tensors) to rank r > 0,
    and (`ids`) their token ids where the first store knows them."""
    import torch.distributed as dist

    for r in range(1, world.size):
        a, b = ranges[r]
        if a == b:
            continue
        send_back([st.view(a, b) for st in stores], tokens_per_batch, dst=r)
        token_ids = stores[0].view(a, b).token_ids if ids else None
        if token_ids is not None:
            dist.send(token_ids.contiguous(), dst=r)


def recv_rows(stores: list, tokens_per_batch: int, src: int = 0, ids: bool = False) -> None:
    """Rows (and, with `ids`, the first store's token ids) that rank `src` sends (`send_rows`, `send_back`) into
    `stores`, batch by batch."""
    import torch.distributed as dist

    for st in stores:
        for batch in st.batches(tokens_per_batch):
            buf = empty_rows(st, batch)
            dist.recv(buf, src=src)
            st.write(batch, buf)
    if ids:
        st = stores[0]
        st.token_ids = torch.empty(st.total_tokens, dtype=torch.long)
        dist.recv(st.token_ids, src=src)


def send_back(stores: list, tokens_per_batch: int, dst: int = 0) -> None:
    """The rows of `stores` to rank `dst`, batch by batch: a rank > 0's results to rank 0 (received by
    `receive_all`), or rank 0's rows to a rank (`send_rows`)."""
    import torch.distributed as dist

    for st in stores:
        for batch in st.batches(tokens_per_batch):
            dist.send(batch_rows(st, batch), dst=dst)


def rows_served(world: World, ranges: list[tuple[int, int]], what: str) -> None:
    """Rank 0, after a pass split by token batches: stop the run with the first error a rank with rows sent."""
    for _ in served(world.gather(None), [b > a for a, b in ranges], what):
        pass


def receive_all(world: World, stores: list, ranges: list[tuple[int, int]], tokens_per_batch: int) -> None:
    """Rank 0: every other rank's rows of `stores` (its sequences ranges[r]) into them."""
    for r in range(1, world.size):
        a, b = ranges[r]
        if a != b:
            recv_rows([st.view(a, b) for st in stores], tokens_per_batch, src=r)
