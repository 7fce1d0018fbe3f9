"""llama.cpp (GGML) quantization blocks as torch codecs: `decode` raw GGUF rows to floats, `encode` floats to rows.

A GGUF tensor row of `cols` values is `cols / block` blocks laid end to end, each a fixed number of bytes
(`gguf.GGML_QUANT_SIZES`); all multi-byte fields are little-endian, `fp16` is an IEEE half. The layouts
(ggml-common.h), in byte order:

    Q4_0  (32 values, 18 B)  d fp16 | qs[16]             x[j] = (nib - 8) * d; byte j holds x[j] low, x[j+16] high
    Q4_1  (32, 20)           d, m fp16 | qs[16]          x = nib * d + m
    Q5_0  (32, 22)           d | qh u32 | qs[16]         5th bit of x[j] is qh bit j; x = (q - 16) * d
    Q5_1  (32, 24)           d, m | qh u32 | qs[16]      x = q * d + m
    Q8_0  (32, 34)           d | qs int8[32]             x = q * d
    MXFP4 (32, 17)           e E8M0 | qs[16]             x = kvalues[nib] * 2**(e-128), kvalues = 2 * E2M1 values;
                                                         byte j holds x[j] low and x[j+16] high (not interleaved)
    Q2_K  (256, 84)          scales[16] (4-bit sc | 4-bit min << 4) | qs[64] 2-bit | d, dmin fp16
    Q3_K  (256, 110)         hmask[32] | qs[64] 2-bit | scales[12] 16 x 6-bit | d fp16     x = d * (sc - 32) * q
    Q4_K  (256, 144)         d, dmin | scales[12] 8 x (6-bit sc, 6-bit min) | qs[128]     x = d*sc*q - dmin*m
    Q5_K  (256, 176)         d, dmin | scales[12] | qh[32] | qs[128]
    Q6_K  (256, 210)         ql[128] | qh[64] | scales int8[16] | d fp16                  x = d * sc * (q - 32)

Decoding is exact float32 arithmetic in the C code's operation order, so `decode` equals llama.cpp's
`dequantize_row_*` (and gguf-py's numpy port) bit for bit, then rounds once to `dtype`.

Encoding reproduces llama.cpp's reference quantizers `quantize_row_<type>_ref` (ggml-quants.c), which is what
`llama-quantize` runs when no importance matrix is given and what gguf-py ports to numpy. Every float32 operation
of the C code is done as one torch float32 operation in the same order: each `sum += a*b` over a block is a
sequential loop over the positions in the block (vectorised across all blocks; torch's own reductions would
re-associate); `c / t` is one division (Python's `c / tensor` is a reciprocal times c, and CUDA turns
`tensor / scalar` into a reciprocal product, so constants are passed as tensors); sqrtf goes through float64
(torch's vectorised float32 sqrt on CPU is not correctly rounded); `nearest_int` is the `+ 12582912.f` trick
(round half to even, NaN and overflow included), `roundf` rounds half away from zero, fp16 fields round to nearest
even as GGML_FP32_TO_FP16 does, BF16 is ggml_compute_fp32_to_bf16's bit formula, and MXFP4's floorf(log2f(amax))
uses the correctly rounded log2 (computed in float64, rounded to float32). The K-quants' searches
(make_qkx2_quants for Q2_K/Q4_K/Q5_K with its running min updates, make_qx_quants for Q6_K, make_q3_quants'
greedy passes for Q3_K) keep their iteration order and their strict `<` / `>` tie rules; maxima and argmaxes take
the first extreme and skip NaNs, as the C loops do.

benchmarks/ggml_oracle.py compiles ggml-quants.c and compares: 0 differing bytes for every encodable type on
normal, outlier, zero, tiny, subnormal, bf16-grid, tie, constant, mixed-magnitude, power-of-two and real-shaped
rows, and even at float32's extremes. What can break equality is how the C side was compiled. ggml-base gets no
-march flags, so x86-64 builds (and MSVC) never fuse `a*b + c`: that is the reference matched here. A compiler
that contracts to FMA (GCC's default -ffp-contract=fast on an FMA target such as aarch64, clang's
-ffp-contract=on, e.g. Apple silicon) rounds some products once instead of twice, and llama.cpp's own output then
differs from its x86 output. The oracle builds such a variant (-mfma -ffp-contract=fast); on bf16 rows shaped like
Qwen3-30B-A3B experts it differs from the x86 reference (and so from `encode`) in ~30% of Q2_K and Q5_K
super-blocks, ~6% of Q4_K, ~2.5% of Q3_K, ~1% of Q6_K, ~0.2% of Q4_0/Q5_0 blocks and never for Q4_1, Q5_1, Q8_0,
MXFP4: a different but equally good choice of scale (reconstruction error within ~1%). Inputs with NaN or inf are
refused for the block types (the C code's output is then garbage); values are converted to float32 first, as
llama.cpp does.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ream_lite.errors import ReamLiteError

__all__ = ["DEVICE_DECODABLE", "ENCODABLE", "decode", "encode", "row_bytes"]

# ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this is stored as zeros
_GROUP_MAX_EPS = 1e-15
# values per chunk of encode/decode. On CPU small, so that a chunk's temporaries (the K-quant searches hold ~10
# copies) stay in cache; on an accelerator large, so that the ~2000 kernel launches of a K-quant chunk amortise
_CHUNK_VALUES_CPU = 1 << 18
_CHUNK_VALUES_DEVICE = 1 << 23

# kvalues_mxfp4 (ggml-common.h): E2M1 magnitudes doubled, so the scale is 2**(e - 128)
_KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _qtype(qtype: Q | int) -> Q:
    try:
        return Q(int(qtype))
    except ValueError:
        raise ReamLiteError(f"unknown GGML quantization type {qtype!r}") from None


def row_bytes(qtype: Q | int, cols: int) -> int:
    """Bytes of one row of `cols` values of `qtype`."""
    q = _qtype(qtype)
    if q not in GGML_QUANT_SIZES:
        raise ReamLiteError(f"GGML type {q.name} has no known block size")
    block, size = GGML_QUANT_SIZES[q]
    if cols % block:
        raise ReamLiteError(f"a row of {cols} values cannot be stored as {q.name}: it needs a multiple of {block}")
    return cols // block * size


# ---------------------------------------------------------------------------------------------------------------
# bit-level helpers shared by both directions


def _f32(x: float) -> float:
    """The float32 value of a C float constant expression, as a Python float (exactly representable)."""
    return float(np.float32(x))


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    # a real IEEE division: torch's CUDA kernel replaces division by a Python/CPU scalar with a reciprocal
    # product, which rounds differently from the C code's `x / 127.f`
    return a / torch.tensor(b, dtype=torch.float32, device=a.device)


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t as one IEEE division (Python's `c / t` on a tensor is `t.reciprocal() * c`: two roundings)."""
    return torch.full_like(t, c) / t


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5 * 2**23 and read the mantissa, i.e. round half to even (int32)."""
    bits = (f + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _levels(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(f))) as float32, for f that is either non-finite or below 2**22 in magnitude
    (the searches' scaled values): there nearest_int is the float sum 1.5 * 2**23 + f taken back, and a NaN or
    infinity reads as -4194304, i.e. `lo`. Cheaper than _nearest_int and stays in float."""
    r = torch.nan_to_num((f + 12582912.0) - 12582912.0, nan=float(lo), posinf=float(lo), neginf=float(lo))
    return r.clamp_(lo, hi)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (torch.round is half to even). x - trunc(x) is exact for float32."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> uint8 [..., 2]: IEEE half, round to nearest even, as GGML_FP32_TO_FP16."""
    return x.contiguous().unsqueeze(-1).to(torch.float16).view(torch.uint8)


def _f16_bits(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 for whole tensors -> int16: torch's rounding for numbers; every NaN becomes the quiet
    NaN 0x7E00 with its sign, as ggml's bit-level conversion writes it (torch would keep payload bits)."""
    h = x.to(torch.float16).view(torch.int16)
    sign = (x.view(torch.int32) >> 16) & -0x8000  # 0 or the int16 sign bit
    return torch.where(torch.isnan(x), (sign | 0x7E00).to(torch.int16), h)


def _fp16_value(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [...] (exact)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16 as int32 0..65535: round to nearest even, NaNs forced quiet (not canonical)."""
    u = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 64, rounded).to(torch.int32)


def _u8(x: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t: keep the low byte."""
    return (x & 0xFF).to(torch.uint8)


def _first_absmax(x: torch.Tensor) -> torch.Tensor:
    """`float amax = 0, max = 0; for (...) if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` over the last axis:
    the first value of largest magnitude; a NaN never wins (torch's argmax would pick it) and 0 if nothing is."""
    a = torch.nan_to_num(x.abs(), nan=0.0, posinf=float("inf"))
    idx = a.argmax(dim=-1, keepdim=True)
    v = x.gather(-1, idx).squeeze(-1)
    return torch.where(a.gather(-1, idx).squeeze(-1) > 0, v, torch.zeros_like(v))


def _pos_max(t: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for (...) if (v > m) m = v;` over the last axis: +0 (never -0) when nothing is positive, and
    NaNs skipped (torch's amax would return them)."""
    m = torch.nan_to_num(t, nan=0.0, posinf=float("inf"), neginf=0.0).amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _seq_sum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the FIRST axis one element after another, as `float s = 0; for (...) s += t[i];` rounds."""
    acc = torch.zeros_like(t[0]) if start is None else start.clone()
    for row in t:
        acc.add_(row)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# decode


def _nibbles_lo_hi(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> int32 [..., 2n]: all low nibbles, then all high nibbles (the 32-block layout)."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def _bits_le(b: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 [..., nbits // 8] -> int32 [..., nbits]: bit i of the little-endian integer at index i."""
    shifts = torch.arange(8, device=b.device, dtype=torch.int32)
    return ((b.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :nbits]


def _kscales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for all 8 sub-blocks: uint8 [..., 12] -> (sc, m) int32 [..., 8]."""
    s = s.to(torch.int32)
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, m


def _dec_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    return (_nibbles_lo_hi(b[..., 2:18]) - 8).float() * d


def _dec_q4_1(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    m = _fp16_value(b[..., 2:4]).unsqueeze(-1)
    return _nibbles_lo_hi(b[..., 4:20]).float() * d + m


def _dec_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    q = _nibbles_lo_hi(b[..., 6:22]) | (_bits_le(b[..., 2:6], 32) << 4)
    return (q - 16).float() * d


def _dec_q5_1(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    m = _fp16_value(b[..., 2:4]).unsqueeze(-1)
    q = _nibbles_lo_hi(b[..., 8:24]) | (_bits_le(b[..., 4:8], 32) << 4)
    return q.float() * d + m


def _dec_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    return b[..., 2:34].contiguous().view(torch.int8).float() * d


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2**(e - 128) as float32, built from bits (e < 2 are subnormal)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e.clamp(max=1)), (e - 1) << 23)
    return bits.view(torch.float32)


def _dec_mxfp4(b: torch.Tensor) -> torch.Tensor:
    d = _e8m0_half(b[..., 0]).unsqueeze(-1)
    table = torch.tensor(_KVALUES_MXFP4, dtype=torch.float32, device=b.device)
    return table[_nibbles_lo_hi(b[..., 1:17]).long()] * d


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields of Q2_K/Q3_K: uint8 [..., 64] -> int32 [..., 256] in value order. Each 32-byte half covers
    128 values; shift 2j of byte l gives value 32j + l of that half."""
    q = qs.to(torch.int32).unflatten(-1, (2, 1, 32))
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).view(4, 1)
    return ((q >> shifts) & 3).flatten(-3)


def _dec_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[..., 0:16].to(torch.int32)
    d = _fp16_value(b[..., 80:82]).unsqueeze(-1)
    dmin = _fp16_value(b[..., 82:84]).unsqueeze(-1)
    dl = (d * (sc & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
    q = _crumbs(b[..., 16:80]).float().unflatten(-1, (16, 16))
    return (dl * q - ml).flatten(-2)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """The 16 6-bit scales of Q3_K: uint8 [..., 12] -> int32 [..., 16] (still biased by 32)."""
    s = s.to(torch.int32)
    low = torch.cat([s[..., 0:8] & 0x0F, s[..., 0:8] >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=s.device).view(4, 1)
    high = ((s[..., 8:12].unsqueeze(-2) >> shifts) & 3).flatten(-2)
    return low | (high << 4)


def _dec_q3_k(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 108:110]).unsqueeze(-1)
    dl = (d * (_q3_scales(b[..., 96:108]) - 32).float()).unsqueeze(-1)
    # hmask bit k of byte l is the high bit of value 32k + l; a clear bit means "subtract 4"
    high = _bits_le(b[..., 0:32], 256).unflatten(-1, (32, 8)).transpose(-1, -2).flatten(-2)
    q = (_crumbs(b[..., 32:96]) - 4 * (1 - high)).float()
    return (dl * q.unflatten(-1, (16, 16))).flatten(-2)


def _dec_q4_k(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    dmin = _fp16_value(b[..., 2:4]).unsqueeze(-1)
    sc, m = _kscales(b[..., 4:16])
    d1 = (d * sc.float()).unsqueeze(-1)
    m1 = (dmin * m.float()).unsqueeze(-1)
    q = b[..., 16:144].to(torch.int32).unflatten(-1, (4, 1, 32))
    q = torch.cat([q & 0x0F, q >> 4], dim=-2).flatten(-3, -2)  # [..., 8, 32]
    return (d1 * q.float() - m1).flatten(-2)


def _dec_q5_k(b: torch.Tensor) -> torch.Tensor:
    d = _fp16_value(b[..., 0:2]).unsqueeze(-1)
    dmin = _fp16_value(b[..., 2:4]).unsqueeze(-1)
    sc, m = _kscales(b[..., 4:16])
    d1 = (d * sc.float()).unsqueeze(-1)
    m1 = (dmin * m.float()).unsqueeze(-1)
    q = b[..., 48:176].to(torch.int32).unflatten(-1, (4, 1, 32))
    q = torch.cat([q & 0x0F, q >> 4], dim=-2).flatten(-3, -2)  # [..., 8, 32]
    high = _bits_le(b[..., 16:48], 256).unflatten(-1, (32, 8)).transpose(-1, -2)  # [..., 8, 32]: bit is of qh[l]
    return (d1 * (q | (high << 4)).float() - m1).flatten(-2)


def _dec_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[..., 0:128].to(torch.int32).unflatten(-1, (2, 2, 32))  # [half, ql[l] / ql[l+32], l]
    qh = b[..., 128:192].to(torch.int32).unflatten(-1, (2, 1, 32))
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-2)  # [..., 2, 4, 32]: values l, l+32, l+64, l+96
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)) - 32).flatten(-3).unflatten(-1, (16, 16))
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    d = _fp16_value(b[..., 208:210]).unsqueeze(-1)
    return ((d * sc).unsqueeze(-1) * q.float()).flatten(-2)


_BLOCK_DECODERS = {
    Q.Q4_0: _dec_q4_0, Q.Q4_1: _dec_q4_1, Q.Q5_0: _dec_q5_0, Q.Q5_1: _dec_q5_1, Q.Q8_0: _dec_q8_0,
    Q.MXFP4: _dec_mxfp4, Q.Q2_K: _dec_q2_k, Q.Q3_K: _dec_q3_k, Q.Q4_K: _dec_q4_k, Q.Q5_K: _dec_q5_k,
    Q.Q6_K: _dec_q6_k,
}
DEVICE_DECODABLE = frozenset({Q.F32, Q.F16, Q.BF16, *_BLOCK_DECODERS})


def _chunk_blocks(device: torch.device, block: int) -> int:
    return max(1, (_CHUNK_VALUES_CPU if device.type == "cpu" else _CHUNK_VALUES_DEVICE) // block)


def _check_raw(q: Q, raw: torch.Tensor, cols: int) -> int:
    nbytes = row_bytes(q, cols)
    if raw.dtype != torch.uint8:
        raise ReamLiteError(f"{q.name} data must be uint8 bytes, got {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] != nbytes:
        raise ReamLiteError(f"{q.name} rows of {cols} values take {nbytes} bytes, got shape {tuple(raw.shape)}")
    return nbytes


def decode(qtype: Q | int, raw: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 rows [..., row_bytes(qtype, cols)] -> values [..., cols] in `dtype`, on raw's device."""
    q = _qtype(qtype)
    _check_raw(q, raw, cols)
    lead = tuple(raw.shape[:-1])
    if q in (Q.F32, Q.F16, Q.BF16):
        view = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[q]
        return raw.contiguous().view(view).to(dtype)
    if q not in _BLOCK_DECODERS:
        return _decode_numpy(q, raw, cols, dtype)
    block, size = GGML_QUANT_SIZES[q]
    blocks = raw.contiguous().view(-1, size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
    step = _chunk_blocks(raw.device, block)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = _BLOCK_DECODERS[q](blocks[start:start + step]).to(dtype)
    return out.view(*lead, cols)


def _decode_numpy(q: Q, raw: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    # the IQ/TQ/... grids are large lookup tables; gguf-py's numpy dequantizer is the reference for them
    import gguf.quants

    try:
        values = gguf.quants.dequantize(raw.detach().cpu().numpy(), q)
    except NotImplementedError:
        raise ReamLiteError(f"GGML type {q.name} cannot be read: gguf-py has no dequantizer for it") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device=raw.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# encode: each function takes float32 blocks [N, block] and returns uint8 [N, type_size]


def _enc_q8_0(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1)
    d = _div(amax, 127.0)
    inv = torch.where(d != 0, _rdiv(1.0, d), torch.zeros_like(d))
    qs = _roundf(x * inv.unsqueeze(-1)).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs], dim=-1)


def _pack_lo_hi(q: torch.Tensor) -> torch.Tensor:
    """int32 [N, 2n] (values 0..15) -> uint8 [N, n]: value j low nibble, value j + n high nibble."""
    n = q.shape[-1] // 2
    return _u8((q[:, :n] & 0x0F) | ((q[:, n:] & 0x0F) << 4))


def _pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """int32 [N, 8k] of 0/1 -> uint8 [N, k]: bit i of the little-endian integer is element i."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    return _u8((bits.unflatten(-1, (-1, 8)) << shifts).sum(-1))


def _trunc_int(x: torch.Tensor) -> torch.Tensor:
    """C's float -> int conversion (toward zero), for values known to be in range."""
    return torch.trunc(x).to(torch.int32)


def _enc_q4_0_like(x: torch.Tensor, nmax: int, five: bool) -> torch.Tensor:
    mx = _first_absmax(x)
    d = _div(mx, -float(nmax))
    inv = torch.where(d != 0, _rdiv(1.0, d), torch.zeros_like(d))
    q = _trunc_int(x * inv.unsqueeze(-1) + (nmax + 0.5)).clamp(max=2 * nmax - 1)
    parts = [_fp16_bytes(d)]
    if five:
        parts.append(_pack_bits_le(q >> 4 & 1))
    return torch.cat([*parts, _pack_lo_hi(q)], dim=-1)


def _enc_q4_1_like(x: torch.Tensor, nmax: int, five: bool) -> torch.Tensor:
    mn = x.amin(dim=-1)
    mx = x.amax(dim=-1)
    d = _div(mx - mn, float(nmax))
    inv = torch.where(d != 0, _rdiv(1.0, d), torch.zeros_like(d))
    q = _trunc_int((x - mn.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5)
    if not five:
        q = q.clamp(max=15)  # Q5_1's C code has no MIN(31, .): its values cannot exceed 31.5
    parts = [_fp16_bytes(d), _fp16_bytes(mn)]
    if five:
        parts.append(_pack_bits_le(q >> 4 & 1))
    return torch.cat([*parts, _pack_lo_hi(q)], dim=-1)


def _enc_mxfp4(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1)
    # floorf(log2f(amax)): log2 of the float32 value in float64, rounded once to float32 as glibc's correctly
    # rounded log2f does; that rounding is what sends amax just below a power of two to the power itself
    lg = torch.log2(amax.double()).float()
    e = torch.where(amax > 0, torch.floor(lg) - 2 + 127, torch.zeros_like(lg))
    e = _u8(e.to(torch.int32))  # (uint8_t) of a negative float wraps on every ggml target; only amax < 2**-125
    d = _e8m0_half(e).unsqueeze(-1)
    # best_index_mxfp4: first index of the smallest |kvalues[i] * d - x|, strict `<`, in table order
    best = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    best_err = (0.0 * d - x).abs()
    for i, k in enumerate(_KVALUES_MXFP4[1:], start=1):
        err = (float(k) * d - x).abs()
        better = err < best_err
        best = torch.where(better, i, best)
        best_err = torch.where(better, err, best_err)
    return torch.cat([e.unsqueeze(-1), _pack_lo_hi(best)], dim=-1)


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants on position-major groups: x, w float32 [n, M] -> (scale [M], the_min [M], L int32 [n, M]).

    The search over nstep + 1 candidate scales fits scale and min by weighted least squares; later candidates are
    placed relative to the min of the best fit so far, so the candidates are visited in order."""
    mn = torch.minimum(x.amin(0), torch.zeros_like(x[0]))  # if (min > 0) min = 0;
    mn0 = mn
    mx = x.amax(0)
    sum_w = _seq_sum(w[1:], w[0])
    sum_x = _seq_sum(w[1:] * x[1:], w[0] * x[0])
    flat = mx == mn

    def err(scale: torch.Tensor, m: torch.Tensor, lf: torch.Tensor) -> torch.Tensor:
        diff = scale * lf + m - x
        diff = diff.abs() if use_mad else diff * diff
        return _seq_sum(w * diff)

    iscale = _rdiv(float(nmax), mx - mn)
    scale = _rdiv(1.0, iscale)
    L = _levels(iscale * (x - mn), 0, nmax)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        c = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _rdiv(c, mx - mn)
        lf = _levels(iscale * (x - mn), 0, nmax)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(torch.stack([wl, wl * lf, wl * x], dim=1))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        cur = err(this_scale, this_min, lf)
        take = (D > 0) & (cur < best)
        L = torch.where(take, lf, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L).to(torch.int32)
    return scale, -torch.where(flat, mn0, mn), L


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on position-major groups x [n, M] -> (scale, L in 0..2nmax-1).

    Tries iscale = -(nmax + 0.1 is) / max for is = -9..9 and keeps the one with the best x^2-weighted fit."""
    mx = _first_absmax(x.t())
    zero = mx.abs() < _GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lf = _levels(iscale * x, -nmax, nmax - 1)
        sumlx, suml2 = _seq_sum(torch.stack([wx * lf, (w * lf) * lf], dim=1))
        return lf, sumlx, suml2

    L, sumlx, suml2 = fit(_rdiv(-float(nmax), mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = _f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        l, sumlx, suml2 = fit(_rdiv(c, mx))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take, l, L)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, -nmax, L.to(torch.int32)) + nmax


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on position-major x [n, M] -> (scale, L in 0..2nmax-1).

    Greedy: up to 5 passes, each revisiting every position in order and accepting a changed level when it
    improves the fit. A pass that changes nothing leaves the state as it was, so running all 5 passes gives the
    C code's result even where it breaks out early."""
    n = x.shape[0]
    mx = _first_absmax(x.t())
    zero = mx.abs() < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    L = _nearest_int(_rdiv(-float(nmax), mx) * x).clamp(-nmax, nmax - 1)
    lf = L.float()
    sumlx, suml2 = _seq_sum(torch.stack([wx * lf, (w * lf) * lf], dim=1))
    for _ in range(5):
        for i in range(n):
            li = L[i].float()
            slx0 = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = _nearest_int((x[i] * sl2) / slx0).clamp(-nmax, nmax - 1)
            nf = new_l.float()
            slx = slx0 + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            take = (slx0 > 0) & (new_l != L[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(take, new_l, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, -nmax, L) + nmax


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, 256] -> position-major [n, N * 256 / n] (group g of block b is column b * (256 / n) + g)."""
    return x.reshape(-1, n).t().contiguous()


def _ungroup(t: torch.Tensor, per_block: int) -> torch.Tensor:
    """Inverse of _groups for per-group results: [n, M] -> [N, per_block, n], or [M] -> [N, per_block]."""
    if t.dim() == 1:
        return t.view(-1, per_block)
    return t.t().reshape(-1, per_block, t.shape[0])


def _pack_kscales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 (6-bit scale, 6-bit min) pairs -> the 12 bytes get_scale_min_k4 reads back. int32 [N, 8] -> uint8 [N, 12]."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return _u8(torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)],
                         dim=-1))


def _enc_q4_5_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared body of quantize_row_q4_K_ref / q5_K_ref: returns (header bytes [N, 16], L int32 [N, 256])."""
    xg = _groups(x, 32)  # [32, N*8]
    sum_x2 = _seq_sum(xg * xg)
    # through float64: torch's vectorised float32 sqrt on CPU is not correctly rounded (it differs from sqrtf in
    # ~1 of 6 values); the float64 root rounded to float32 is exactly sqrtf's result
    av_x = torch.sqrt(_div(sum_x2, 32.0).double()).float()
    w = av_x + xg.abs()
    scales, mins, L = _make_qkx2(xg, w, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins, L = _ungroup(scales, 8), _ungroup(mins, 8), _ungroup(L, 8)  # [N, 8], [N, 8, 32]
    max_scale = _pos_max(scales)
    max_min = _pos_max(mins)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    ls = (_nearest_int(inv_scale.unsqueeze(-1) * scales) & 0xFF).clamp(max=63)
    lm = (_nearest_int(inv_min.unsqueeze(-1) * mins) & 0xFF).clamp(max=63)
    d16 = _fp16_bytes(_div(max_scale, 63.0))
    dmin16 = _fp16_bytes(_div(max_min, 63.0))
    d = _fp16_value(d16).unsqueeze(-1) * ls.float()
    dm = _fp16_value(dmin16).unsqueeze(-1) * lm.float()
    requant = _nearest_int((x.view(-1, 8, 32) + dm.unsqueeze(-1)) / d.unsqueeze(-1)).clamp(0, nmax)
    L = torch.where((d != 0).unsqueeze(-1), requant, L)  # `if (!d) continue;` keeps the search's levels
    return torch.cat([d16, dmin16, _pack_kscales(ls, lm)], dim=-1), L.view(-1, 256)


def _enc_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _enc_q4_5_k(x, 15, -1.0, 20)
    q = L.view(-1, 4, 2, 32)
    return torch.cat([head, _u8(q[:, :, 0] | (q[:, :, 1] << 4)).flatten(1)], dim=-1)


def _enc_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _enc_q4_5_k(x, 31, -0.5, 15)
    q = L.view(-1, 4, 2, 32)
    ql = _u8((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).flatten(1)
    # qh[l] bit 2c is the 5th bit of value 64c + l, bit 2c + 1 that of 64c + 32 + l: bit k <-> sub-block k
    high = (L.view(-1, 8, 32) >> 4) & 1
    qh = _u8((high << torch.arange(8, device=x.device, dtype=torch.int32).view(8, 1)).sum(1))
    return torch.cat([head, qh, ql], dim=-1)


def _enc_q6_k(x: torch.Tensor) -> torch.Tensor:
    xg = _groups(x, 16)  # [16, N*16]
    scales, L = _make_qx(xg, 32)
    scales, L = _ungroup(scales, 16), _ungroup(L, 16)  # [N, 16], [N, 16, 16]
    mx = _first_absmax(scales)
    zero = mx.abs() < _GROUP_MAX_EPS
    iscale = _rdiv(-128.0, mx)
    d16 = _fp16_bytes(_rdiv(1.0, iscale))
    sc = _nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127)
    sc = ((sc & 0xFF) ^ 0x80) - 0x80  # int8_t
    d = _fp16_value(d16).unsqueeze(-1) * sc.float()
    requant = _nearest_int(x.view(-1, 16, 16) / d.unsqueeze(-1)).clamp(-32, 31) + 32
    L = torch.where((d != 0).unsqueeze(-1), requant, L).view(-1, 2, 4, 32)  # [N, half, k, l]: value 32k + l
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)],
                   dim=-1).flatten(1)
    qh = ((L >> 4) << torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.int32).view(4, 1)).sum(2).flatten(1)
    out = torch.cat([_u8(ql), _u8(qh), _u8(sc), d16], dim=-1)
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(out), out)  # memset(&y[i], 0, ...)


def _pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """int32 [N, 256] of 0..3 -> uint8 [N, 64]: byte l of half h holds values 128h + 32j + l at bits 2j."""
    q = L.view(-1, 2, 4, 32) << torch.tensor([0, 2, 4, 6], device=L.device, dtype=torch.int32).view(4, 1)
    return _u8(q.sum(2).flatten(1))


def _enc_q2_k(x: torch.Tensor) -> torch.Tensor:
    xg = _groups(x, 16)
    scales, mins, L = _make_qkx2(xg, xg.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = _ungroup(scales, 16), _ungroup(mins, 16), _ungroup(L, 16)
    max_scale = _pos_max(scales)
    max_min = _pos_max(mins)
    has_s = (max_scale > 0).unsqueeze(-1)
    has_m = (max_min > 0).unsqueeze(-1)
    ls = torch.where(has_s, _nearest_int(_rdiv(15.0, max_scale).unsqueeze(-1) * scales), 0) & 0xFF
    lm = torch.where(has_m, _nearest_int(_rdiv(15.0, max_min).unsqueeze(-1) * mins), 0)
    sc = (ls | (lm << 4)) & 0xFF
    d16 = _fp16_bytes(torch.where(has_s.squeeze(-1), _div(max_scale, 15.0), torch.zeros_like(max_scale)))
    dmin16 = _fp16_bytes(torch.where(has_m.squeeze(-1), _div(max_min, 15.0), torch.zeros_like(max_min)))
    d = _fp16_value(d16).unsqueeze(-1) * (sc & 0xF).float()
    dm = _fp16_value(dmin16).unsqueeze(-1) * (sc >> 4).float()
    requant = _nearest_int((x.view(-1, 16, 16) + dm.unsqueeze(-1)) / d.unsqueeze(-1)).clamp(0, 3)
    L = torch.where((d != 0).unsqueeze(-1), requant, L).view(-1, 256)
    return torch.cat([_u8(sc), _pack_crumbs(L), d16, dmin16], dim=-1)


def _enc_q3_k(x: torch.Tensor) -> torch.Tensor:
    xg = _groups(x, 16)
    scales, L = _make_q3(xg, 4)
    scales, L = _ungroup(scales, 16), _ungroup(L, 16)  # [N, 16], [N, 16, 16]
    mx = _first_absmax(scales)
    has = mx != 0
    iscale = _rdiv(-32.0, mx)
    l6 = ((_nearest_int(iscale.unsqueeze(-1) * scales) & 0xFF) ^ 0x80) - 0x80  # int8_t
    l6 = torch.where(has.unsqueeze(-1), l6.clamp(-32, 31) + 32, 0)
    lo = l6 & 0xF
    hi = l6 >> 4
    sbytes = torch.cat([lo[:, :8] | (lo[:, 8:] << 4),
                        (hi.view(-1, 4, 4) << torch.tensor([0, 2, 4, 6], device=x.device,
                                                           dtype=torch.int32).view(4, 1)).sum(1)], dim=-1)
    d16 = _fp16_bytes(torch.where(has, _rdiv(1.0, iscale), torch.zeros_like(iscale)))
    d = _fp16_value(d16).unsqueeze(-1) * (l6 - 32).float()
    requant = _nearest_int(x.view(-1, 16, 16) / d.unsqueeze(-1)).clamp(-4, 3) + 4
    L = torch.where((d != 0).unsqueeze(-1), requant, L).view(-1, 256)
    high = (L > 3).to(torch.int32)
    hmask = _u8((high.view(-1, 8, 32) << torch.arange(8, device=x.device, dtype=torch.int32).view(8, 1)).sum(1))
    return torch.cat([hmask, _pack_crumbs(L - 4 * high), _u8(sbytes), d16], dim=-1)


_BLOCK_ENCODERS = {
    Q.Q8_0: _enc_q8_0,
    Q.Q4_0: lambda x: _enc_q4_0_like(x, 8, five=False),
    Q.Q5_0: lambda x: _enc_q4_0_like(x, 16, five=True),
    Q.Q4_1: lambda x: _enc_q4_1_like(x, 15, five=False),
    Q.Q5_1: lambda x: _enc_q4_1_like(x, 31, five=True),
    Q.MXFP4: _enc_mxfp4,
    Q.Q2_K: _enc_q2_k, Q.Q3_K: _enc_q3_k, Q.Q4_K: _enc_q4_k, Q.Q5_K: _enc_q5_k, Q.Q6_K: _enc_q6_k,
}
ENCODABLE = frozenset({Q.F32, Q.F16, Q.BF16, *_BLOCK_ENCODERS})


def encode(qtype: Q | int, values: torch.Tensor) -> torch.Tensor:
    """float values [..., cols] -> uint8 rows [..., row_bytes(qtype, cols)], byte-identical to llama.cpp's
    quantize_row_<type>_ref (see the module doc), on values' device."""
    q = _qtype(qtype)
    if q not in ENCODABLE:
        raise ReamLiteError(f"GGML type {q.name} cannot be written; writable types: "
                            + ", ".join(sorted(t.name for t in ENCODABLE)))
    if values.dim() == 0 or not values.is_floating_point():
        raise ReamLiteError(f"{q.name} encode needs a float tensor of rows, got {values.dtype} {tuple(values.shape)}")
    cols = values.shape[-1]
    nbytes = row_bytes(q, cols)
    lead = tuple(values.shape[:-1])
    x = values.detach().to(torch.float32).contiguous()
    if q == Q.F32:
        x = x.clone() if x.data_ptr() == values.data_ptr() else x  # never alias the caller's tensor
        return x.view(torch.uint8).view(*lead, nbytes)
    if q == Q.F16:
        return _f16_bits(x).view(torch.uint8).view(*lead, nbytes)
    if q == Q.BF16:
        return _bf16_bits(x).to(torch.int16).view(torch.uint8).view(*lead, nbytes)
    if not bool(torch.isfinite(x).all()):
        raise ReamLiteError(f"cannot encode {q.name}: the values contain NaN or infinity")
    block, size = GGML_QUANT_SIZES[q]
    blocks = x.view(-1, block)
    out = torch.empty(blocks.shape[0], size, dtype=torch.uint8, device=x.device)
    step = _chunk_blocks(x.device, block)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = _BLOCK_ENCODERS[q](blocks[start:start + step])
    return out.view(*lead, nbytes)
