"""Routed-expert weights of one layer, loaded in chunks, and the SwiGLU expert computation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ream_lite import timing
from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.router import ExpertTokens


@dataclass
class ExpertWeights:
    """A chunk of experts in the canonical layout: gate/up [n, I, H], down [n, H, I]; ids = original indices."""

    ids: list[int]
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


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
        gu_key, down_key = layout.fused_keys(layer)
        _, two_i, hidden = r.shape(gu_key)
        inter = two_i // 2
        w = _empty_chunk(ids, inter, hidden, dtype, device)
        row_bytes = max(r.entry(gu_key).nbytes // r.shape(gu_key)[0], 1)
        step = max(1, READ_BLOCK_BYTES // row_bytes)
        j = 0
        for a, b in _runs(ids):  # contiguous id runs are single reads, split into bounded blocks
            for s in range(a, b, step):
                e = min(s + step, b)
                gu = r.get(gu_key, rows=(s, e), dtype=dtype)
                w.gate[j : j + e - s].copy_(gu[:, :inter])
                w.up[j : j + e - s].copy_(gu[:, inter:])
                del gu
                w.down[j : j + e - s].copy_(r.get(down_key, rows=(s, e), dtype=dtype))
                j += e - s
        return w
    g0 = r.shape(layout.per_expert_keys(layer, ids[0])[0]) if n else (0, 0)
    w = _empty_chunk(ids, g0[0], g0[1], dtype, device)
    for j, e in enumerate(ids):
        for dst, key in zip((w.gate, w.up, w.down), layout.per_expert_keys(layer, e)):
            dst[j].copy_(r.get(key, dtype=dtype))
    return w


READ_BLOCK_BYTES = 64 * 1024**2


def _empty_chunk(ids: list[int], inter: int, hidden: int, dtype: torch.dtype, device) -> ExpertWeights:
    n = len(ids)
    return ExpertWeights(
        list(ids),
        torch.empty(n, inter, hidden, dtype=dtype, device=device),
        torch.empty(n, inter, hidden, dtype=dtype, device=device),
        torch.empty(n, hidden, inter, dtype=dtype, device=device),
    )


def expert_bytes(layout: ModelLayout, layer: int, dtype: torch.dtype) -> int:
    """Bytes one expert of `layer` takes once decoded to `dtype`."""
    info = layout.layers[layer]
    if info.expert_storage == "fused":
        numel = sum(_numel(layout.reader.shape(k)) for k in layout.fused_keys(layer)) // info.num_experts
    else:
        numel = sum(_numel(layout.reader.shape(k)) for k in layout.per_expert_keys(layer, 0))
    return numel * torch.empty(0, dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def expert_intermediate(w: ExpertWeights, j: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """a_j(x) = act(W_gate x) * (W_up x) for the j-th expert of the chunk: [T, I]."""
    return act(F.linear(x, w.gate[j])) * F.linear(x, w.up[j])


def expert_output(w: ExpertWeights, j: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """E_j(x) = W_down a_j(x): [T, H]."""
    return F.linear(expert_intermediate(w, j, x, act), w.down[j])


def add_routed_output(
    out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w: ExpertWeights, act: Callable,
    by_expert: ExpertTokens | None = None,
) -> None:
    """out[t] += sum over the chunk's experts e chosen by token t of weight(t, e) * E_e(x[t]) (`by_expert`: the
    batch's tokens per expert, when the caller has them)."""
    if by_expert is None:
        by_expert = ExpertTokens(indices, max(w.ids, default=0) + 1)  # (bincount grows past it as needed)
    for j, e in enumerate(w.ids):
        if by_expert.count(e) == 0:
            continue
        token_idx, slot = by_expert.of(e)
        y = expert_output(w, j, x[token_idx], act)
        y = y.float() * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
