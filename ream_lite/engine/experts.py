"""Routed-expert weights of one layer, loaded in chunks, and the gated (SwiGLU-like) expert computation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ream_lite import timing
from ream_lite.arch import fused
from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.format import shape_numel
from ream_lite.engine.router import ExpertTokens


@dataclass
class ExpertWeights:
    """A chunk of experts in the canonical layout: gate/up [n, I, H], down [n, H, I]; ids = original indices.
    Families whose experts have biases (gpt_oss) carry all three: gate/up [n, I], down [n, H]; others none."""

    ids: list[int]
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) plus (gate_bias, up_bias, down_bias) where the experts have biases: the order every
        per-expert tuple (merged experts, permutations, the cache) uses, so `ExpertWeights(ids, *parts)` rebuilds."""
        w = (self.gate, self.up, self.down)
        return w if self.gate_bias is None else (*w, self.gate_bias, self.up_bias, self.down_bias)

    def expert(self, j: int) -> tuple[torch.Tensor, ...]:
        """The j-th expert's `parts`."""
        return tuple(t[j] for t in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)


def load_experts(
    layout: ModelLayout, layer: int, ids: list[int], dtype: torch.dtype, device: torch.device | str
) -> ExpertWeights:
    """Read experts `ids` of `layer` from the checkpoint (only their bytes), decode to `dtype` on `device`.

    The result tensors are allocated once and filled one stored tensor (or one bounded row range) at a time, so
    the peak is the chunk itself plus one read buffer, never two copies of the chunk.
    """
    with timing.phase("read"):
        return _load_experts(layout, layer, ids, dtype, device)


def _load_experts(layout: ModelLayout, layer: int, ids: list[int], dtype: torch.dtype, device) -> ExpertWeights:
    info = layout.layers[layer]
    r = layout.reader
    n = len(ids)
    if info.expert_storage == "fused":
        keys = layout.fused_keys(layer)
        gu_key, down_key = keys[:2]
        bias_keys = layout.fused_bias_keys(layer)
        spec = layout.spec  # orientation and gate/up arrangement of the stored tensors (arch/fused.py)
        inter, hidden = fused.gate_up_dims(spec, layout.fused_slab_shape(layer, gu_key))
        w = _empty_chunk(ids, inter, hidden, dtype, device, bias=bool(bias_keys))
        slab_bytes = max(r.entry(gu_key).nbytes // info.num_experts, 1)
        step = max(1, READ_BLOCK_BYTES // slab_bytes)

        def slabs(key: str, s: int, e: int) -> torch.Tensor:  # experts s..e-1 of a fused tensor: [e - s, *slab]
            rows = layout.fused_rows(layer, key)
            t = r.get(key, rows=(s * rows, e * rows), dtype=dtype, device=device)
            return t if rows == 1 else t.reshape(e - s, rows, *t.shape[1:])

        j = 0
        for a, b in _runs(ids):  # contiguous id runs are single reads, split into bounded blocks
            for s in range(a, b, step):
                e = min(s + step, b)
                if spec.fused_up:  # (DBRX: gate and up apart)
                    w.gate[j : j + e - s].copy_(fused.split_one(spec, slabs(gu_key, s, e)))
                    w.up[j : j + e - s].copy_(fused.split_one(spec, slabs(keys[2], s, e)))
                else:
                    gu = slabs(gu_key, s, e)
                    gate, up = fused.split_gate_up(spec, gu)
                    w.gate[j : j + e - s].copy_(gate)
                    w.up[j : j + e - s].copy_(up)
                    del gu, gate, up
                w.down[j : j + e - s].copy_(fused.split_down(spec, slabs(down_key, s, e)))
                if bias_keys:
                    gate_b, up_b = fused.split_pairs(spec, r.get(bias_keys[0], rows=(s, e), dtype=dtype))
                    w.gate_bias[j : j + e - s].copy_(gate_b)
                    w.up_bias[j : j + e - s].copy_(up_b)
                    w.down_bias[j : j + e - s].copy_(r.get(bias_keys[1], rows=(s, e), dtype=dtype))
                j += e - s
        return w
    g0 = r.shape(layout.per_expert_keys(layer, ids[0])[0]) if n else (0, 0)
    w = _empty_chunk(ids, g0[0], g0[1], dtype, device, gated=layout.spec.gated_experts)
    for j, e in enumerate(ids):
        for dst, key in zip(layout.stored_parts((w.gate, w.up, w.down)), layout.per_expert_keys(layer, e)):
            # (decoded where it is used: FP8 / bnb codes cross to the GPU, not their 2-4x larger values)
            dst[j].copy_(r.get(key, dtype=dtype, device=device))
    return w


READ_BLOCK_BYTES = 64 * 1024**2


def _empty_chunk(ids: list[int], inter: int, hidden: int, dtype: torch.dtype, device, bias: bool = False,
                 gated: bool = True) -> ExpertWeights:
    n = len(ids)
    shapes = [(n, inter, hidden if gated else 0), (n, inter, hidden), (n, hidden, inter)]
    if bias:
        shapes += [(n, inter), (n, inter), (n, hidden)]
    return ExpertWeights(list(ids), *(torch.empty(s, dtype=dtype, device=device) for s in shapes))


def expert_bytes(layout: ModelLayout, layer: int, dtype: torch.dtype) -> int:
    """Bytes one expert of `layer` takes once decoded to `dtype`."""
    info = layout.layers[layer]
    if info.expert_storage == "fused":
        numel = sum(shape_numel(layout.reader.shape(k)) for k in layout.expert_keys(layer)) // info.num_experts
    else:
        numel = sum(shape_numel(layout.reader.shape(k)) for k in layout.per_expert_keys(layer, 0))
    return numel * torch.empty(0, dtype=dtype).element_size()


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def _row(t: torch.Tensor | None, j: int) -> torch.Tensor | None:
    return None if t is None else t[j]


def expert_intermediate(w: ExpertWeights, j: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """a_j(x) = act(W_gate x + b_gate) * (W_up x + b_up) for the j-th expert of the chunk: [T, I]. An `act` with a
    `glu(gate, up)` method (engine/expert_fn.py: gpt_oss's clamped SwiGLU) combines the two projections itself.
    Ungated experts (Nemotron-H) hold a gate of zero inputs: a_j(x) = act(W_up x). (Everything that aligns, merges,
    caches or permutes experts treats that gate as any other part: it has no columns to move.)"""
    up = F.linear(x, w.up[j], _row(w.up_bias, j))
    if w.gate.shape[-1] == 0:
        return act(up)
    gate = F.linear(x, w.gate[j], _row(w.gate_bias, j))
    glu = getattr(act, "glu", None)
    return glu(gate, up) if glu is not None else act(gate) * up


def expert_output(w: ExpertWeights, j: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """E_j(x) = W_down a_j(x) + b_down: [T, H]."""
    return F.linear(expert_intermediate(w, j, x, act), w.down[j], _row(w.down_bias, j))


def routed_contribution(
    w: ExpertWeights, j: int, x: torch.Tensor, weight: torch.Tensor, act: Callable, scale_input: bool = False
) -> torch.Tensor:
    """What the j-th expert adds to the layer output for tokens x [T, H] routed to it with `weight` [T]: float32
    weight * E_j(x), or E_j(weight * x) where the router scales the expert's input (Llama-4; the scaled input is
    rounded to x's dtype first, as there)."""
    if scale_input:
        return expert_output(w, j, x * weight[:, None].to(x.dtype), act).float()
    return expert_output(w, j, x, act).float() * weight[:, None]


def add_routed_output(
    out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w: ExpertWeights, act: Callable,
    by_expert: ExpertTokens | None = None, scale_input: bool = False,
) -> None:
    """out[t] += sum over the chunk's experts e chosen by token t of their `routed_contribution` (`by_expert`: the
    batch's tokens per expert, when the caller has them)."""
    if by_expert is None:
        by_expert = ExpertTokens(indices, max(w.ids, default=0) + 1)  # (bincount grows past it as needed)
    for j, e in enumerate(w.ids):
        if by_expert.count(e) == 0:
            continue
        token_idx, slot = by_expert.of(e)
        y = routed_contribution(w, j, x[token_idx], weights[token_idx, slot], act, scale_input)
        out.index_add_(0, token_idx, y.to(out.dtype))
