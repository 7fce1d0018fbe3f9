"""Fused expert tensors as a family stores them <-> the engine's canonical per-expert layout.

Canonical (`engine.experts.ExpertWeights`): gate / up [n, I, H] and down [n, H, I] (nn.Linear orientation, y = W x),
biases gate / up [n, I] and down [n, H]. On disk a fused family keeps `gate_up_proj` with gate and up along one
2I axis and `down_proj`, either output-major ([E, 2I, H] / [E, H, I], transformers' default) or input-major
(`ArchSpec.fused_input_major`: [E, H, 2I] / [E, I, H], y = x @ W, as Llama-4 and gpt_oss hold them). Along the 2I
axis gate and up are either two halves (gate then up) or interleaved (`ArchSpec.fused_interleaved`, gpt_oss:
gate at 0::2, up at 1::2); a gate_up bias [E, 2I] (`ArchSpec.fused_bias_names`) is laid out like that axis.

DBRX keeps gate, up and down as three tensors (`ArchSpec.fused_up`), each flattened along dim 0 ([E * I, H]), its down
projection input-major while gate and up are not (`ArchSpec.fused_down_input_major`); a "slab" is one expert's part
of a fused tensor ([2I, H], or [I, H] for a flattened one: `ModelLayout.fused_rows`).

Everything here keeps the leading expert dimension, so one function serves a chunk of experts and, with `[None]`,
one expert; every split is a view and every join a fresh tensor, so a round trip gives the stored values back.
"""

from __future__ import annotations

import torch

from ream_lite.arch.spec import ArchSpec


def gate_up_dims(spec: ArchSpec, shape: tuple[int, ...]) -> tuple[int, int]:
    """(I, H) of one expert's slab of the stored fused gate_up_proj, `shape` [2I, H] (or [H, 2I] input-major; the
    gate alone, [I, H], where the up projection is its own tensor: `ArchSpec.fused_up`)."""
    rows, cols = shape
    if spec.fused_input_major:
        rows, cols = cols, rows
    return (rows if spec.fused_up else rows // 2), cols


def input_major_from_shapes(gate_up: tuple[int, ...], down: tuple[int, ...], hidden: int) -> bool | None:
    """Whether stored fused experts of these shapes are input-major ([E, H, 2I] / [E, I, H]) or output-major
    ([E, 2I, H] / [E, H, I]), given the hidden size H; None if the shapes fit neither (or both: never, since the
    down projection's I != H whenever 2I == H)."""
    if len(gate_up) != 3 or len(down) != 3:
        return None
    output_major = gate_up[2] == hidden and down[1] == hidden and gate_up[1] == 2 * down[2]
    input_major = gate_up[1] == hidden and down[2] == hidden and gate_up[2] == 2 * down[1]
    return None if output_major == input_major else input_major


def split_pairs(spec: ArchSpec, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a tensor whose dim 1 is the fused 2I axis ([n, 2I, H] weights or [n, 2I] biases)."""
    if spec.fused_interleaved:
        return t[:, 0::2], t[:, 1::2]
    inter = t.shape[1] // 2
    return t[:, :inter], t[:, inter:]


def join_pairs(spec: ArchSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_pairs`: gate and up ([n, I, ...] each) along one 2I axis at dim 1."""
    if spec.fused_interleaved:  # row 2p = gate[p], row 2p + 1 = up[p]
        return torch.stack([gate, up], dim=2).flatten(1, 2)
    return torch.cat([gate, up], dim=1)


def split_gate_up(spec: ArchSpec, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored gate_up_proj slabs [n, ...] -> canonical (gate, up), each [n, I, H] (views)."""
    return split_pairs(spec, gu.transpose(1, 2) if spec.fused_input_major else gu)


def join_gate_up(spec: ArchSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Canonical gate, up [n, I, H] -> gate_up_proj slabs [n, ...] as the family stores them (contiguous)."""
    gu = join_pairs(spec, gate, up)
    return (gu.transpose(1, 2) if spec.fused_input_major else gu).contiguous()


def split_one(spec: ArchSpec, t: torch.Tensor) -> torch.Tensor:
    """A separately stored gate or up projection's slabs [n, ...] (`ArchSpec.fused_up`) -> canonical [n, I, H]."""
    return t.transpose(1, 2) if spec.fused_input_major else t


def join_one(spec: ArchSpec, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_one` (contiguous)."""
    return split_one(spec, t).contiguous()


def split_down(spec: ArchSpec, down: torch.Tensor) -> torch.Tensor:
    """Stored down_proj slabs [n, ...] -> canonical [n, H, I] (a view)."""
    return down.transpose(1, 2) if spec.down_input_major else down


def join_down(spec: ArchSpec, down: torch.Tensor) -> torch.Tensor:
    """Canonical down [n, H, I] -> down_proj rows [n, ...] as stored (contiguous)."""
    return split_down(spec, down).contiguous()  # (a transpose is its own inverse)


def stored_slab(spec: ArchSpec, expert: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """One expert in canonical form (gate, up, down[, gate_bias, up_bias, down_bias], no leading dim) -> its slab of
    the n-th fused tensor, in the order of `ModelLayout.fused_keys` (gate_up or gate, down[, up]) then
    `fused_bias_keys` (contiguous)."""
    if n == 0:
        if spec.fused_up:
            return join_one(spec, expert[0][None])[0]
        return join_gate_up(spec, expert[0][None], expert[1][None])[0]
    if n == 1:
        return join_down(spec, expert[2][None])[0]
    if spec.fused_up and n == 2:
        return join_one(spec, expert[1][None])[0]
    if n == 2:
        return join_pairs(spec, expert[3][None], expert[4][None])[0].contiguous()
    return expert[5].contiguous()


def stored_slabs(spec: ArchSpec, expert: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Every `stored_slab` of one expert (the bias slabs where the family's experts have biases)."""
    return [stored_slab(spec, expert, n) for n in range(4 if spec.fused_bias_names else 3 if spec.fused_up else 2)]


def canonical_expert(spec: ArchSpec, slabs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Inverse of `stored_slabs`: one expert's stored slabs -> (gate, up, down[, biases]) in canonical form."""
    if spec.fused_up:
        gate, up, down = (split_one(spec, slabs[0][None]), split_one(spec, slabs[2][None]),
                          split_down(spec, slabs[1][None]))
        return gate[0], up[0], down[0]
    g, u = split_gate_up(spec, slabs[0][None])
    out = (g[0], u[0], split_down(spec, slabs[1][None])[0])
    if spec.fused_bias_names:
        gb, ub = split_pairs(spec, slabs[2][None])
        out += (gb[0], ub[0], slabs[3])
    return out
