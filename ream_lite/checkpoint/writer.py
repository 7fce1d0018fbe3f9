"""Streaming checkpoint writer: size-bounded shards, index, side files, atomic rename into place.

Tensors go straight to disk as they arrive. Each shard file starts with a header region reserved up front (the
safetensors format allows the JSON header to be padded with spaces), so a shard is written in one pass with
bounded memory and no copy: when the header fills up or the shard reaches its size limit, the header is written
into its slot and the next shard begins. Everything is written into `<out>.partial/`, which is renamed to `<out>`
only when complete, so a half-written output never looks finished.

Resume: `state()` flushes and syncs what was written and returns a small JSON-able record (shard files, their
entries and data length so far). A writer built with `resume=state` truncates the open shard back to that length
(however much was appended after the state, even if the shard was closed since), deletes shards begun after it, and
carries on appending: the shards it finally closes are byte for byte those of a writer that was never interrupted,
because a shard's header is only written, whole, when it is closed. The state carries a checksum of every tensor's
bytes (`sums`), and a resumed writer checks the partial output against them (and the closed shards' headers against
their entries) before it appends anything: a partial output damaged since (a flipped byte, a file edited or zeroed)
is refused, never silently carried into the model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ream_lite import timing
from ream_lite.checkpoint import files
from ream_lite.checkpoint.format import DTYPE_NAMES, encode_header
from ream_lite.checkpoint.output_format import OutputFormat
from ream_lite.checkpoint.reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from ream_lite.checkpoint.stored import StoredTensor
from ream_lite.errors import ReamLiteError
from ream_lite.report import REPORT_FILES

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
HEADER_RESERVE = 256 * 1024  # ~2000 tensor entries per shard
COPY_CHUNK = 64 * 1024 * 1024
# Files of a model directory that are not weights and are carried over unchanged.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


# written by ream-lite, never carried over from the input (README.md: the base model's card describes the base model)
OWN_FILES = (INDEX_NAME, "config.json", "pytorch_model.bin.index.json", "README.md", *REPORT_FILES)


# inside <out>.partial/: the record of an interrupted compression that `compress --resume` continues
RESUME_SUBDIR = "resume"
RESUME_MANIFEST = "manifest.json"


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


class _Shard:
    METADATA = {"format": "pt"}

    def __init__(self, path: Path, reserve: int, resume: dict | None = None):
        self.path = path
        self.reserve = reserve
        self.entries: dict[str, dict] = {}
        self.sums: dict[str, str] = {}  # tensor name -> checksum of its bytes (files.Checksum)
        self.data_bytes = 0
        # exact length of the compact JSON header so far: {"__metadata__":{...}} plus ',"name":{...}' per tensor
        self.header_bytes = len(encode_header({}, self.METADATA))
        if resume is None:
            with files.reporting_full(path, "an output shard"):
                files.boundary("write", path)
                self.file = open(path, "wb")  # noqa: SIM115 (closed by close / close_files)
        else:  # reopen, drop whatever was appended after the recorded state, and replay the entries
            self.file = open(path, "r+b")
            for name, e in resume["entries"].items():
                nbytes = e["data_offsets"][1] - e["data_offsets"][0]
                self.add(name, e["dtype"], e["shape"], nbytes)
            self.sums = dict(resume["sums"])
            if self.data_bytes != resume["data_bytes"]:
                raise ReamLiteError(f"{path}: resume record is inconsistent; start over with --overwrite")
            files.boundary("write", path)
            self.file.truncate(8 + reserve + self.data_bytes)
        self.file.seek(8 + reserve + self.data_bytes)

    def write(self, name: str, data, crc: files.Checksum) -> None:
        """Append bytes of tensor `name` (in pieces: `crc` accumulates them, and holds the tensor's checksum after
        its last piece)."""
        files.write(self.file, data, self.path, "an output shard")
        crc.update(data)
        self.sums[name] = crc.value

    def entry_json_bytes(self, name: str, dtype: str, shape: list[int], nbytes: int) -> int:
        entry = {name: {"dtype": dtype, "shape": shape, "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}}
        return len(json.dumps(entry, separators=(",", ":"))) - 2 + 1  # without the braces, with a comma

    def add(self, name: str, dtype: str, shape: list[int], nbytes: int) -> None:
        self.header_bytes += self.entry_json_bytes(name, dtype, shape, nbytes)
        self.entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}
        self.sums[name] = files.Checksum().value  # (an empty tensor's; `write` updates it with the bytes)
        self.data_bytes += nbytes

    def state(self) -> dict:
        if not self.file.closed:
            files.sync(self.file, self.path, "an output shard")
        return {"file": self.path.name, "entries": self.entries, "sums": self.sums, "data_bytes": self.data_bytes,
                "closed": self.file.closed}

    def header(self) -> bytes:
        """The 8-byte length and the header region, as `close` writes them."""
        header = encode_header(self.entries, self.METADATA, reserve=self.reserve)
        if len(header) != self.reserve:  # cannot happen: shards are rolled over before the header overflows
            raise RuntimeError("safetensors header overflowed its reserved space")
        return len(header).to_bytes(8, "little") + header

    def close(self) -> None:
        header = self.header()
        with files.reporting_full(self.path, "an output shard"):  # (the seek flushes buffered bytes)
            files.boundary("write", self.path)
            self.file.seek(0)
            self.file.write(header)
        files.sync(self.file, self.path, "an output shard")
        self.file.close()

    def verify(self, reader: Callable[[int, int], bytes]) -> str | None:
        """Why the bytes on disk (`reader(offset, nbytes)`) are not what this shard's record says, or None: each
        tensor's checksum, and for a closed shard its header."""
        if isinstance(self.file, _Closed) and reader(0, 8 + self.reserve) != self.header():
            return "its header differs from the one written"
        for name, e in self.entries.items():
            a, b = e["data_offsets"]
            crc = files.Checksum()
            for off, n in chunks(b - a):
                crc.update(reader(8 + self.reserve + a + off, n))
            if name not in self.sums:
                return f"no checksum recorded for {name}"
            if crc.value != self.sums[name]:
                return f"the bytes of {name} differ from those written"
        return None


class _Closed:
    """Stands in for the file of a shard that was closed before a resume."""

    closed = True

    def close(self) -> None:
        pass


class CheckpointWriter:
    """Write tensors in the order given into size-bounded safetensors shards under `<out>.partial/`."""

    def __init__(
        self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
        resume: dict | None = None, output: OutputFormat | None = None,
    ):
        """A new output under `<out>.partial/` (any earlier partial output is removed), or, with `resume` (a
        `state()` record), the partial output continued from that state. `output`: how tensors are encoded (default:
        as the input stores them)."""
        self.out_dir = Path(out_dir)
        self.output = output or OutputFormat()
        self.tmp_dir = partial_dir(self.out_dir)
        self.max_shard_bytes = max_shard_bytes
        if self.out_dir.exists() and not overwrite:
            raise ReamLiteError(f"{self.out_dir} already exists; pass --overwrite to replace it")
        self.overwrite = overwrite
        self._shards: list[_Shard] = []
        self._current: _Shard | None = None
        self._names: set[str] = set()
        self.bytes_written = 0
        if resume is None:
            start_partial(self.tmp_dir, overwrite)
            return
        keep = {rec["file"] for rec in resume["shards"]}
        for p in self.tmp_dir.glob("shard-*.tmp"):  # begun after the recorded state
            if p.name not in keep:
                files.remove(p)
        for i, rec in enumerate(resume["shards"]):
            path = self.tmp_dir / rec["file"]
            if not path.exists():  # killed inside finish(), after it gave this shard its final name: take it back
                named = sorted(self.tmp_dir.glob(f"model-{i + 1:05d}-of-*.safetensors"))
                named += [self.tmp_dir / SINGLE_NAME] if i == 0 and (self.tmp_dir / SINGLE_NAME).exists() else []
                if named:
                    files.replace(named[0], path)
            if not path.exists():
                raise ReamLiteError(f"{path}: missing from the partial output; start over with --overwrite")
            if rec["closed"]:  # complete on disk (header written): only its bookkeeping is needed
                shard = _Shard.__new__(_Shard)
                shard.path, shard.reserve, shard.entries = path, HEADER_RESERVE, rec["entries"]
                shard.sums, shard.data_bytes, shard.file = dict(rec["sums"]), rec["data_bytes"], _Closed()
            else:
                shard = _Shard(path, HEADER_RESERVE, resume=rec)
                self._current = shard
            self._shards.append(shard)
            self._names.update(rec["entries"])
        self.bytes_written = resume["bytes_written"]
        self._verify()

    def _verify(self) -> None:
        """Check the partial output against the resume record before appending to it: read back once, bounded
        by what was written (the price of never carrying a damaged byte into the model unnoticed)."""
        with open_reader() as read:
            for shard in self._shards:
                why = shard.verify(lambda off, n, p=shard.path: read(p, off, n))
                if why:
                    raise ReamLiteError(
                        f"{shard.path}: the partial output was damaged since it was written ({why}); "
                        "start over with --overwrite")

    def state(self) -> dict:
        """What has been written so far, flushed and synced to disk: the record a resumed writer starts from."""
        return {"shards": [s.state() for s in self._shards], "bytes_written": self.bytes_written}

    # -- shards -------------------------------------------------------------------------------------------------
    def _shard_for(self, name: str, dtype: str, shape: list[int], nbytes: int) -> _Shard:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        cur = self._current
        if cur is not None and (
            (cur.data_bytes > 0 and cur.data_bytes + nbytes > self.max_shard_bytes)
            or cur.header_bytes + cur.entry_json_bytes(name, dtype, shape, nbytes) > cur.reserve
        ):
            cur.close()
            cur = None
        if cur is None:
            cur = _Shard(self.tmp_dir / f"shard-{len(self._shards):05d}.tmp", HEADER_RESERVE)
            self._shards.append(cur)
            self._current = cur
        cur.add(name, dtype, shape, nbytes)
        return cur

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any device; bytes as held, no conversion)."""
        with timing.phase("write"):
            self._add(name, tensor)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ReamLiteError(f"cannot store dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        shard = self._shard_for(name, dtype, list(t.shape), nbytes)
        if nbytes:
            shard.write(name, t.reshape(-1).view(torch.uint8).numpy().data, files.Checksum())
        self.bytes_written += nbytes

    def add_like(self, name: str, value: torch.Tensor, like: StoredTensor) -> None:
        """Write `value` (decoded values) as `name`, encoded as the output format says for a tensor stored like
        `like` (the input tensor it replaces): its own encoding with fresh scales, decoded, or bnb 4-bit."""
        for k, v in self.output.encode(name, value, like).items():
            self.add(k, v)

    def copy_from(self, reader: CheckpointReader, key: str, name: str | None = None) -> None:
        """Copy a tensor from the input checkpoint: byte for byte with all its stored parts, in bounded chunks,
        without decoding it, unless the output format re-encodes it (then decoded and encoded)."""
        t = reader.entry(key)
        name = name or key
        if not self.output.keeps_stored(name, t):
            self.add_like(name, reader.get(key), t)
            return
        for sfx, e in t.parts.items():
            self._copy_entry(reader, e, t.part_name(sfx, name))

    def _copy_entry(self, reader: CheckpointReader, e, name: str) -> None:
        shard = self._shard_for(name, e.dtype, list(e.shape), e.nbytes)
        crc = files.Checksum()
        for off, n in chunks(e.nbytes):
            data = reader._read(e.path, e.start + off, n)
            with timing.phase("write"):
                shard.write(name, data, crc)
        self.bytes_written += e.nbytes

    # -- finish -------------------------------------------------------------------------------------------------
    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data written so far."""
        return sum(s.data_bytes for s in self._shards)

    def finish(self, config: dict, source_dir: str | os.PathLike | None = None,
               before_publish: Callable[[], None] | None = None) -> Path:
        """Close shards, name them, write the index, config and side files, then rename into place
        (`before_publish` runs just before: the resume record is removed only when nothing else can fail)."""
        with timing.phase("write"):
            return self._finish(config, source_dir, before_publish)

    def _finish(self, config: dict, source_dir, before_publish) -> Path:
        if self._current is not None:
            self._current.close()
            self._current = None
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            files.replace(shard.path, self.tmp_dir / final)
            for k in shard.entries:
                weight_map[k] = final
            total += shard.data_bytes
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            files.write_file(self.tmp_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n", "the index")
        if source_dir is not None:
            copy_side_files(Path(source_dir), self.tmp_dir)
        files.write_file(self.tmp_dir / "config.json", json.dumps(config, indent=2) + "\n", "config.json")
        return publish(self.tmp_dir, self.out_dir, self.overwrite, before_publish)

    def close_files(self) -> None:
        """Close open shard files and keep the partial output (to resume from its last recorded state). Bytes a
        full disk refused are dropped: the resume truncates the shard to its recorded length anyway."""
        for s in self._shards:
            if not s.file.closed:
                try:
                    s.file.close()
                except OSError:
                    pass

    def abort(self) -> None:
        self.close_files()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def chunks(nbytes: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the COPY_CHUNK-sized pieces of `nbytes` bytes: how tensors are copied and checked in
    bounded memory."""
    for off in range(0, nbytes, COPY_CHUNK):
        yield off, min(COPY_CHUNK, nbytes - off)


def start_partial(tmp_dir: Path, overwrite: bool) -> None:
    """A fresh, empty partial output directory: refused over an interrupted run's record unless `overwrite`."""
    if (tmp_dir / RESUME_SUBDIR / RESUME_MANIFEST).exists() and not overwrite:
        raise ReamLiteError(f"{tmp_dir} holds an interrupted compression; continue it with the same "
                            "`ream-lite compress ... --resume`, or pass --overwrite to discard it")
    if tmp_dir.exists():
        files.remove(tmp_dir)
    with files.reporting_full(tmp_dir, "the partial output"):
        files.boundary("write", tmp_dir)
        tmp_dir.mkdir(parents=True)


def publish(tmp_dir: Path, out_dir: Path, overwrite: bool, before_publish: Callable[[], None] | None) -> Path:
    """Move a finished partial output into place (`before_publish` runs just before: the resume record is removed
    only when nothing else can fail)."""
    if out_dir.exists() and not overwrite:
        raise ReamLiteError(f"{out_dir} appeared while writing; not overwriting it")
    if before_publish is not None:
        before_publish()
    if out_dir.exists():
        files.remove(out_dir)
    files.replace(tmp_dir, out_dir)
    files.sync_dir(out_dir.parent)
    return out_dir


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, licence, code files: everything that is not weights."""
    for p in sorted(src.iterdir()):
        if p.is_dir() or p.name.startswith("."):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name in OWN_FILES:
            continue
        files.copy_file(p, dst / p.name, p.name)


@contextmanager
def open_reader() -> Iterator[Callable[[Path, int, int], memoryview]]:
    """`read(path, offset, nbytes)` over files opened once each, closed on exit: a view of the bytes read (fewer
    at the end of the file) in one reused buffer, valid until the next read."""
    opened: dict[Path, object] = {}
    buf = bytearray()

    def read(path: Path, offset: int, nbytes: int) -> memoryview:
        nonlocal buf
        f = opened.get(path)
        if f is None:
            f = opened[path] = open(path, "rb")  # noqa: SIM115 (closed below)
        if len(buf) < nbytes:
            buf = bytearray(nbytes)
        view = memoryview(buf)[:nbytes]
        got = 0
        while got < nbytes:
            n = os.preadv(f.fileno(), [view[got:]], offset + got)  # type: ignore[attr-defined]
            if n == 0:
                break
            got += n
        return view[:got]

    try:
        yield read
    finally:
        for f in opened.values():
            f.close()  # type: ignore[attr-defined]
