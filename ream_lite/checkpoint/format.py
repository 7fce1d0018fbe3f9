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
    """Parse a safetensors header and check that the file holds every byte the header promises."""
    import os

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ReamLiteError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ReamLiteError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ReamLiteError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ReamLiteError(f"{path}: corrupt safetensors header (not JSON)") from None
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            b, e = info["data_offsets"]
            entry = TensorEntry(path, info["dtype"], tuple(int(s) for s in info["shape"]), base + b, base + e)
        except (KeyError, TypeError, ValueError):
            raise ReamLiteError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        entries[name] = entry
        data_end = max(data_end, entry.end)
    if data_end > size:
        raise ReamLiteError(
            f"{path}: truncated shard ({size:,} bytes on disk, header needs {data_end:,}); re-download it"
        )
    return entries, meta


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None, reserve: int = 0) -> bytes:
    """JSON header bytes padded with spaces to `reserve` bytes (or to a multiple of 8 when it does not fit)."""
    body = dict(entries)
    if metadata:
        body = {"__metadata__": metadata, **body}
    raw = json.dumps(body, separators=(",", ":")).encode("utf-8")
    target = reserve if len(raw) <= reserve else len(raw) + (-len(raw)) % 8
    return raw + b" " * (target - len(raw))
