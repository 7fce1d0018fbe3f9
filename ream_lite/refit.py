"""The refit stage of one MoE layer: after the plan, fit the kept (and merged) experts' down projections so that the
compressed block reproduces the original block's routed output on the statistics tokens.

The math is in `methods/refit.py`; this module feeds it tokens. The original routed output y of every statistics
token is added into a float32 store during the statistics pass (`Refitter.observer`, no extra read of the experts);
that store then becomes the running residual r = y - y_hat of the plan being fitted. For each kept expert the
tokens routed to it are found once (`RoutingIndex`: the restricted router is fixed during the fit) and gathered from
the hidden-state cache in bounded blocks: one pass accumulates the expert's Gram and cross term (float64), the
solve gives its new down projection, rounded as the output will hold it, and a second pass takes the change out of
the residual. Experts are visited in order, chunk by chunk as the engine loads them, for `sweeps` sweeps.

Memory: one float32 [statistics tokens, hidden] store (in the planned tier), the routing index (k ints and floats
per token, on the host), and per expert an I x I Gram and an H x I cross term, with its features kept from the
Gram's pass for the update (up to half the batch activations' room, free while the refit runs). Work per sweep:
two gathers of every routed token and its expert's gate / up projections once (twice beyond that room), about one
routed forward pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ream_lite import timing
from ream_lite.engine.experts import ExpertWeights, add_routed_output
from ream_lite.engine.store import Batch, HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, MoEBlock
from ream_lite.errors import ReamLiteError
from ream_lite.methods.plan import LayerPlan
from ream_lite.methods.refit import down_matrix, refit_features, ridge_solve
from ream_lite.written import merged_as_written

log = logging.getLogger(__name__)
REFIT_MODES = ("auto", "on", "off")
FEATURE_ROOM = 256 * 2**20  # bytes of kept features without a memory plan (see Refitter.feature_room)


@dataclass(frozen=True)
class RefitOptions:
    mode: str = "auto"  # auto: fitted where the guard's held-out tokens judge it better | on: always | off: never
    sweeps: int = 2  # block coordinate descent sweeps over the kept experts
    ridge: float = 1e-2  # pull towards the plan's expert, in units of the mean diagonal of each expert's Gram


class RoutedTarget:
    """Statistics-pass observer adding the block's routed output (no shared expert, no output scale) into a store."""

    def __init__(self, store: HiddenStateStore, act: Callable, scale_input: bool):
        self.store, self.act, self.scale_input = store, act, scale_input

    def on_routing(self, layer: int, batch: Batch, x: torch.Tensor, routing) -> None:
        pass

    def at(self, first: int, last: int) -> RoutedTarget:
        """The same target over sequences first..last-1 only (a view of its store: batches index those rows)."""
        return RoutedTarget(self.store.view(first, last), self.act, self.scale_input)

    def on_experts(self, layer: int, batch: Batch, x: torch.Tensor, routing, experts: ExpertWeights) -> None:
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        add_routed_output(acc, x, routing.indices, routing.weights, experts, self.act, routing.by_expert,
                          self.scale_input)
        self.store.add_(batch, acc)


class RoutingIndex:
    """For every expert of a (restricted) block: the flat store rows of the tokens routed to it and their router
    weights, in token order (host memory: k rows and weights per token)."""

    def __init__(self, streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore):
        rows, experts, weights = [], [], []
        with torch.inference_mode():
            for b in h.batches(streamer.opts.tokens_per_batch):
                x = h.read(b, streamer.device).reshape(-1, h.hidden)
                r = block.route(x, h.batch_ids(b))
                k = r.indices.shape[1]
                rows.append(torch.arange(b.start, b.end, dtype=torch.int64).repeat_interleave(k))
                experts.append(r.indices.reshape(-1).cpu())
                weights.append(r.weights.reshape(-1).float().cpu())
        flat = torch.cat(experts) if experts else torch.zeros(0, dtype=torch.int64)
        order = torch.argsort(flat, stable=True)
        self.rows = torch.cat(rows)[order] if rows else flat
        self.weights = torch.cat(weights)[order] if weights else torch.zeros(0)
        counts = torch.bincount(flat, minlength=block.router_cfg.num_experts).tolist()
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)

    def of(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[p], self.offsets[p + 1]
        return self.rows[a:b], self.weights[a:b]


class Refitter:
    """One MoE layer's refit over the statistics tokens `h`: owns the float32 target / residual store."""

    def __init__(self, streamer: LayerStreamer, block: MoEBlock, h: HiddenStateStore, options: RefitOptions):
        self.s, self.h, self.opts = streamer, h, options
        # routed experts only (no shared expert, no output scale, no post-norm)
        self.block = replace(block, shared=None, shared_gate=None, output_scale=1.0, post_norm=None,
                             identity_output=False)
        # (its own tier: it goes to host RAM or the work dir when the hidden states leave it no room on the device)
        self.store = streamer.new_store(h.lengths, torch.float32, streamer.plan.side_tier if streamer.plan else None,
                                        width=h.hidden)
        self.store.buf.zero_()
        self.holds_target = True  # the store holds y (filled by `observer` in the statistics pass)
        # an expert's features, computed for its normal equations, are kept for its residual update in this much
        # memory (beyond it they are computed again): the batch activations' room, free while the refit runs
        self.feature_room = streamer.plan.activation_bytes // 2 if streamer.plan else FEATURE_ROOM

    def observer(self) -> RoutedTarget:
        return RoutedTarget(self.store, self.block.act, self.block.router_cfg.scales_input)

    def _target(self) -> None:
        """Make the store hold y again (after a fit turned it into that plan's residual): one routed pass."""
        if self.holds_target:
            return
        self.store.buf.zero_()
        self.s.run_moe(self.block, self.h, self.store)
        self.holds_target = True

    def _blocks(self, rows: torch.Tensor, weights: torch.Tensor):
        step = max(1, self.s.opts.tokens_per_batch)
        for a in range(0, len(rows), step):
            yield rows[a : a + step], weights[a : a + step]

    def _sq(self) -> float:
        dev = self.s.device
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for b in self.h.batches(self.s.opts.tokens_per_batch):
            total += self.store.read(b, dev).double().pow(2).sum()
        return float(total)

    def fit(self, plan: LayerPlan, merged: dict, load: Callable[[list[int]], ExpertWeights]) -> tuple[dict, dict]:
        """Fit `plan`'s kept experts (merged ones as `merged` holds them; `load(positions)` gives the compressed
        layer's experts as run). Returns the new merged dict (every fitted expert, as the output will hold it) and
        the fit's record (calibration-token error before and after, relative to ||y||^2)."""
        with timing.phase("refit"):
            return self._fit(plan, merged, load)

    def _fit(self, plan: LayerPlan, merged: dict, load) -> tuple[dict, dict]:
        s, dev, act = self.s, self.s.device, self.block.act
        scale_input = self.block.router_cfg.scales_input
        self._target()
        self.holds_target = False
        y_sq = max(self._sq(), 1e-300)
        block = self.block.restricted(plan.kept)
        index = RoutingIndex(s, block, self.h)
        chunks = s.expert_chunks(len(plan.kept))
        fitted_at: set[int] = set()  # positions fitted so far: their current values are out[kept[p]] (as written)
        out = dict(merged)

        def features(w: ExpertWeights, j: int, rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return refit_features(w, j, self.h.gather(rows, dev), g.to(dev), act, scale_input)

        def subtract(w: ExpertWeights, j: int, p: int, delta: torch.Tensor, kept: list | None = None) -> None:
            for b, (rows, g) in enumerate(self._blocks(*index.of(p))):
                f = kept[b] if kept is not None and b < len(kept) else features(w, j, rows, g)
                self.store.put(rows, self.store.gather(rows, dev) - f @ delta.T)

        with torch.inference_mode():
            for ids in chunks:  # the residual of the plan as it is: r = y - y_hat
                w = load(ids)
                for j, p in enumerate(ids):
                    subtract(w, j, p, down_matrix(w, j).to(dev))
                del w
            before = self._sq() / y_sq
            for _ in range(self.opts.sweeps):
                for ids in chunks:
                    w = load(ids)
                    for j, p in enumerate(ids):
                        routed = index.of(p)
                        if routed[0].numel() == 0:
                            continue
                        w0 = down_matrix(w, j).to(dev)
                        e = plan.kept[p]
                        cur = down_matrix(ExpertWeights([e], *(t[None] for t in out[e])), 0).to(dev) \
                            if p in fitted_at else w0
                        d = w0.shape[1]
                        gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
                        cross = torch.zeros(w0.shape[0], d, dtype=torch.float64, device=dev)
                        kept: list[torch.Tensor] = []  # the first blocks' features, for the update below
                        room = self.feature_room
                        for rows, g in self._blocks(*routed):
                            f = features(w, j, rows, g)
                            t = self.store.gather(rows, dev) + f @ cur.T
                            gram += (f.T @ f).double()
                            cross += (t.T @ f).double()
                            if f.nbytes <= room:
                                kept.append(f)
                                room -= f.nbytes
                            else:
                                room = 0
                        try:
                            fitted = ridge_solve(gram, cross, w0, self.opts.ridge)
                        except torch.linalg.LinAlgError:  # (Inf / NaN activations: overflow or a corrupt input)
                            raise ReamLiteError(
                                f"layer {self.block.layer}, expert {e}: the refit's normal equations are not finite "
                                "(the activations overflow in the compute dtype, or the weights or config.json are "
                                "corrupt); try --dtype float32 or --refit off") from None
                        written = self._as_written(plan, p, e, merged, fitted)
                        new = down_matrix(ExpertWeights([e], *(t[None] for t in written)), 0).to(dev)
                        subtract(w, j, p, new - cur, kept)  # (no check for a zero change: a GPU would wait)
                        del kept
                        fitted_at.add(p)
                        out[e] = written
                    del w
            after = self._sq() / y_sq
        fitted_ids = sorted(plan.kept[p] for p in fitted_at)
        record = {"sweeps": self.opts.sweeps, "ridge": self.opts.ridge, "experts": fitted_ids,
                  "calib_error_before": before, "calib_error_after": after,
                  "sha256": refit_digest([fitted_parts(out[e]) for e in fitted_ids])}
        log.info("layer %d: refit %d experts, calibration error %.5f -> %.5f", plan.layer, len(fitted_ids), before,
                 after)
        return out, record

    def _as_written(self, plan: LayerPlan, p: int, e: int, merged: dict, fitted: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
        """Expert e (kept at position p) with its down projection (and bias) replaced by `fitted`, as the output
        holds it. Gate and up come exact: from `merged`, or the checkpoint's values in float32."""
        parts = merged[e] if e in merged else self.s.experts(plan.layer, [e], torch.float32).expert(0)
        parts = [t.float() for t in parts]
        inter = parts[2].shape[1]
        parts[2] = fitted[:, :inter].float()
        if len(parts) > 3:  # (gate, up, down, gate_bias, up_bias, down_bias)
            parts[5] = fitted[:, inter].float()
        return merged_as_written(self.s.layout, plan.layer, e, p, tuple(parts), self.s.output_format, self.s.dtype)

    def close(self) -> None:
        self.store.close()


def fitted_parts(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What the refit changes in an expert's (gate, up, down[, gate_bias, up_bias, down_bias]): down (and its bias)."""
    return (parts[2], *parts[5:6])


def refit_digest(experts: list[tuple[torch.Tensor, ...]]) -> str:
    """sha256 of the fitted parts' values (as float32, in order): `apply` checks the experts it copies from a
    compressed output against the plan with it."""
    h = hashlib.sha256()
    for parts in experts:
        for t in parts:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
