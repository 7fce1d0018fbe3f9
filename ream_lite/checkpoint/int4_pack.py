"""compressed-tensors "pack-quantized" INT4 weights (W4A16: symmetric group quantization), as Kimi-K2-Thinking,
Kimi-K2.5 / K2.6 and llm-compressor's W4A16 releases store them: pure encode / decode functions, no I/O.

A weight [out, in] is cut along `in` into groups (32 values in the Kimi releases). Each value is a signed 4-bit
integer q in [-8, 7]; each group has one scale in the weight's float dtype (bf16); the value is q * scale. On disk:

    X.weight_packed  I32 [out, in/8]   eight codes per int32, code i at bits 4i..4i+3, stored as q + 8
    X.weight_scale   BF16 [out, in/group]
    X.weight_shape   I32 / I64 [2]     the unpacked shape

Decoding is compressed-tensors' own (`PackedQuantizationCompressor.decompress`): q cast to the scale's dtype, times
the scale in that dtype, then cast (bit for bit its result; tested against it where the package is installed).
Encoding is its compressor's on a weight in the scale's dtype: scale = amax(|w|) / 7.5 per group computed in that
dtype (an all-zero group's scale is the dtype's eps), q = round(w / scale) (ties to even) clamped to [-8, 7]; or, for
the merged and refit experts ream-lite writes, the scale among amax / d (d in 5..8) with the least squared error.
Asymmetric schemes (a `weight_zero_point`) are not read.
"""

from __future__ import annotations

import sys

import torch

PACK = 8  # codes per int32
Q_MIN, Q_MAX = -8, 7
HALF_RANGE = 7.5  # (Q_MAX - Q_MIN) / 2: compressed-tensors' symmetric scale divisor


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError("INT4 pack-quantized codes are read and written on little-endian hosts only")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> int8 codes [..., n] in [-8, 7]."""
    _require_little_endian()
    b = packed.contiguous().view(torch.uint8)  # four bytes a word, least significant first
    nib = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)  # code 2j in the low nibble of byte j
    return nib.to(torch.int8) - 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., n] in [-8, 7] (n a multiple of 8) -> int32 [..., n/8]."""
    _require_little_endian()
    if q.shape[-1] % PACK:
        raise ValueError(f"INT4 packing needs a multiple of {PACK} values per row, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()
    return b.view(torch.int32)


def decode_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values [..., out, in] of packed codes [..., out, in/8] and group scales [..., out, in/group]."""
    q = unpack_int4(packed)
    *lead, rows, n = q.shape
    groups = scale.shape[-1]
    if tuple(scale.shape[:-1]) != (*lead, rows) or groups == 0 or n % groups:
        raise ValueError(f"INT4 codes {tuple(packed.shape)} and scales {tuple(scale.shape)} do not match "
                         "([.., out, in/8] and [.., out, in/group])")
    w = q.to(scale.dtype).view(*lead, rows, groups, n // groups) * scale.unsqueeze(-1)
    return w.reshape(*lead, rows, n).to(dtype)


# divisors of a group's absolute maximum tried by the least-squares scale search (`encode_int4(search=True)`): 7.5 is
# compressed-tensors' rule; larger ones use the code -8 for the largest magnitude, smaller ones clip outliers
SEARCH_DIVISORS = tuple(5.0 + 0.125 * i for i in range(25))  # 5.0 .. 8.0


def encode_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.bfloat16, search: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int32 codes [..., out, in/8], scales [..., out, in/group] in `scale_dtype`) of `w` [..., out, in],
    as compressed-tensors compresses a weight held in `scale_dtype` (scale = amax / 7.5). `search`: each group's scale
    is instead the one, among amax / d for d in SEARCH_DIVISORS (each rounded to `scale_dtype`), whose codes give
    the least squared error against `w` in float32 (compressed-tensors' own scale on a tie): what ream-lite writes
    for merged and refit experts, whose values no release scale was chosen for."""
    *lead, rows, n = w.shape
    if n % group:
        raise ValueError(f"INT4 groups of {group} do not divide rows of {n} values")
    x = w.to(scale_dtype).reshape(*lead, rows, n // group, group)
    eps = torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype, device=w.device)
    amax = x.abs().amax(-1)

    def codes(divisor: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = amax / divisor
        scale = torch.where(scale == 0, eps, scale)
        return torch.round(torch.clamp(x / scale.unsqueeze(-1), Q_MIN, Q_MAX)), scale

    q, scale = codes(HALF_RANGE)
    if search:
        target = w.float().reshape(x.shape)

        def error(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # (of the values decode_int4 gives)
            return ((q.to(scale_dtype) * scale.unsqueeze(-1)).float() - target).pow(2).sum(-1)

        best = error(q, scale)
        for d in SEARCH_DIVISORS:
            if d == HALF_RANGE:
                continue
            q_d, scale_d = codes(d)
            err = error(q_d, scale_d)
            better = err < best
            q = torch.where(better.unsqueeze(-1), q_d, q)
            scale = torch.where(better, scale_d, scale)
            best = torch.minimum(err, best)
    return pack_int4(q.to(torch.int8).reshape(*lead, rows, n)), scale
