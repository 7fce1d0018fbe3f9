"""MXFP4 (OCP microscaling FP4) as gpt-oss releases store it: pure encode / decode functions, no I/O.

Format: the last axis of a weight is cut into blocks of 32 values. Each value is an FP4 E2M1 code (1 sign bit, 2
exponent bits, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6); two codes share a byte, the EARLIER element in
the LOW nibble. Each block has one shared power-of-two scale stored as a biased exponent byte (E8M0): value =
e2m1 * 2 ** (scale - 127).

    blocks: uint8 [..., G, 16]   (G = K / 32 blocks of 16 bytes = 32 codes)
    scales: uint8 [..., G]
    values: [..., G * 32]        (= [..., K])

Orientation in the gpt-oss MXFP4 release (the convention the checkpoint reader and writer follow): the packed
tensors are OUTPUT-major, the transpose of the bf16 parameters transformers holds:

    mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32]
        decode -> [E, 2I, H]; the logical `mlp.experts.gate_up_proj` [E, H, 2I] is its transpose(-1, -2)
    mlp.experts.down_proj_blocks    [E, H, I/32, 16],  down_proj_scales    [E, H, I/32]
        decode -> [E, H, I];  the logical `mlp.experts.down_proj` [E, I, H] is its transpose(-1, -2)

so the 32-value blocks run along the INPUT dimension (H for gate_up, I for down), and the gate/up interleave of
gate_up (gate at 0::2, up at 1::2 of the 2I axis) is along the rows of the packed tensor. To write a logical
[E, in, out] tensor back, encode its transpose(-1, -2) (contiguous): `encode_mxfp4(w.transpose(-1, -2))`.

Decoding matches transformers' dequantisation (integrations/mxfp4.py) bit for bit: the code's value times
2 ** (scale - 127) is computed in float32 and rounded once to the target dtype. Encoding picks, per block, the
smallest exponent whose scale brings the block's largest magnitude within E2M1's 6.0, then rounds every value to
the nearest E2M1 value (ties to the even code); re-encoding decoded values gives them back exactly.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per shared scale
SCALE_BIAS = 127  # E8M0 exponent bias
E2M1_MAX = 6.0
# magnitudes of the codes 0..7; code | 8 is the same magnitude negated
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between neighbouring magnitudes, and whether a tie there rounds up: a tie goes to the even code
# (mantissa bit 0), as IEEE round-half-to-even does
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _code_table(device: torch.device | str) -> torch.Tensor:
    """float32 value of each of the 16 codes (index = code)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 blocks [..., G, 16] and scales [..., G] -> values [..., G * 32] in `dtype` (see the module doc)."""
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"([..., G, {BLOCK // 2}] and [..., G])")
    table = _code_table(blocks.device)
    b = blocks.to(torch.uint8)
    low = table[(b & 0x0F).long()]  # element 2j of the block
    high = table[(b >> 4).long()]  # element 2j + 1
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]
    del low, high
    exponent = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponent.unsqueeze(-1))  # float32, as transformers computes it
    return values.flatten(-2).to(dtype)


def shared_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 exponent k per block: the smallest with amax <= 6 * 2**k, clamped to E8M0's finite range [-127, 127].

    With amax = m * 2**e (frexp, m in [0.5, 1)): amax / 2**(e - 3) = 8m fits 6.0 iff m <= 0.75, and
    amax / 2**(e - 2) = 4m always fits; exact, no division or logarithm to round."""
    m, e = torch.frexp(amax.float())
    k = torch.where(m <= 0.75, e - 3, e - 2)
    return k.clamp(-SCALE_BIAS, SCALE_BIAS).to(torch.int32)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 code (0..15) of the E2M1 value nearest to each element of float32 `x` (already scaled; magnitudes
    beyond 6 saturate to 6)."""
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, tie_up in _MIDPOINTS:
        code += (mag >= mid if tie_up else mag > mid).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values w [..., K] (K a multiple of 32, finite) -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32])."""
    k = w.shape[-1]
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {k}")
    x = w.float().reshape(*w.shape[:-1], k // BLOCK, BLOCK)
    exponent = shared_exponents(x.abs().amax(dim=-1))
    codes = e2m1_codes(torch.ldexp(x, -exponent.unsqueeze(-1)))  # power-of-two scaling: exact
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # earlier element in the low nibble
    return blocks.contiguous(), (exponent + SCALE_BIAS).to(torch.uint8)
