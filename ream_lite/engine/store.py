"""HiddenStateStore: per-token hidden states of every calibration sequence, in one of three tiers.

- `device`: a tensor on the compute device (GPU when there is one) — fastest, smallest budget.
- `host`: a tensor in host RAM.
- `disk`: a memory-mapped file under the work directory, read and written one batch of sequences at a time.

All three hold one flat [total_tokens, hidden] buffer; sequence i occupies rows offsets[i]:offsets[i+1]. The
tier is chosen from explicit budgets by `choose_tier`, before any work starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ream_lite import timing
from ream_lite.checkpoint import files
from ream_lite.errors import ReamLiteError

Tier = Literal["device", "host", "disk"]


def mapped_tensor(work_dir: str | os.PathLike | None, shape: tuple[int, ...], dtype: torch.dtype, prefix: str,
                  what: str) -> tuple[torch.Tensor, np.memmap]:
    """An uninitialised tensor backed by a file of its own in the work dir (default: the system's temp dir),
    memory-mapped and unlinked at once: the mapping keeps the data alive, nothing is left behind after a kill, and
    its pages are file pages (the kernel writes them out and drops them under memory pressure, never swaps). The
    disk is reserved first, so a disk filled by something else later cannot turn it into a SIGBUS. Keep the memmap
    (second) as long as the tensor."""
    wd = Path(work_dir or tempfile.gettempdir())
    wd.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = int(np.prod(shape)) * itemsize
    free = shutil.disk_usage(wd).free
    if need > free:  # (the clearer message, before files.allocate would fail)
        raise ReamLiteError(f"{wd}: {need / 2**30:.1f} GiB needed for {what}, {free / 2**30:.1f} GiB free")
    fd, name = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".bin", dir=wd)
    try:
        files.allocate(fd, need, name, f"{what} (the --work-dir spill)")
        mm = np.memmap(name, dtype=np.dtype(f"u{itemsize}"), mode="r+", shape=tuple(shape))
    except OSError as e:
        raise ReamLiteError(f"{wd}: cannot create the {what} file ({e.strerror})") from None
    finally:
        os.close(fd)
        os.unlink(name)
    # a torch view of the memory map; numpy has no bfloat16, so map unsigned ints and reinterpret
    return torch.from_numpy(mm).view(dtype), mm


def spill(t: torch.Tensor, work_dir: str | os.PathLike | None, what: str) -> torch.Tensor:
    """A copy of `t` in a work-dir file of its own (`mapped_tensor`): a CPU tensor whose mapping lives as long as
    it does (torch.from_numpy holds the memmap), so it is used, sent and freed like any parked tensor."""
    data, _ = mapped_tensor(work_dir, tuple(t.shape), t.dtype, "spill", what)
    data.copy_(t)
    timing.count_bytes("work_dir_written", t.numel() * t.element_size())
    return data


@dataclass(frozen=True)
class Batch:
    """Consecutive sequences of equal length: rows [start, end) of the flat buffer."""

    seqs: range
    length: int
    start: int
    end: int


class HiddenStateStore:
    def __init__(
        self,
        lengths: list[int],
        hidden: int,
        dtype: torch.dtype,
        tier: Tier,
        device: torch.device | str = "cpu",
        work_dir: str | os.PathLike | None = None,
    ):
        self.lengths = list(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.total_tokens = int(self.offsets[-1])
        self.hidden = hidden
        self.dtype = dtype
        self.tier: Tier = tier
        self.device = torch.device(device)
        self._mm = None
        # the token id of every row (LayerStreamer.embed; hash-routed layers choose experts by it), or None
        self.token_ids: torch.Tensor | None = None
        shape = (self.total_tokens, hidden)
        if tier == "device":
            self.buf = torch.empty(shape, dtype=dtype, device=self.device)
        elif tier == "host":
            self.buf = torch.empty(shape, dtype=dtype)
        elif tier == "disk":
            self.buf, self._mm = mapped_tensor(work_dir, shape, dtype, "hidden", "hidden states")
        else:
            raise ValueError(f"unknown tier {tier}")
        self._rows = self.buf  # whole rows, whatever columns `buf` shows (`columns`)

    def view(self, first: int, last: int) -> HiddenStateStore:
        """Sequences first..last-1 as a store of their own that shares this one's buffer (no copy): batches of
        the view index only those rows. Closing the view leaves this store open."""
        a, b = int(self.offsets[first]), int(self.offsets[last])
        v = self._like(self.hidden, self.buf[a:b], self._rows[a:b])
        v.lengths = self.lengths[first:last]
        v.offsets = self.offsets[first : last + 1] - self.offsets[first]
        v.total_tokens = int(v.offsets[-1])
        v.token_ids = self.token_ids[a:b] if self.token_ids is not None else None
        return v

    def columns(self, first: int, last: int) -> HiddenStateStore:
        """Columns first..last-1 of the whole rows as a store of their own, sharing the buffer (no copy), for the
        same sequences as this one. DeepSeek-V4's residual rows hold hc_mult x hidden values; once the MoE block's
        input is written over them, its first `hidden` columns are that input and the next hc_mult the weights its
        output enters the streams with."""
        v = self._like(last - first, self._rows[:, first:last], self._rows)
        v.lengths, v.offsets, v.total_tokens, v.token_ids = self.lengths, self.offsets, self.total_tokens, self.token_ids
        return v

    def _like(self, hidden: int, buf: torch.Tensor, rows: torch.Tensor) -> HiddenStateStore:
        v = object.__new__(HiddenStateStore)
        v.hidden, v.dtype, v.tier, v.device = hidden, self.dtype, self.tier, self.device
        v._mm = None
        v.buf, v._rows = buf, rows
        return v

    def batch_ids(self, b: Batch) -> torch.Tensor | None:
        """The token ids of a batch's rows (flat), or None when the store does not know them."""
        return None if self.token_ids is None else self.token_ids[b.start : b.end]

    @property
    def nbytes(self) -> int:
        return self.total_tokens * self.hidden * self.buf.element_size()

    def batches(self, max_tokens: int) -> list[Batch]:
        """Split sequences into runs of consecutive equal-length sequences with at most max_tokens tokens each."""
        out: list[Batch] = []
        i, n = 0, len(self.lengths)
        while i < n:
            length = self.lengths[i]
            j = i + 1
            while j < n and self.lengths[j] == length and (j - i + 1) * length <= max_tokens:
                j += 1
            out.append(Batch(range(i, j), length, int(self.offsets[i]), int(self.offsets[j])))
            i = j
        return out

    def read(self, b: Batch, device: torch.device | str) -> torch.Tensor:
        """Hidden states of a batch as [B, T, H] on `device` (a copy for host/disk tiers)."""
        with timing.phase("store"):
            x = self.buf[b.start : b.end].to(device, copy=True)  # never a view: callers may write into it
        self._count("work_dir_read", x)
        return x.reshape(len(b.seqs), b.length, self.hidden)  # (a `columns` view's copy may not be contiguous)

    def write(self, b: Batch, value: torch.Tensor) -> None:
        with timing.phase("store"):
            self.buf[b.start : b.end].copy_(value.reshape(b.end - b.start, self.hidden))
        self._count("work_dir_written", value)

    def add_(self, b: Batch, value: torch.Tensor) -> None:
        with timing.phase("store"):
            dst = self.buf[b.start : b.end]
            dst.copy_((dst.to(value.device, torch.float32) + value.reshape(dst.shape).float()).to(self.dtype))
        self._count("work_dir_read", dst)
        self._count("work_dir_written", dst)

    def gather(self, rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Rows `rows` (flat token indices, int64 on the host) as [len(rows), H] on `device`: the tokens one expert
        was routed, wherever they are in the buffer (the refit's per-expert passes)."""
        with timing.phase("store"):
            idx = rows.to(self.buf.device)
            x = self.buf.index_select(0, idx).to(device)
        self._count("work_dir_read", x)
        return x

    def put(self, rows: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite rows `rows` (distinct flat token indices) with `value` [len(rows), H]."""
        with timing.phase("store"):
            self.buf.index_copy_(0, rows.to(self.buf.device), value.to(self.buf.device, self.dtype))
        self._count("work_dir_written", value)

    def _count(self, name: str, t: torch.Tensor) -> None:
        """Bytes moved through the disk tier's file (the benchmarks' work-dir traffic; page cache included)."""
        if self.tier == "disk":
            timing.count_bytes(name, t.numel() * self.buf.element_size())

    def _row_chunks(self, max_bytes: int = 64 * 1024**2) -> range:
        return range(0, self.total_tokens, max(1, max_bytes // max(1, self.hidden * self.buf.element_size())))

    def save(self, path: str | os.PathLike) -> str:
        """Write the buffer's raw bytes to `path` in bounded chunks and sync it (the resume snapshot); returns
        their checksum (files.Checksum), which `load` checks."""
        step = self._row_chunks().step
        crc = files.Checksum()
        # (the outer handler also covers the close, which flushes what a full disk refused)
        with files.reporting_full(path, "the resume snapshot"):
            files.boundary("write", path)
            with open(path, "wb") as f:
                for a in self._row_chunks():
                    rows = self.buf[a : a + step].to("cpu").contiguous()
                    data = rows.view(torch.uint8).numpy().data
                    files.write(f, data, path, "the resume snapshot")
                    crc.update(data)
                    timing.count_bytes("snapshot_written", rows.numel() * rows.element_size())
                files.sync(f, path, "the resume snapshot")
        return crc.value

    def load(self, path: str | os.PathLike, checksum: str | None = None) -> None:
        """Fill the buffer from a file written by `save` for the same sequence lengths, hidden size and dtype;
        refuse it when its bytes do not match `checksum` (what `save` returned)."""
        elt = self.buf.element_size()
        if Path(path).stat().st_size != self.total_tokens * self.hidden * elt:
            raise ReamLiteError(f"{path}: saved hidden states do not match this run; start over with --overwrite")
        step = self._row_chunks().step
        crc = files.Checksum()
        with open(path, "rb") as f:
            for a in self._row_chunks():
                n = min(step, self.total_tokens - a)
                raw = bytearray(f.read(n * self.hidden * elt))
                crc.update(raw)
                rows = torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).view(n, self.hidden)
                self.buf[a : a + n].copy_(rows)
        if checksum is not None and crc.value != checksum:
            raise ReamLiteError(f"{path}: saved hidden states damaged since they were written (checksum mismatch); "
                                "start over with --overwrite")

    def close(self) -> None:
        self.buf = self._rows = None  # type: ignore[assignment]
        self._mm = None  # unmaps the (already unlinked) disk-tier file

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def choose_tier(
    nbytes_each: int, count: int, device: torch.device, device_free: int, host_free: int, forced: str = "auto"
) -> Tier:
    """Tier for `count` stores of `nbytes_each`: the fastest whose budget holds them all."""
    if forced != "auto":
        if forced == "device" and device.type == "cpu":
            return "host"
        return forced  # type: ignore[return-value]
    need = nbytes_each * count
    if device.type != "cpu" and need <= device_free:
        return "device"
    if need <= host_free:
        return "host"
    return "disk"
