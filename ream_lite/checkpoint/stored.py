"""Logical tensors over stored encodings: one weight may be several tensors on disk.

A quantized checkpoint stores a weight as parts: FP8 block-scaled `X.weight` + `X.weight_scale_inv`; MXFP4
`X_blocks` + `X_scales` (logical name `X`); bitsandbytes 4-bit `X.weight` + `X.weight.absmax`,
`X.weight.quant_map`, `X.weight.quant_state.bitsandbytes__nf4` (+ nested statistics); NVFP4 (checkpoint/nvfp4.py)
`X.weight_packed` + `X.weight_scale` + `X.weight_global_scale` (compressed-tensors) or `X.weight` + `X.weight_scale` +
`X.weight_scale_2` (ModelOpt), each with the module's activation scale beside it (`X.input_global_scale`,
`X.input_scale`); compressed-tensors INT4 pack-quantized (checkpoint/int4_pack.py) `X.weight_packed` (int32) +
`X.weight_scale` + `X.weight_shape`. A part whose suffix starts with "/" is a sibling of the weight (`X.` + the
rest), not `X.weight` + suffix, so that it is renamed, kept and dropped with its expert. The reader groups the parts
into one `StoredTensor` named as the weight is named in an unquantized checkpoint, with its decoded shape, so the
rest of ream-lite (layouts, streamer, writer) sees the same names and shapes whatever the encoding, reads decoded
values through `CheckpointReader.get`, and copies a tensor with all its parts when it is kept as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ream_lite.checkpoint import fp8
from ream_lite.checkpoint.bnb4 import group_bnb4_keys
from ream_lite.checkpoint.format import TensorEntry, shape_numel
from ream_lite.errors import ReamLiteError

# fp8_unscaled: FP8 values without a block scale (per-tensor / per-channel schemes): indexed, never decoded
# ggml: a tensor of a GGUF file (checkpoint/gguf.py), any llama.cpp type; block = (its GGMLQuantizationType,)
# int4_pack: compressed-tensors pack-quantized INT4 (checkpoint/int4_pack.py); block = (group size,)
Encoding = Literal["plain", "fp8_block", "mxfp4", "bnb4", "fp8_unscaled", "nvfp4", "ggml", "int4_pack"]
UNSCALED_FP8_MESSAGE = ("FP8 without a weight_scale_inv block scale; only block-scaled FP8 (DeepSeek-V3 / Qwen3 FP8 "
                        "style) can be decoded")

# encodings whose encoder, given decoded values, does not always give the same bytes back (llama.cpp's K-quants;
# INT4's group scales, re-derived from decoded codes, come out otherwise): the output format writes the bytes it
# encoded
REENCODE_DIFFERS = ("ggml", "int4_pack")

FP8_SCALE = "_scale_inv"  # DeepSeek-V3 / Qwen3-FP8 / Kimi-K2 ("fp8" quant_method): one scale per block
FP8_CT_SCALE = "_scale"  # compressed-tensors float-quantized (llm-compressor): per tensor, channel or block
FP8_SCALES = (FP8_SCALE, FP8_CT_SCALE)
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
NV_PACKED, NV_SCALE, NV_GLOBAL, NV_SCALE_2 = "_packed", "_scale", "_global_scale", "_scale_2"
NV_INPUT = {NV_GLOBAL: "/input_global_scale", NV_SCALE_2: "/input_scale"}  # the activation scale beside each form
INT_PACKED, INT_SCALE, INT_SHAPE, INT_ZERO = "_packed", "_scale", "_shape", "_zero_point"  # pack-quantized INT4


@dataclass(frozen=True)
class StoredTensor:
    """One logical tensor: its decoded shape and the stored parts (suffix -> entry; "" is the main part)."""

    name: str
    encoding: Encoding
    shape: tuple[int, ...]
    parts: dict[str, TensorEntry] = field(hash=False, compare=False)
    block: tuple[int, ...] | None = None  # FP8: block (rows, cols); bnb 4-bit: (blocksize,)
    value_dtype: torch.dtype | None = None  # bnb 4-bit: the dtype its quant_state records

    @property
    def main(self) -> TensorEntry:
        return next(self.parts[k] for k in ("", MX_BLOCKS, NV_PACKED) if k in self.parts)

    @property
    def path(self) -> str:
        return self.main.path

    @property
    def nbytes(self) -> int:
        """Bytes on disk, all parts."""
        return sum(e.nbytes for e in self.parts.values())

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def dtype(self) -> str:
        """The stored dtype name of the main part (F8_E4M3, U8, BF16 ...)."""
        return self.main.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """The stored dtype of a plain tensor; for an encoded one, the dtype of its codes (never a compute dtype,
        so nothing mistakes encoded bytes for values)."""
        return self.main.torch_dtype

    @property
    def is_encoded(self) -> bool:
        return self.encoding != "plain"

    def part_name(self, suffix: str, name: str | None = None) -> str:
        """The on-disk key of part `suffix` for this tensor stored under logical name `name` (default its own)."""
        return part_name(suffix, name or self.name)


def part_name(suffix: str, name: str) -> str:
    """The on-disk key of part `suffix` of logical tensor `name` ("/x": the sibling `x` of the weight)."""
    if suffix.startswith("/"):
        return name.rsplit(".", 1)[0] + "." + suffix[1:]
    return name + suffix


def part_suffix(key: str, name: str) -> str:
    """The suffix of on-disk key `key` among the parts of logical tensor `name` (part_name's inverse)."""
    if key.startswith(name):
        return key[len(name):]
    return "/" + key.rsplit(".", 1)[1]


def group_entries(entries: dict[str, TensorEntry], fp8_block: tuple[int, int]) -> dict[str, StoredTensor]:
    """The logical tensors of a checkpoint's physical entries (every entry belongs to exactly one)."""
    out: dict[str, StoredTensor] = {}
    owned: set[str] = set()
    bnb = group_bnb4_keys(entries)  # weight key -> {suffix: key} of its bnb 4-bit parts
    for k, e in entries.items():
        int4 = _int4_parts(k, e, entries)
        if int4 is not None:
            base, parts, group = int4
            *lead, rows, words = parts[INT_PACKED].shape
            out[base] = StoredTensor(base, "int4_pack", (*lead, rows, 8 * words), parts, (group,))
            owned.update(base + sfx for sfx in parts)
            continue
        nv = _nvfp4_parts(k, e, entries)
        if nv is not None:
            base, parts = nv
            *lead, rows, half = parts[NV_PACKED if NV_PACKED in parts else ""].shape
            out[base] = StoredTensor(base, "nvfp4", (*lead, rows, 2 * half), parts, (16,))
            owned.update(part_name(sfx, base) for sfx in parts)
            continue
        fp8_scale = next((sfx for sfx in FP8_SCALES if k + sfx in entries), None)
        if fp8_scale is not None and e.dtype.startswith("F8"):
            block = _fp8_grid(k, e, entries[k + fp8_scale], fp8_block)
            out[k] = StoredTensor(k, "fp8_block", e.shape, {"": e, fp8_scale: entries[k + fp8_scale]}, block)
            owned.update((k, k + fp8_scale))
        elif k.endswith(MX_BLOCKS) and k[: -len(MX_BLOCKS)] + MX_SCALES in entries:
            base = k[: -len(MX_BLOCKS)]
            s = entries[base + MX_SCALES]
            *lead, out_dim, groups, nb = e.shape
            if nb != 16 or tuple(s.shape) != (*lead, out_dim, groups):
                raise ReamLiteError(f"{e.path}: {k} / {base}{MX_SCALES}: not an MXFP4 pair (shapes {e.shape}, "
                                    f"{s.shape})")
            # the logical tensor is the unquantized release's: [.., in, out] (x @ W), the transpose of the blocks
            out[base] = StoredTensor(base, "mxfp4", (*lead, groups * 32, out_dim), {MX_BLOCKS: e, MX_SCALES: s})
            owned.update((k, base + MX_SCALES))
        elif k in bnb:
            parts = {sfx: entries[key] for sfx, key in bnb[k].items()}
            shape, blocksize, dtype = _bnb_state(k, parts)
            out[k] = StoredTensor(k, "bnb4", shape, parts, (blocksize,), dtype)
            owned.update(k + sfx for sfx in parts)
    for k, e in entries.items():
        if k in owned:
            continue
        unscaled = e.dtype.startswith("F8") and e.dtype != "F8_E8M0"
        out[k] = StoredTensor(k, "fp8_unscaled" if unscaled else "plain", e.shape, {"": e})
    return out


def _int4_parts(key: str, e: TensorEntry, entries: dict[str, TensorEntry]
                ) -> tuple[str, dict[str, TensorEntry], int] | None:
    """(logical name, parts, group size) when `key` is the int32 codes of a pack-quantized INT4 weight
    (`X.weight_packed` beside `X.weight_scale` and, usually, `X.weight_shape`); else None."""
    if not (key.endswith(".weight" + INT_PACKED) and e.dtype == "I32"):
        return None
    base = key[: -len(INT_PACKED)]
    for sfx, what in ((INT_ZERO, "an asymmetric"), ("_g_idx", "an activation-ordered (GPTQ actorder)")):
        if base + sfx in entries:
            raise ReamLiteError(f"{e.path}: {key}: {what} INT pack-quantized weight ({base}{sfx}); ream-lite reads "
                                "symmetric INT4 in plain group order only: use the unquantized release")
    scale, shape = entries.get(base + INT_SCALE), entries.get(base + INT_SHAPE)
    *lead, rows, words = e.shape if len(e.shape) >= 2 else (0, 0)
    groups = scale.shape[-1] if scale is not None and scale.shape else 0
    if (scale is None or not scale.dtype.startswith(("BF", "F")) or tuple(scale.shape[:-1]) != (*lead, rows)
            or groups == 0 or (8 * words) % groups):
        raise ReamLiteError(f"{e.path}: {key}: not an INT4 pack-quantized weight (needs {base}{INT_SCALE} float "
                            f"[..., {rows}, in/group] with in = {8 * words})")
    parts = {INT_PACKED: e, INT_SCALE: scale}
    if shape is not None:
        parts[INT_SHAPE] = shape
    return base, parts, 8 * words // groups


def _nvfp4_parts(key: str, e: TensorEntry, entries: dict[str, TensorEntry]
                 ) -> tuple[str, dict[str, TensorEntry]] | None:
    """(logical name, parts) when `key` is the codes of an NVFP4 weight: compressed-tensors' `X.weight_packed` or
    ModelOpt's uint8 `X.weight` beside `X.weight_scale` (E4M3) and `X.weight_scale_2`; else None."""
    if key.endswith(".weight" + NV_PACKED) and e.dtype == "U8":
        base, main, tensor_scale = key[: -len(NV_PACKED)], NV_PACKED, NV_GLOBAL
    elif key.endswith(".weight") and e.dtype == "U8" and key + NV_SCALE_2 in entries:
        base, main, tensor_scale = key, "", NV_SCALE_2
    else:
        return None
    scale, ts = entries.get(base + NV_SCALE), entries.get(base + tensor_scale)
    *lead, rows, half = e.shape if e.shape else (0, 0)
    if (scale is None or ts is None or scale.dtype != "F8_E4M3" or tuple(scale.shape) != (*lead, rows, half // 8)
            or ts.numel != 1):
        raise ReamLiteError(f"{e.path}: {key}: not an NVFP4 weight (needs {base}{NV_SCALE} E4M3 "
                            f"[..., {rows}, {half // 8}] and a one-element {base}{tensor_scale})")
    parts = {main: e, NV_SCALE: scale, tensor_scale: ts}
    sibling = part_name(NV_INPUT[tensor_scale], base)
    if sibling in entries:
        parts[NV_INPUT[tensor_scale]] = entries[sibling]
    return base, parts


def _fp8_grid(key: str, e: TensorEntry, scale: TensorEntry, block: tuple[int, int]) -> tuple[int, int]:
    """The block an FP8 weight's scale covers, from the scale's shape: one scale for the tensor (block = the
    whole matrix), one per output row (block 1 x columns: compressed-tensors' channel strategy), or a grid of
    `block` (quantization_config.weight_block_size / block_structure)."""
    *lead, r, c = e.shape
    shape = tuple(scale.shape)
    if shape_numel(shape) == 1 and not lead:
        return (r, c)
    if shape in ((*lead, r, 1), (*lead, r)):
        return (1, c)
    if shape == fp8.scale_shape(e.shape, block):
        return block
    raise ReamLiteError(f"{e.path}: the scale of {key} has shape {shape}; expected one per tensor, per row "
                        f"({r}), or per {block[0]}x{block[1]} block {fp8.scale_shape(e.shape, block)} "
                        "(quantization_config.weight_block_size)")


def fp8_scale_suffix(t: StoredTensor) -> str:
    return next(sfx for sfx in t.parts if sfx)


def _bnb_state(key: str, parts: dict[str, TensorEntry]) -> tuple[tuple[int, ...], int, torch.dtype | None]:
    """(original shape, blocksize, dtype) of a bnb 4-bit weight, from its packed quant_state JSON (read at index
    time: a few hundred bytes)."""
    from ream_lite.checkpoint.bnb4 import read_quant_state, state_dtype

    sfx = next(s for s in parts if s.startswith(".quant_state."))
    e = parts[sfx]
    try:
        state = read_quant_state(read_entry(e).reshape(-1).view(torch.uint8))  # (its bytes, whatever the dtype)
        return tuple(int(s) for s in state["shape"]), int(state["blocksize"]), state_dtype(state)
    except (ReamLiteError, KeyError, TypeError, ValueError):
        raise ReamLiteError(f"{e.path}: {key}{sfx}: not a bitsandbytes quant_state (JSON with shape, blocksize)"
                            ) from None


def decode(t: StoredTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype | None, row0: int = 0
           ) -> torch.Tensor:
    """The values of `t` from its parts as read (a row slice starting at logical row `row0` for FP8 / MXFP4 when
    the parts are row slices), in `dtype` (None: float32 for encoded tensors, the stored dtype for plain ones)."""
    if t.encoding == "plain":
        x = parts[""]
        return x if dtype is None or x.dtype == dtype else x.to(dtype)
    dtype = dtype or torch.float32
    if t.encoding == "fp8_block":
        q = parts[""]
        scale = parts[fp8_scale_suffix(t)]
        grid = fp8.scale_shape(q.shape, t.block)
        if row0 == 0 and scale.shape != grid:  # per-row (r,) or one-element scales: as the [.., nr, nc] grid
            scale = scale.reshape(grid)
        elif scale.dim() == q.dim() - 1:  # a row slice of per-row scales
            scale = scale.unsqueeze(-1)
        return fp8.decode(q, scale, t.block, dtype, row0)
    if t.encoding == "mxfp4":
        from ream_lite.checkpoint.mxfp4 import decode_mxfp4

        w = decode_mxfp4(parts[MX_BLOCKS], parts[MX_SCALES], torch.float32)  # [.., out, in]
        return w.transpose(-1, -2).to(dtype).contiguous()
    if t.encoding == "bnb4":
        from ream_lite.checkpoint.bnb4 import decode_bnb4

        return decode_bnb4(parts, dtype)
    if t.encoding == "nvfp4":
        from ream_lite.checkpoint.nvfp4 import decode_nvfp4

        inverted = NV_SCALE_2 in t.parts
        codes = parts[NV_PACKED if NV_PACKED in t.parts else ""]
        return decode_nvfp4(codes, parts[NV_SCALE], parts[NV_SCALE_2 if inverted else NV_GLOBAL], inverted, dtype)
    if t.encoding == "int4_pack":
        from ream_lite.checkpoint.int4_pack import decode_int4

        return decode_int4(parts[INT_PACKED], parts[INT_SCALE], dtype)
    if t.encoding == "ggml":
        from ream_lite.checkpoint.ggml_blocks import decode as decode_ggml

        if getattr(t, "joined", None) is not None:  # several GGUF tensors, each its own type (gguf.JoinedTensor)
            from ream_lite.checkpoint.gguf import decode_joined

            return decode_joined(t, parts, dtype)
        x = parts[""]
        if x.dtype != torch.uint8:  # F32 / F16 / BF16: values as stored
            return x.to(dtype)
        return decode_ggml(t.block[0], x, t.shape[-1], dtype)
    if t.encoding == "fp8_unscaled":
        raise ReamLiteError(f"{t.path}: {t.name} is {UNSCALED_FP8_MESSAGE}")
    raise ValueError(t.encoding)


def encode(t: StoredTensor, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """`value` (the decoded values of a tensor shaped like `t`) in `t`'s encoding, as on-disk tensors of the
    logical name `name`."""
    if t.encoding == "plain":
        return {name: value.to(t.torch_dtype)}
    if t.encoding == "fp8_block":
        q, s = fp8.encode(value, t.block)
        sfx = fp8_scale_suffix(t)
        part = t.parts[sfx]  # the input's scale layout and dtype (power-of-two scales are exact in bf16)
        s = s.reshape(part.shape) if tuple(part.shape) != tuple(s.shape) and s.numel() == part.numel else s
        return {name: q, name + sfx: s.to(part.torch_dtype)}
    if t.encoding == "mxfp4":
        from ream_lite.checkpoint.mxfp4 import encode_mxfp4

        blocks, scales = encode_mxfp4(value.float().transpose(-1, -2).contiguous())
        return {name + MX_BLOCKS: blocks, name + MX_SCALES: scales}
    if t.encoding == "bnb4":
        from ream_lite.checkpoint.bnb4 import encode_bnb4

        state = next(s for s in t.parts if s.startswith(".quant_state."))
        quant_type = state.rsplit("__", 1)[1]
        # in the dtype the input's quant_state records (what transformers then computes in)
        return encode_bnb4(name, value.to(t.value_dtype or value.dtype), quant_type, blocksize=t.block[0],
                           compress_statistics=".nested_absmax" in t.parts)
    if t.encoding == "nvfp4":
        return _encode_nvfp4(t, name, value)
    if t.encoding == "int4_pack":  # fresh least-squares group scales in the input's scale dtype; the shape record
        # as the input's
        from ream_lite.checkpoint.int4_pack import encode_int4

        codes, scales = encode_int4(value, t.block[0], t.parts[INT_SCALE].torch_dtype, search=True)
        out = {name + INT_PACKED: codes, name + INT_SCALE: scales}
        if INT_SHAPE in t.parts:
            out[name + INT_SHAPE] = torch.tensor(value.shape, dtype=t.parts[INT_SHAPE].torch_dtype)
        return out
    if t.encoding == "ggml":  # its llama.cpp type, by llama.cpp's reference quantizer (checkpoint/ggml_blocks.py)
        if getattr(t, "joined", None) is not None:  # one entry per GGUF tensor, each its own type (gguf.JoinedTensor)
            from ream_lite.checkpoint.gguf import encode_joined

            return encode_joined(t, name, value)
        if t.main.dtype != "U8":
            return {name: value.to(t.torch_dtype)}
        from ream_lite.checkpoint.ggml_blocks import encode as encode_ggml

        return {name: encode_ggml(t.block[0], value)}
    if t.encoding == "fp8_unscaled":
        raise ReamLiteError(f"{t.path}: {t.name} is {UNSCALED_FP8_MESSAGE}")
    raise ValueError(t.encoding)


def _encode_nvfp4(t: StoredTensor, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """`value` as an NVFP4 weight like `t`: fresh block scales under `t`'s own tensor scale (the merged expert is
    written in place of `t`'s expert, whose gate and up projections share one tensor scale, as fused NVFP4 MoE kernels
    require), and `t`'s activation scale (its expert's inputs)."""
    from ream_lite.checkpoint.nvfp4 import encode_nvfp4

    inverted = NV_SCALE_2 in t.parts
    ts_sfx = NV_SCALE_2 if inverted else NV_GLOBAL
    ts = read_entry(t.parts[ts_sfx])
    codes, scales = encode_nvfp4(value, ts, inverted)
    out = {part_name("" if inverted else NV_PACKED, name): codes, name + NV_SCALE: scales, name + ts_sfx: ts}
    if NV_INPUT[ts_sfx] in t.parts:
        out[part_name(NV_INPUT[ts_sfx], name)] = read_entry(t.parts[NV_INPUT[ts_sfx]])
    return out


def read_entry(e: TensorEntry) -> torch.Tensor:
    """A small stored tensor (a scale), read directly from its file."""
    with open(e.path, "rb") as f:
        f.seek(e.start)
        raw = bytearray(f.read(e.nbytes))
    return torch.frombuffer(raw, dtype=e.torch_dtype).reshape(e.shape).clone() if raw else torch.empty(
        e.shape, dtype=e.torch_dtype)

