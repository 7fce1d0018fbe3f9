"""The safetensors container format, read and written by hand.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON header (may be padded with spaces),
then the raw tensor bytes, addressed by `data_offsets` relative to the end of the header. Doing this ourselves
(instead of `safetensors.safe_open`, which memory-maps the whole file) lets the reader pull one tensor, or a
contiguous slice of rows of one tensor, with plain positioned reads: touched pages do not stay mapped into the
process, so resident memory stays flat however many layers are streamed, bytes read are counted exactly, and
unchanged tensors are copied byte for byte without being decoded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from ream_lite.errors import ReamLiteError

# safetensors dtype names <-> torch dtypes (only those torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, stored dtype name and shape."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return shape_numel(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ReamLiteError(f"{self.path}: tensor dtype {self.dtype} is not supported by torch") from None


def shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header and check it as the safetensors library does, before anything reads a tensor:
    a JSON object of entries with a known dtype, a shape of whole numbers and byte offsets that match it, laid end
    to end over exactly the file's data (no overlap, no gap, nothing after). A hostile or damaged file is refused in
    one line, having read at most its header (bounded by the file's size and MAX_HEADER_BYTES)."""
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ReamLiteError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ReamLiteError(f"{path}: corrupt or truncated safetensors header (its length field says "
                                    f"{n:,} bytes, the file has {size:,})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ReamLiteError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ReamLiteError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ReamLiteError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ReamLiteError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, base)
    data_end = _check_layout(path, entries, base)
    if data_end > size:
        raise ReamLiteError(
            f"{path}: truncated shard ({size:,} bytes on disk, header needs {data_end:,}); re-download it"
        )
    if data_end < size:
        raise ReamLiteError(f"{path}: corrupt shard ({size - data_end:,} bytes after the last tensor)")
    return entries, meta


def _entry(path: str, name: str, info, base: int) -> TensorEntry:
    """One header entry, checked: known dtype, shape of whole numbers >= 0, offsets whose span the shape fills."""
    def bad(why: str) -> ReamLiteError:
        return ReamLiteError(f"{path}: corrupt safetensors header entry for {name!r} ({why})")

    if not isinstance(info, dict):
        raise bad("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is not one ream-lite can read or copy; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of whole numbers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not two whole numbers 0 <= begin <= end")
    need = shape_numel(tuple(shape)) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != need:
        raise bad(f"{offsets[1] - offsets[0]:,} bytes for a {dtype} tensor of shape {shape}, which needs {need:,}")
    return TensorEntry(path, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _check_layout(path: str, entries: dict[str, TensorEntry], base: int) -> int:
    """The entries' byte ranges tile the data region from its start without overlap or gap; returns its end."""
    end = base
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != end:
            how = "overlaps the previous tensor" if e.start < end else f"leaves {e.start - end:,} bytes unused before it"
            raise ReamLiteError(f"{path}: corrupt safetensors header entry for {name!r} (its data {how})")
        end = e.end
    return end


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None, reserve: int = 0) -> bytes:
    """JSON header bytes padded with spaces to `reserve` bytes (or to a multiple of 8 when it does not fit)."""
    body = dict(entries)
    if metadata:
        body = {"__metadata__": metadata, **body}
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    target = reserve if len(raw) <= reserve else len(raw) + (-len(raw)) % 8
    return raw + b" " * (target - len(raw))
