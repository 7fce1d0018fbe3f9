"""The merge guard: choose, per MoE layer, between pruning and merging plans by their error on held-out tokens.

Paper-faithful REAM can lose to plain pruning: merging a member into its centroid moves the centroid, and when
experts were trained independently the merged expert is worse than the centroid alone. When experts are
near-copies, merging keeps what pruning throws away. Which case a model is in is measured here, per layer, on
calibration sequences that the statistics never saw (the held-out slice, the last sequences of the hidden-state
cache):

    e(plan) = sum ||y(x) - y_hat(x)||^2 / sum ||y(x)||^2   over held-out tokens x,

y the original routed-experts output, y_hat the compressed block's (router restricted to the kept rows, with the
family's own top-k, normalisation, bias and scaling). Shared experts are identical in both and left out.

Candidates: REAP pruning, REAM at a ladder of group sizes (plus the `auto` rule), and REAM with nearest-centroid
grouping. In `group` mode the best merging candidate is then refined greedily: each merged group in turn is undone
(the centroid kept as it was, the members dropped) when that lowers e. An undo changes y_hat only on the tokens
routed to that centroid, so its effect is measured on those tokens alone, against the current y_hat, which is kept
in the store; the refined plan is then judged afresh like every other candidate.

The choice: the lowest score = e + 2 standard errors of (e - e_REAP), the standard error taken from the held-out
sequences' paired differences. Pruning is the default and a merge must beat it by more than the noise of the
held-out slice: on the testbed, merges that lowered e by 2-5% without that margin raised the final KL by ~1%
(docs/quality.md). Ties go to the earlier candidate (REAP first). Every candidate's e, standard error and score
are recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from ream_lite.engine.experts import ExpertWeights, expert_output, routed_contribution
from ream_lite.engine.store import HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, MoEBlock
from ream_lite.methods import METHODS, LayerPlan, MethodInput, MethodOptions
from ream_lite.methods.grouping import auto_group_size
from ream_lite.methods.stats import LayerStats
from ream_lite.passes import alignment_stats, compressed_loader, merge_plan, presolve_alignments
from ream_lite.refit import Refitter

log = logging.getLogger(__name__)
GUARD_MODES = ("group", "layer", "off")
Z_MARGIN = 2.0


@dataclass
class Candidate:
    name: str
    plan: LayerPlan
    error: float = float("nan")
    undone: list[int] = field(default_factory=list)  # greedy pass: centroids whose merge was undone
    per_sequence: torch.Tensor | None = None  # each held-out sequence's share of `error`
    stderr: float = 0.0  # standard error of (error - REAP's error), from the per-sequence differences
    versus: str | None = None  # refit candidates: whose error `stderr` is the difference to (else REAP's)

    @property
    def score(self) -> float:
        """What the choice minimises: the error, plus Z_MARGIN standard errors of its difference to REAP's, so a
        merge is chosen only when its advantage over pruning is larger than the held-out slice's noise."""
        return self.error + Z_MARGIN * self.stderr

    def to_json(self) -> dict:
        d = {"name": self.name, "method": self.plan.method, "error": self.error, "stderr": self.stderr,
             "score": self.score, "merged_groups": len(self.plan.merged_groups())}
        if self.undone:
            d["undone"] = self.undone
        if self.versus:
            d["versus"] = self.versus
        return d


def group_size_ladder(num_experts: int, n_keep: int, n_group: int = 1) -> list[int]:
    """REAM group sizes to try: powers of two from 2 up to N - N' + 1 (one group takes every removed expert),
    never below ceil(N / N') (every expert must fit in a group), plus the `auto` rule's size; per routing group
    when routing is group-limited."""
    n, k = num_experts // n_group, n_keep // n_group
    lower, cap = -(-n // k), n - k + 1
    sizes = {cap, auto_group_size(n, k)}
    c = 2
    while c < cap:
        sizes.add(max(c, lower))
        c *= 2
    return sorted(s for s in sizes if lower <= s <= cap)


def candidate_plans(stats: LayerStats, n_keep: int, n_group: int, options: MethodOptions, seed: int,
                    method: str = "ream") -> list[Candidate]:
    """REAP first, then REAM at every group size of the ladder, then REAM with every removed expert merged into
    its most similar centroid (pseudo-pruning hands removed experts to the most salient centroids first, whatever
    their similarity; near-copies of each other are only merged together this way when neither is the most
    salient). Any other method: its own plan alone (the guard then judges only its refit)."""
    def plan(method: str, opts: MethodOptions) -> LayerPlan:
        p = METHODS[method].plan(MethodInput(stats, n_keep, n_group, opts, seed))
        p.validate()
        return p

    if method != "ream":
        return [Candidate(method, plan(method, options))]

    out = [Candidate("reap", plan("reap", options))]
    if options.grouping != "pseudo-prune":
        return out + [Candidate("ream", plan("ream", options))]
    auto = auto_group_size(stats.num_experts // n_group, n_keep // n_group)
    sizes = set(group_size_ladder(stats.num_experts, n_keep, n_group))
    if options.group_size:  # the user's --group-size is always among the candidates
        sizes.add(options.group_size)
    for c in sorted(sizes):
        name = f"ream-C{c}" + (" (auto)" if c == auto and options.group_size is None else "")
        out.append(Candidate(name, plan("ream", replace(options, group_size=c))))
    return out + [Candidate("ream-nearest", plan("ream", replace(options, grouping="nearest-centroid")))]


def undo_group(plan: LayerPlan, centroid: int) -> LayerPlan:
    """The plan with `centroid`'s merge undone: the centroid kept as it is, its members dropped."""
    groups = {c: list(m) for c, m in plan.groups.items()}
    weights = {c: list(w) for c, w in plan.weights.items()}
    groups[centroid], weights[centroid] = [centroid], [1.0]
    return replace(plan, groups=groups, weights=weights)


class HeldOutJudge:
    """The held-out slice of one MoE layer: its cached MoE inputs, the original routed output on them, and the
    output of the candidate being judged (float32 buffers in the planned store tier)."""

    def __init__(self, streamer: LayerStreamer, block: MoEBlock, x: HiddenStateStore):
        self.s, self.x = streamer, x
        # routed experts only, before a post-norm (FlexOlmo): the greedy undo adds its changes linearly
        self.block = replace(block, shared=None, shared_gate=None, post_norm=None, identity_output=False)
        self.y = self._zeros()
        streamer.run_moe(self.block, x, self.y)
        self.y_sq = self._sum(lambda b: self.y.read(b, streamer.device).double().pow(2).sum())
        self.current = self._zeros()  # y_hat of the candidate judged last
        self.best = self._zeros()  # y_hat of the best merging candidate so far (start of the greedy pass)
        self.best_error = float("inf")

    def _zeros(self) -> HiddenStateStore:
        st = self.s.new_store(self.x.lengths, torch.float32, width=self.x.hidden)
        st.buf.zero_()
        return st

    def _batches(self):
        return self.x.batches(self.s.opts.tokens_per_batch)

    def _sum(self, fn) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.s.device)
        for b in self._batches():
            total += fn(b)
        return float(total)

    def error_of(self, y_hat: HiddenStateStore) -> torch.Tensor:
        """Each held-out sequence's sum ||y - y_hat||^2 / sum over all held-out tokens of ||y||^2 (float64);
        their sum is e."""
        dev = self.s.device
        parts = [(self.y.read(b, dev) - y_hat.read(b, dev)).double().pow(2).sum(dim=(1, 2)) for b in self._batches()]
        return torch.cat(parts).cpu() / max(self.y_sq, 1e-300)

    def judge(self, cand: Candidate, loader, keep_as_start: bool) -> None:
        """Sets cand.error (e on the held-out tokens) and its per-sequence parts; with keep_as_start, remembers
        y_hat when it is the best so far."""
        self.current.buf.zero_()
        self.s.run_moe(self.block.restricted(cand.plan.kept), self.x, self.current, experts=loader)
        cand.per_sequence = self.error_of(self.current)
        cand.error = float(cand.per_sequence.sum())
        if keep_as_start and cand.error < self.best_error:
            self.best_error = cand.error
            self.current, self.best = self.best, self.current

    def greedy_undo(self, plan: LayerPlan, merged: dict, order: list[int]) -> tuple[LayerPlan, list[int]]:
        """Starting from `plan` (whose y_hat is in self.best), undo each merged group in `order` when that lowers
        the error. Returns the final plan and the undone centroids."""
        s, dev = self.s, self.s.device
        block = self.block.restricted(plan.kept)
        position = {e: p for p, e in enumerate(plan.kept)}
        undone: list[int] = []
        for c in order:
            original = s.experts(plan.layer, [c])
            m = merged[c]
            merged_w = ExpertWeights([c], *(t[None].to(dev, s.dtype) for t in m))
            deltas = _UndoDelta(self, block, position[c], original, merged_w)
            change = torch.zeros((), dtype=torch.float64, device=dev)
            for b in self._batches():
                tok, d = deltas(b)
                if d is None:
                    continue
                res = (self.y.read(b, dev).reshape(-1, self.x.hidden)[tok]
                       - self.best.read(b, dev).reshape(-1, self.x.hidden)[tok])
                change += ((res - d).double().pow(2).sum() - res.double().pow(2).sum())
            if float(change) < 0:
                for b in self._batches():
                    tok, d = deltas(b)
                    if d is None:
                        continue
                    y_hat = self.best.read(b, dev).reshape(-1, self.x.hidden)
                    y_hat.index_add_(0, tok, d)
                    self.best.write(b, y_hat)
                plan = undo_group(plan, c)
                undone.append(c)
        return plan, undone

    def close(self) -> None:
        for st in (self.y, self.current, self.best):
            st.close()


class _UndoDelta:
    """For one batch of held-out tokens: the rows routed to kept position `p`, and how y_hat changes there when the
    merged expert at p is replaced by the original centroid: w(x) * (E_c(x) - M_c(x))."""

    def __init__(self, judge: HeldOutJudge, block: MoEBlock, p: int, original: ExpertWeights, merged: ExpertWeights):
        self.j, self.block, self.p, self.original, self.merged = judge, block, p, original, merged

    def __call__(self, b):
        s, x_store = self.j.s, self.j.x
        x = x_store.read(b, s.device).reshape(-1, x_store.hidden)
        r = self.block.route(x, x_store.batch_ids(b))
        tok, slot = torch.where(r.indices == self.p)
        if tok.numel() == 0:
            return tok, None
        act, scale = self.block.act, self.block.output_scale  # (the judge's outputs are scaled as the block's)
        xe = self.block.expert_input(x[tok])  # (a latent MoE: the change is mapped back by its output projection)
        if self.block.router_cfg.scales_input:  # Llama-4: the weight is inside the expert, E(w * x)
            w = r.weights[tok, slot]
            return tok, scale * (routed_contribution(self.original, 0, xe, w, act, True)
                                 - routed_contribution(self.merged, 0, xe, w, act, True))
        d = expert_output(self.original, 0, xe, act).float() - expert_output(self.merged, 0, xe, act).float()
        return tok, self.block.to_hidden(d * (scale * r.weights[tok, slot, None].float()), with_bias=False)


def guarded_plan(
    streamer: LayerStreamer, block: MoEBlock, h_stats: HiddenStateStore, judge: HeldOutJudge, stats: LayerStats,
    n_keep: int, options: MethodOptions, seed: int, mode: str, method: str = "ream", refitter: Refitter | None = None,
) -> tuple[LayerPlan, dict]:
    """Judge every candidate on the held-out slice and return the chosen plan (with its record in `plan.guard`)
    and its merged experts. Only the chosen and the best merging candidate's merged experts are kept at once.
    With a `refitter`, the choice is then refit (and REAP too, when a merge was chosen) and judged again."""
    cands = candidate_plans(stats, n_keep, block.router_cfg.n_group, options, seed, method)
    acts = alignment_stats(streamer, block, h_stats, [c.plan for c in cands])  # one pass for every candidate
    perms: dict = {}  # (centroid, member) -> alignment, solved once for all candidates
    presolve_alignments(streamer, [c.plan for c in cands], acts, perms)  # (on all cores, where that is free)
    start: tuple[Candidate, dict] | None = None  # the best merging candidate: where the greedy pass starts
    chosen: tuple[Candidate, dict] | None = None  # lowest score so far (only these two keep merged experts)

    def consider(cand: Candidate, merged: dict) -> None:
        nonlocal chosen
        reap = cands[0]  # judged first
        cand.stderr = paired_stderr(cand.per_sequence, reap.per_sequence) if cand is not reap else 0.0
        log.info("layer %d: %s e=%.5f (+- %.5f vs REAP)", stats.layer, cand.name, cand.error, cand.stderr)
        if chosen is None or cand.score < chosen[0].score:  # ties: the earlier, REAP before any merge
            chosen = (cand, merged)

    for cand in list(cands):
        merging = bool(cand.plan.merged_groups())
        merged = merge_plan(streamer, block, h_stats, cand.plan, acts, perms, split=True) if merging else {}
        judge.judge(cand, compressed_loader(streamer, cand.plan, merged), keep_as_start=merging)
        consider(cand, merged)
        if merging and (start is None or cand.error < start[0].error):
            start = (cand, merged)
        del merged
    if mode == "group" and start is not None:
        first, merged = start
        saliency = first.plan.scores.get("saliency") or first.plan.scores["reap"]
        order = sorted(first.plan.merged_groups(), key=lambda c: (-saliency[c], c))
        plan, undone = judge.greedy_undo(first.plan, merged, order)
        if plan.merged_groups() and undone:  # (every merge undone: the plan is REAP's, already judged)
            refined = Candidate(f"{first.name} +undo {len(undone)}/{len(order)}", plan, undone=undone)
            refined_merged = {c: merged[c] for c in plan.merged_groups()}
            judge.judge(refined, compressed_loader(streamer, plan, refined_merged), keep_as_start=False)
            cands.append(refined)
            consider(refined, refined_merged)
    assert chosen is not None
    cand, merged = chosen
    if refitter is not None:
        cand, merged = judged_refit(streamer, judge, refitter, cands, cand, merged)
    cand.plan.guard = {
        "mode": mode,
        "holdout_sequences": len(judge.x.lengths),
        "holdout_tokens": judge.x.total_tokens,
        "candidates": [c.to_json() for c in cands],
        "chosen": cand.name,
    }
    return cand.plan, merged


def paired_stderr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of sum(a) - sum(b) from the held-out sequences' paired differences."""
    diff = a - b
    return float(diff.std() * diff.numel() ** 0.5) if diff.numel() > 1 else 0.0


def judged_refit(streamer: LayerStreamer, judge: HeldOutJudge, refitter: Refitter, cands: list[Candidate],
                 chosen: Candidate, merged: dict) -> tuple[Candidate, dict]:
    """Refit REAP's plan and, when the guard chose a merge, that plan too; each fit is judged on the held-out
    tokens (which it never saw) and replaces the incumbent only when it beats it by more than Z_MARGIN standard
    errors of their paired difference. `--refit on` takes the chosen plan's fit whatever it scores. Every fit is
    recorded among the candidates, and the chosen plan's `refit` says what was fitted and whether it was used."""
    bases = [cands[0]] + ([chosen] if chosen is not cands[0] else [])
    if refitter.opts.mode == "on":
        bases = [chosen]
    best, best_merged, tried = chosen, merged, {}
    for base in bases:
        base_merged = merged if base is chosen else {}
        fitted, record = refitter.fit(base.plan, base_merged, compressed_loader(streamer, base.plan, base_merged))
        plan = replace(base.plan, refit=record)
        cand = Candidate(f"{base.name} +refit", plan, versus=best.name)
        judge.judge(cand, compressed_loader(streamer, plan, fitted), keep_as_start=False)
        cand.stderr = paired_stderr(cand.per_sequence, best.per_sequence)
        record.update(heldout_error_before=base.error, heldout_error=cand.error, heldout_stderr=cand.stderr,
                      versus=best.name)
        log.info("layer %d: %s e=%.5f (+- %.5f vs %s)", plan.layer, cand.name, cand.error, cand.stderr, best.name)
        cands.append(cand)
        tried[base.name] = record
        if cand.score < best.error or refitter.opts.mode == "on":
            best, best_merged = cand, fitted
    used = best.plan.refit is not None
    if used:
        best.plan.refit["used"] = True
    else:  # the unfitted plan stays: its record says which fit was tried and lost
        best.plan.refit = {**tried.get(best.name, next(iter(tried.values()))), "used": False}
    return best, best_merged
