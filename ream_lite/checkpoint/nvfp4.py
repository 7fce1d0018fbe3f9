"""NVFP4 (NVIDIA's 4-bit floating point for Blackwell) as llm-compressor and ModelOpt release it: pure encode /
decode functions, no I/O.

A weight [out, in] is cut along `in` into blocks of 16 values. Each value is an FP4 E2M1 code (as MXFP4's: two
codes a byte, the earlier element in the LOW nibble); each block has an FP8 E4M3 scale; the whole tensor one float32
scale on top. The two releases store the same numbers under other names and the tensor scale inverted:

    compressed-tensors "nvfp4-pack-quantized" (llm-compressor):
        X.weight_packed U8 [out, in/2], X.weight_scale F8_E4M3 [out, in/16], X.weight_global_scale F32 [1]
        value = e2m1 * (weight_scale / weight_global_scale)
        (+ X.input_global_scale F32 [1], the activations' tensor scale, when activations are quantized too)
    ModelOpt NVFP4:
        X.weight U8 [out, in/2], X.weight_scale F8_E4M3 [out, in/16], X.weight_scale_2 F32 [] or [1]
        value = e2m1 * weight_scale * weight_scale_2          (weight_scale_2 = 1 / global scale)
        (+ X.input_scale F32, the activations' scale, inverted likewise)

Decoding follows compressed-tensors' own (`NVFP4PackedCompressor.decompress`): the block scale divided by the tensor
scale in float32, times the code's value, rounded once to the target dtype (bit for bit its result; tested against
it where the package is installed). Encoding takes the tensor scale it is given (so gate and up projections keep the
one scale their fused kernels need) and computes each block's scale as compressed-tensors does: global * amax / 6,
rounded to E4M3 (clamped to its 448, an all-zero block's scale set to E4M3's eps); values round to the nearest E2M1
value, ties to the even code.
"""

from __future__ import annotations

import torch

from ream_lite.checkpoint.mxfp4 import _code_table, e2m1_codes

BLOCK = 16  # values per FP8 block scale
FP8_MAX = 448.0  # largest E4M3 value
E2M1_MAX = 6.0
FP8_EPS = torch.finfo(torch.float8_e4m3fn).eps  # what a zero block scale becomes (compressed-tensors' rule)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> the float32 E2M1 values [..., n]."""
    table = _code_table(packed.device)
    b = packed.to(torch.uint8)
    return torch.stack([table[(b & 0x0F).long()], table[(b >> 4).long()]], dim=-1).flatten(-2)


def decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor, inverted: bool,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values [..., out, in] of packed [..., out, in/2], E4M3 block scales [..., out, in/16] and the float32 tensor
    scale (compressed-tensors' global scale, divided by; `inverted`: ModelOpt's weight_scale_2, multiplied by)."""
    values = unpack(packed)
    *lead, rows, n = values.shape
    if tuple(block_scale.shape) != (*lead, rows, n // BLOCK):
        raise ValueError(f"NVFP4 codes {tuple(packed.shape)} and block scales {tuple(block_scale.shape)} do not "
                         f"match ([.., out, in/2] and [.., out, in/{BLOCK}])")
    ts = tensor_scale.float().reshape(-1)[0]
    scale = block_scale.float() * ts if inverted else block_scale.float() / ts
    w = values.view(*lead, rows, n // BLOCK, BLOCK) * scale.unsqueeze(-1)
    return w.reshape(*lead, rows, n).to(dtype)


def global_scale(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' tensor scale for `w`: 448 * 6 / amax(|w|), float32 [1] (1.0 for an all-zero tensor)."""
    amax = w.float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    g = FP8_MAX * E2M1_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def encode_nvfp4(w: torch.Tensor, tensor_scale: torch.Tensor, inverted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Values w [..., out, in] (in a multiple of 16) -> (codes uint8 [..., out, in/2], E4M3 block scales
    [..., out, in/16]) under the given tensor scale (as stored: compressed-tensors' global scale, or with `inverted`
    ModelOpt's weight_scale_2)."""
    n = w.shape[-1]
    if n % BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {BLOCK}, got {n}")
    ts = tensor_scale.float().reshape(-1)[0]
    g = 1.0 / ts if inverted else ts
    x = w.float().reshape(*w.shape[:-1], n // BLOCK, BLOCK)
    s = (g * x.abs().amax(dim=-1) / E2M1_MAX).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, FP8_EPS), s)
    codes = e2m1_codes(x / (s / g).unsqueeze(-1))
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.reshape(*w.shape[:-1], n // 2).contiguous(), s.to(torch.float8_e4m3fn)
