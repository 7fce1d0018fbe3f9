"""The values the output holds for a merged expert: what the engine must run so that it runs what is written.

A merged expert is computed in float32 and written in the encoding of the tensors it replaces (bf16, FP8 with fresh
block scales, MXFP4, bnb 4-bit) or the one the output format asks for. The sequential pass and the guard run it
after that rounding, so their numbers are those of the written model; the encoders' fresh scales are chosen so
that writing these values again reproduces them (checkpoint/fp8.py), which `write_layer` does.
"""

from __future__ import annotations

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.output_format import OutputFormat


def merged_as_written(
    layout: ModelLayout, layer: int, centroid: int, tensors: tuple[torch.Tensor, ...], output: OutputFormat | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """`tensors` (gate, up, down of the expert merged into `centroid`) as the output will hold them, on the host:
    in the stored dtype for plain tensors, in `dtype` (the compute dtype) for encoded ones."""
    output = output or OutputFormat()
    r = layout.reader
    tensors = tuple(t.to("cpu") for t in tensors)
    if layout.layers[layer].expert_storage == "per_expert":
        # (the quantize decision depends on the output name only through the key pattern, the same at any position)
        names = layout.per_expert_keys(layer, centroid)
        return tuple(output.readback(t, r.entry(k), k, dtype) for t, k in zip(tensors, names))
    gu_key, down_key = layout.fused_keys(layer)
    g, u, d = tensors[:3]
    gu_like, down_like = r.entry(gu_key), r.entry(down_key)
    inter = g.shape[0]
    gu = output.readback(torch.cat([g, u])[None], _one(gu_like), gu_key, dtype)[0]
    down = output.readback(d[None], _one(down_like), down_key, dtype)[0]
    return (gu[:inter], gu[inter:], down, *tensors[3:])


def _one(like):
    """`like` for one expert's slab of a fused tensor (shape [1, ...]): encoders need only the per-expert shape."""
    from dataclasses import replace

    return replace(like, shape=(1, *like.shape[1:]))
