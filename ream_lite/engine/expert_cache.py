"""One MoE layer's routed experts, read once and kept on the device while the layer is compressed.

Compressing a layer runs its experts many times: the statistics pass, the alignment pass, the merges, every plan
the guard judges, its greedy undo, the sequential pass. Read from the checkpoint each time, that is ~14x the
checkpoint's bytes for guarded REAM. When the memory plan has room for all of a layer's experts (decoded, in the
compute dtype) beside what the passes hold anyway, `LayerStreamer.layer_experts` reads them once into a
`LayerExpertCache` and every load of that layer is served from it. The passes keep their expert chunks, so the
numbers do not change: a load served here holds exactly the values `load_experts` returns.

Exactness: the cache holds the stored values cast to the compute dtype, as `load_experts` casts them. A load in the
compute dtype is those very values. A load in another dtype (the merges load float32) is served only when the cast to
the compute dtype lost nothing (the stored dtype itself, or float32 holding bf16 / fp16): then casting the cached
value gives what casting the stored one does. Otherwise (a float32 checkpoint run in bfloat16) such loads are read
from the checkpoint, as without the cache.
"""

from __future__ import annotations

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.engine.experts import ExpertWeights, load_experts

# (stored, cached) pairs where every stored value is exactly representable in the cached dtype
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def holds_exactly(layout: ModelLayout, layer: int, dtype: torch.dtype) -> bool:
    """Whether `layer`'s stored expert values survive a cast to `dtype` unchanged (so a copy in `dtype` serves loads
    in any dtype exactly)."""
    stored = {layout.reader.entry(k).torch_dtype for k in layout.expert_keys(layer)}
    return all(s == dtype or (s, dtype) in _EXACT_WIDENING for s in stored)


def writes_as_stored(layout: ModelLayout, layer: int, dtype: torch.dtype) -> bool:
    """Whether a cache of `layer` in `dtype` holds its experts' stored bytes, so the output's kept experts can be
    written from it instead of read again: per-expert storage (the output's layout) in exactly `dtype`."""
    info = layout.layers[layer]
    if info.expert_storage != "per_expert":
        return False
    return all(layout.reader.entry(k).torch_dtype == dtype for k in layout.expert_keys(layer))


class LayerExpertCache:
    """Every routed expert of one MoE layer in `dtype` on `device`, read from the checkpoint once."""

    def __init__(self, layout: ModelLayout, layer: int, dtype: torch.dtype, device: torch.device | str):
        self.layer, self.dtype = layer, dtype
        self.weights = load_experts(layout, layer, list(range(layout.layers[layer].num_experts)), dtype, device)
        self.exact = holds_exactly(layout, layer, dtype)
        self.as_stored = writes_as_stored(layout, layer, dtype)

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def serves(self, dtype: torch.dtype) -> bool:
        """Whether a load in `dtype` gets from here exactly what the checkpoint would give (see the module doc)."""
        return dtype == self.dtype or self.exact

    def stored(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's (gate, up, down) exactly as stored (only where `as_stored`)."""
        assert self.as_stored
        return self.weights.expert(e)

    def take(self, ids: list[int], dtype: torch.dtype, copy: bool = False) -> ExpertWeights:
        """Experts `ids` in `dtype`: views of the cache for a contiguous run in its own dtype (no copy; read-only, so
        a caller that writes into the chunk asks for a `copy`), else a new chunk filled expert by expert (never a
        second full-size temporary)."""
        w = self.weights
        if ids and not copy and dtype == self.dtype and ids == list(range(ids[0], ids[-1] + 1)):
            a, b = ids[0], ids[-1] + 1
            return ExpertWeights(list(ids), *(t[a:b] for t in w.parts))
        src = w.parts  # (biases included, where the experts have them)
        out = [torch.empty((len(ids), *t.shape[1:]), dtype=dtype, device=t.device) for t in src]
        for j, e in enumerate(ids):
            for d, s in zip(out, src):
                d[j].copy_(s[e])
        return ExpertWeights(list(ids), *out)
