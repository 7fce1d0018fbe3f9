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

Encoded experts (FP8 with a release's block scales, bnb 4-bit): their decoded values are generally not exact in the
compute dtype, so the cache also keeps their stored parts (half the decoded bf16 size for FP8). Loads in another
dtype decode those bytes again, as `load_experts` would, and the output's kept experts are written from them.
"""

from __future__ import annotations

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint import stored
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.engine.experts import ExpertWeights, load_experts

# (stored, cached) pairs where every stored value is exactly representable in the cached dtype
_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def holds_exactly(layout: ModelLayout, layer: int, dtype: torch.dtype) -> bool:
    """Whether `layer`'s stored expert values survive a cast to `dtype` unchanged (so a copy in `dtype` serves loads
    in any dtype exactly)."""
    entries = [layout.reader.entry(k) for k in layout.expert_keys(layer)]
    if any(t.encoding == "mxfp4" for t in entries):  # e2m1 (2 significant bits) x 2^k: exact in bf16 and float32
        return dtype in (torch.bfloat16, torch.float32) and all(
            t.encoding == "mxfp4" or (t.torch_dtype, dtype) in _EXACT_WIDENING or t.torch_dtype == dtype
            for t in entries)
    stored = {t.torch_dtype for t in entries}
    return all(s == dtype or (s, dtype) in _EXACT_WIDENING for s in stored)


def keeps_encoded(layout: ModelLayout, layer: int) -> bool:
    """Whether a cache of `layer` also keeps its experts' stored parts (FP8 values and scales, bnb codes and
    statistics): per-expert storage in an encoding. Loads in any dtype then decode those very bytes, exactly as
    `load_experts` does, and the output's kept experts are written from them: each expert byte is read once."""
    info = layout.layers[layer]
    return info.expert_storage == "per_expert" and any(layout.reader.entry(k).is_encoded
                                                       for k in layout.per_expert_keys(layer, 0))


def encoded_cache_bytes(layout: ModelLayout, layer: int) -> int:
    """Device bytes the stored parts of `layer`'s experts add to its cache (0 unless `keeps_encoded`)."""
    if not keeps_encoded(layout, layer):
        return 0
    return sum(layout.reader.entry(k).nbytes for k in layout.expert_keys(layer))


def writes_as_stored(layout: ModelLayout, layer: int, dtype: torch.dtype) -> bool:
    """Whether a cache of `layer` in `dtype` holds its experts' stored bytes, so the output's kept experts can be
    written from it instead of read again: per-expert storage (the output's layout) in exactly `dtype`, or encoded
    (`keeps_encoded`)."""
    info = layout.layers[layer]
    if info.expert_storage != "per_expert":
        return False
    if keeps_encoded(layout, layer):
        return True
    return all(layout.reader.entry(k).torch_dtype == dtype for k in layout.expert_keys(layer))


class LayerExpertCache:
    """Every routed expert of one MoE layer in `dtype` on `device`, read from the checkpoint once (and, for an
    encoded checkpoint, its stored parts beside them: `keeps_encoded`)."""

    def __init__(self, layout: ModelLayout, layer: int, dtype: torch.dtype, device: torch.device | str):
        self.layer, self.dtype, self.device, self.layout = layer, dtype, device, layout
        n = layout.layers[layer].num_experts
        self.encoded: list[list[tuple[StoredTensor, dict[str, torch.Tensor]]]] | None = None
        if keeps_encoded(layout, layer):
            r = layout.reader
            self.encoded = [[(r.entry(k), {sfx: r.read_part(p).to(device) for sfx, p in r.entry(k).parts.items()})
                             for k in layout.per_expert_keys(layer, e)] for e in range(n)]
            self.weights = self._decoded(list(range(n)), dtype)
        else:
            self.weights = load_experts(layout, layer, list(range(n)), dtype, device)
        self.exact = self.encoded is not None or holds_exactly(layout, layer, dtype)
        self.as_stored = writes_as_stored(layout, layer, dtype)

    def _decoded(self, ids: list[int], dtype: torch.dtype) -> ExpertWeights:
        """Experts `ids` decoded from the kept stored parts: `load_experts`'s values (the same decode of the same
        bytes on the same device)."""
        out = [torch.empty((len(ids), *t.shape), dtype=dtype, device=self.device) for t, _ in self.encoded[0]]
        for j, e in enumerate(ids):
            for dst, (t, parts) in zip(out, self.encoded[e]):
                dst[j].copy_(stored.decode(t, parts, dtype))
        return ExpertWeights(list(ids), *self.layout.canonical_parts(tuple(out)))

    @property
    def nbytes(self) -> int:
        held = sum(p.numel() * p.element_size() for ex in self.encoded for _, parts in ex for p in parts.values()) \
            if self.encoded is not None else 0
        return self.weights.nbytes + held

    def serves(self, dtype: torch.dtype) -> bool:
        """Whether a load in `dtype` gets from here exactly what the checkpoint would give (see the module doc)."""
        return dtype == self.dtype or self.exact

    def stored(self, e: int) -> list[dict[str, torch.Tensor]]:
        """Expert e's (gate, up, down) exactly as stored, each as its parts by suffix ("" alone for a plain tensor;
        only where `as_stored`)."""
        assert self.as_stored
        if self.encoded is not None:
            return [parts for _, parts in self.encoded[e]]
        return [{"": t} for t in self.layout.stored_parts(self.weights.expert(e))]

    def take(self, ids: list[int], dtype: torch.dtype, copy: bool = False) -> ExpertWeights:
        """Experts `ids` in `dtype`: views of the cache for a contiguous run in its own dtype (no copy; read-only, so
        a caller that writes into the chunk asks for a `copy`), else a new chunk filled expert by expert (never a
        second full-size temporary)."""
        w = self.weights
        if dtype != self.dtype and self.encoded is not None:  # another dtype: decoded from the stored bytes
            return self._decoded(ids, dtype)
        if ids and not copy and dtype == self.dtype and ids == list(range(ids[0], ids[-1] + 1)):
            a, b = ids[0], ids[-1] + 1
            return ExpertWeights(list(ids), *(t[a:b] for t in w.parts))
        src = w.parts  # (biases included, where the experts have them)
        out = [torch.empty((len(ids), *t.shape[1:]), dtype=dtype, device=t.device) for t in src]
        for j, e in enumerate(ids):
            for d, s in zip(out, src):
                d[j].copy_(s[e])
        return ExpertWeights(list(ids), *out)
