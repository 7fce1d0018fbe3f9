"""FP8 block-scaled weights (DeepSeek-V3, Kimi-K2, Qwen3 FP8, GLM FP8): decode and encode.

A weight W [..., R, C] is stored as `float8_e4m3fn` values Q with a float32 `weight_scale_inv` S of shape
[..., ceil(R / br), ceil(C / bc)]: every br x bc block of W (the last one cropped) is Q * S[block]. The scale is
named `_inv` because the quantizer divided by its inverse; decoding multiplies. Leading dimensions (fused experts,
[E, R, C]) each carry their own scales.

Fresh scales are powers of two (the block's absolute maximum rounded up to 2^k * 448, as DeepSeek-V3.1's UE8M0
scales are): then a decoded value Q * 2^k is exact in float32 and in bfloat16, and encoding the decoded values again
gives them back unchanged, so what the engine runs after a merge is exactly what is written (encode is idempotent on
its own output).
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale tensor of a weight of `shape` with blocks `block`."""
    *lead, r, c = shape
    return (*lead, math.ceil(r / block[0]), math.ceil(c / block[1]))


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int], row0: int = 0) -> torch.Tensor:
    """The per-element scale of a [.., rows, cols] slice starting at row `row0` of the blocked tensor (the scale
    rows given start at block row0 // br)."""
    s = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    off = row0 % block[0]
    return s[..., off : off + rows, :cols]


def decode(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
           row0: int = 0) -> torch.Tensor:
    """Q * S in float32, cast to `dtype` (`row0`: the first row of `q` within the stored tensor, when `q` is a row
    slice of a 2-D weight and `scale` the scale rows covering it)."""
    w = q.float()
    w.mul_(_expand(scale.float(), q.shape[-2], q.shape[-1], block, row0))
    return w if dtype == torch.float32 else w.to(dtype)


def encode(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, power_of_two: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q float8_e4m3fn, S float32) with power-of-two block scales; decode(Q, S) approximates w within FP8's
    relative step (2^-4 of each value, rounding to nearest) and reproduces w exactly where w = decode(...).
    `power_of_two=False`: scale = the block's absolute maximum / 448, as the DeepSeek-V3 / Qwen3-FP8 releases are
    quantized (their values do not decode exactly into bf16; ream-lite's tests make such releases with it)."""
    *lead, r, c = w.shape
    br, bc = block
    pr, pc = -r % br, -c % bc
    x = w.float()
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    nr, nc = (r + pr) // br, (c + pc) // bc
    blocks = x.reshape(*lead, nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nr, nc]
    # an all-zero block gets scale 1 (any scale decodes zeros to zeros)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if power_of_two:  # the smallest 2^k with amax / 2^k <= 448
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, nr * br, nc * bc)[..., :r, :c].contiguous()
    return q, scale.float().contiguous()
