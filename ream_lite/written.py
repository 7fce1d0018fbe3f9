"""The values the output holds for a merged expert: what the engine must run so that it runs what is written.

A merged expert is computed in float32 and written in the encoding of the tensors it replaces (bf16, FP8 with fresh
block scales, MXFP4, bnb 4-bit) or the one the output format asks for. The sequential pass and the guard run it
after that rounding, so their numbers are those of the written model; the encoders' fresh scales are chosen so
that writing these values again reproduces them (checkpoint/fp8.py), which `write_layer` does.
"""

from __future__ import annotations

import torch

from ream_lite.arch import fused
from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.output_format import OutputFormat


def merged_as_written(
    layout: ModelLayout, layer: int, centroid: int, position: int, tensors: tuple[torch.Tensor, ...],
    output: OutputFormat | None, dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """`tensors` (gate, up, down[, biases] of the expert merged into `centroid`, written at `position` among the
    kept experts) as the output will hold them, on the host: in the stored dtype for plain tensors, in `dtype` (the
    compute dtype) for encoded ones.

    Exact for every encoding ream-lite writes except bnb 4-bit with double quant (nested absmax), whose re-encoding
    of decoded values is not idempotent: there the written expert differs from the one run in a few percent of its
    values, by up to ~0.3% of a block's largest magnitude (measured on one 64 x 128 weight)."""
    output = output or OutputFormat()
    r = layout.reader
    tensors = tuple(t.to("cpu") for t in tensors)
    if layout.layers[layer].expert_storage == "per_expert":
        # encoded like the centroid's stored tensors, under the output's names (what --quantize decides by)
        likes, names = layout.per_expert_keys(layer, centroid), layout.per_expert_keys(layer, position)
        return layout.canonical_parts(tuple(output.readback(t, r.entry(o), k, dtype)
                                            for t, o, k in zip(layout.stored_parts(tensors), likes, names)))
    # each fused tensor's slab as the family stores it (orientation, gate/up interleave, biases: arch/fused.py),
    # read back as written, then unpacked into the canonical layout again
    spec = layout.spec
    keys = [*layout.fused_keys(layer), *layout.fused_bias_keys(layer)]
    slabs = [output.readback(fused.stored_slab(spec, tensors, n)[None], _one(r.entry(k), layout.fused_slab_shape(
        layer, k)), k, dtype)[0] for n, k in enumerate(keys)]
    return tuple(t.contiguous() for t in fused.canonical_expert(spec, slabs))


def _one(like, slab_shape: tuple[int, ...]):
    """`like` for one expert's slab of a fused tensor (shape [1, *slab]): encoders need only the per-expert shape."""
    from dataclasses import replace

    return replace(like, shape=(1, *slab_shape))
