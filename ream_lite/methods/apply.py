"""Turning a LayerPlan into expert weights: align each merged group's members onto the centroid and merge."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.engine.experts import ExpertWeights, load_experts
from ream_lite.lsap import AssignmentPool, shared_pool
from ream_lite.methods.align import WeightCost, activation_cost, add_scaled, permute_expert, weight_features
from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.stats import AlignmentCollector
from ream_lite.written import merged_as_written


def alignment_pairs(plan: LayerPlan) -> list[tuple[int, int]]:
    return [(c, m) for c, members in plan.merged_groups().items() for m in members[1:]]


def needs_activation_pass(plan: LayerPlan) -> bool:
    return "act" in plan.align and bool(plan.merged_groups())


def pair_cost(align: str, act_cost: torch.Tensor | None, centroid: WeightCost | None, member) -> torch.Tensor:
    """The float64 [I, I] cost of matching the member's neurons to the centroid's: C_act + C_wt as `align` says
    (`centroid`: the `WeightCost` of the centroid's `weight_features`, when "weight" is in `align`)."""
    inter = member[0].shape[0] if member is not None else act_cost.shape[0]
    cost = torch.zeros(inter, inter, dtype=torch.float64)
    if "act" in align:
        cost += act_cost.double().cpu()
    if "weight" in align:
        cost += centroid.of_expert(*member[:3]).cpu()  # (weights only, no biases)
    return cost


def alignment_items(plans: list[LayerPlan], perm_cache: dict[tuple[int, int], torch.Tensor]
                    ) -> list[tuple[str, int, int]]:
    """(align, centroid, member) of every alignment `plans` need and `perm_cache` lacks, in the order the merges
    meet them, each once (the plans' recorded alignments go into `perm_cache` first)."""
    items: list[tuple[str, int, int]] = []
    seen: set[tuple[int, int]] = set()
    for plan in plans:
        for pair, perm in plan.perms.items():
            perm_cache.setdefault(pair, perm)
        if plan.align == "none":
            continue
        for c, members in plan.merged_groups().items():
            for m in members[1:]:
                if (c, m) not in perm_cache and (c, m) not in seen:
                    seen.add((c, m))
                    items.append((plan.align, c, m))
    return items


def alignment_costs(items: list[tuple[str, int, int]], act_cost: Callable[[int, int], torch.Tensor | None],
                    load: Callable[[list[int]], ExpertWeights]):
    """((centroid, member), float64 cost as numpy) of each item, the cost `merge_group` would build: `act_cost(c,
    m)` the activation part (where the alignment uses it), the weight part from the experts `load` gives (a run of
    items of one centroid loads it and its members at once)."""
    for (align, c), run in itertools.groupby(items, key=lambda item: item[:2]):
        members = [m for _, _, m in run]
        w = load([c, *members]) if "weight" in align else None
        fc = WeightCost(weight_features(w.gate[0], w.up[0], w.down[0])) if w is not None else None
        for k, m in enumerate(members, 1):
            ca = act_cost(c, m) if "act" in align else None
            member = (w.gate[k], w.up[k], w.down[k]) if w is not None else None
            yield (c, m), pair_cost(align, ca, fc, member).numpy()
        del w


def solve_alignments(
    plans: list[LayerPlan], acts: AlignmentCollector | None, perm_cache: dict[tuple[int, int], torch.Tensor],
    load: Callable[[list[int]], ExpertWeights], pool: AssignmentPool,
) -> None:
    """Solve every (centroid, member) alignment of `plans` that `perm_cache` lacks, in batches on the assignment
    pool (all cores), into `perm_cache`; `build_merged_experts` then finds them there. Each pair gets the cost
    matrix and the solver `merge_group` would use, so the permutations are the same. Loads each group's experts
    once more than merging alone does: call it only where loads read nothing (the layer's expert cache)."""
    solve_items(alignment_items(plans, perm_cache), lambda c, m: act_cost_of(acts, c, m), perm_cache, load, pool)


def act_cost_of(acts: AlignmentCollector, c: int, m: int) -> torch.Tensor:
    """The activation part of aligning member m to centroid c, from the alignment pass's Grams."""
    return activation_cost(acts.gram(c, m), acts.sq[c], acts.sq[m])


def solve_items(items: list[tuple[str, int, int]], act_cost, perm_cache: dict, load, pool: AssignmentPool) -> None:
    """`alignment_costs` of `items` solved on `pool`, into `perm_cache`: each cost is handed to the pool as soon as
    it is built, so the workers solve while the next costs are built (`AssignmentPool.in_order`)."""
    jobs = ((pair, pool.submit(cost)) for pair, cost in alignment_costs(items, act_cost, load))
    for pair, perm in pool.in_order(jobs):
        perm_cache[pair] = torch.from_numpy(perm)


class GroupMerge:
    """One group's merge, member by member: sum_j coef_j * P_j(W_j) in float32, the centroid first (P = identity),
    each member permuted onto the centroid by the Hungarian algorithm on C_act + C_wt (as `align` says). Adding the
    members one at a time holds the centroid, the sum and one member, whatever the group's size (the guard's
    largest candidates hold hundreds at Kimi-K2's shape), with the numbers of adding them all at once."""

    def __init__(self, centroid: tuple[torch.Tensor, ...], coef: float, align: str, pool: AssignmentPool | None = None):
        self.centroid, self.align = centroid, align
        self.pool = pool or AssignmentPool(1)
        self.out = [torch.zeros_like(t, dtype=torch.float32) for t in centroid]
        self.perms: list[torch.Tensor] = []
        self._wc: WeightCost | None = None  # the centroid's weight features, once a member needs them
        add_scaled(self.out, centroid, coef)

    def alignment(self, member: tuple[torch.Tensor, ...], act_cost: torch.Tensor | None,
                  known: torch.Tensor | None = None) -> Future:
        """The member's permutation onto the centroid: `known` (computed already for the same pair), the identity,
        or the assignment on its cost, handed to the pool (solved while the caller builds the next member's)."""
        if known is not None or self.align == "none":
            done: Future = Future()
            done.set_result(known if known is not None else torch.arange(member[0].shape[0]))
            return done
        if "weight" in self.align and self._wc is None:
            self._wc = WeightCost(weight_features(*self.centroid[:3]))
        return self.pool.submit(pair_cost(self.align, act_cost, self._wc, member).numpy())

    def add(self, member: tuple[torch.Tensor, ...], coef: float, perm) -> None:
        """Member `member` (its parts) with weight `coef`, permuted by `perm` (what `alignment` gave: a tensor, or
        the solver's array)."""
        perm = torch.from_numpy(perm) if not isinstance(perm, torch.Tensor) else perm
        self.perms.append(perm)
        add_scaled(self.out, permute_expert(member, perm), coef)


def merge_group(
    weights: list[tuple[torch.Tensor, ...]],
    coefs: list[float],
    align: str,
    act_cost: list[torch.Tensor | None],
    known_perms: list[torch.Tensor | None] | None = None,
) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Merge experts (centroid first) as `GroupMerge` does, all given at once. Returns merged weights and perms.
    `known_perms[j]`, when given, is member j's permutation already computed for the same (centroid, member)."""
    group = GroupMerge(weights[0], coefs[0], align)
    known = known_perms or [None] * len(weights)
    for w, coef, ca, kp in zip(weights[1:], coefs[1:], act_cost[1:], known[1:]):
        group.add(w, coef, group.alignment(w, ca, kp).result())
    return tuple(group.out), group.perms


def build_merged_experts(
    layout: ModelLayout, plan: LayerPlan, acts: AlignmentCollector | None, device: torch.device | str,
    perm_cache: dict[tuple[int, int], torch.Tensor] | None = None,
    load: Callable[[list[int]], ExpertWeights] | None = None, output: OutputFormat | None = None,
    value_dtype: torch.dtype = torch.bfloat16, only: set[int] | None = None, group_slice: int | None = None,
    pool: AssignmentPool | None = None,
    hold: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
) -> dict[int, tuple[torch.Tensor, ...]]:
    """centroid id -> merged (gate, up, down) in host memory as the output holds them (`merged_as_written`: the
    stored dtype, or `value_dtype` for an encoded or decoded `output`), for every non-singleton group (the
    alignment and the merge itself run on `device`, in float32). `perm_cache` ((centroid, member) -> permutation)
    is read and filled: the alignment of a pair depends only on the pair, so plans sharing pairs solve each once.
    `load(ids)` gives the layer's experts `ids` in float32 on `device` (default: read from the checkpoint; `compress`
    serves them from its layer cache, with the same values, so `apply` merges to the same bytes). `only`: merge just
    the groups of these centroids (a rank's share under torchrun). `group_slice`: load a group's members this many
    at a time (default all at once: the numbers are the same either way, `GroupMerge`). `pool`: where the assignments
    are solved (default `lsap.shared_pool`). `hold(parts)`: where each merged expert is kept (default: the host
    tensors as they are)."""

    def read(ids: list[int]) -> ExpertWeights:
        return load_experts(layout, plan.layer, ids, torch.float32, device)

    load = load or read
    pool = pool or shared_pool()
    cache = perm_cache if perm_cache is not None else {}
    for pair, perm in plan.perms.items():  # a plan read back from ream_plan.json brings its own alignments
        cache.setdefault(pair, perm)
    out = {}
    for c, members in plan.merged_groups().items():
        if only is not None and c not in only:
            continue
        coefs, rest = plan.weights[c], members[1:]
        first = load([c])
        group = GroupMerge(first.expert(0), coefs[0], plan.align, pool)  # (biases too, where the experts have them)
        step = group_slice or max(1, len(rest))
        for a in range(0, len(rest), step):  # the members a slice at a time
            ids = rest[a : a + step]
            w = load(ids)
            # each member's assignment handed to the pool as its cost is built, the members added in order as
            # they are solved: the workers solve while the next costs are built (`AssignmentPool.in_order`)
            jobs = ((j, group.alignment(w.expert(j), act_cost_of(acts, c, m) if "act" in plan.align and (c, m) not
                                        in cache else None, cache.get((c, m)))) for j, m in enumerate(ids))
            for j, perm in pool.in_order(jobs):
                group.add(w.expert(j), coefs[1 + a + j], perm)
            del w, jobs
        merged, perms = tuple(group.out), group.perms
        del first, group
        solved = {(c, m): p for m, p in zip(members[1:], perms)}
        cache.update(solved)
        plan.perms.update(solved)
        # on the host (N' merged experts may not fit next to a chunk), rounded once as written: what is written, and
        # what the sequential pass and the guard then run, are the same numbers
        out[c] = merged_as_written(layout, plan.layer, c, plan.kept.index(c), merged, output, value_dtype)
        if hold is not None:  # (e.g. moved to a work-dir file: `passes.merged_hold`)
            out[c] = hold(out[c])
    return out
