"""Fault injection, for the tests and `benchmarks/faults.py`: what ream-lite survives, measured.

- `boundaries(run)`: every write, sync, rename, removal and allocation a run makes (`checkpoint.files`), in order.
- `killed_at(run, k)`: the run in a forked child process that dies at boundary k as a SIGKILL would leave it:
  `os._exit`, so nothing is flushed or cleaned up, only what the kernel already has stays on disk.
- `flip_byte(path, offset)`: damage one byte in place.
- `header_mutations(shard)`, `index_mutations(weight_map)` and `config_mutations(config)`: hostile or malformed
  variants of a checkpoint's files, each with a name.

Nothing here runs in a normal `ream-lite` command; it only installs `files.on_boundary` in the processes it forks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ream_lite.checkpoint import files

KILLED = 137  # the exit status a killed child reports (as a shell shows SIGKILL)
# ream_report.json holds wall times and peak memory: the one output file that differs between two runs
VARYING = ("ream_report.json",)


def digests(d: Path) -> dict[str, str]:
    """sha256 of every file of an output directory but VARYING."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())
            if p.name not in VARYING}


class CompressRun:
    """One `ream-lite compress` command line into `out`, run in this process (click's runner): `run()` gives the
    exit status, `invoke()` the whole result. A resumed run is the same line plus --resume."""

    def __init__(self, src: Path, out: Path, *args: str):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.args = ["compress", str(src), str(out), *args]

    def invoke(self, *extra: str):
        from click.testing import CliRunner

        from ream_lite.cli import main

        return CliRunner().invoke(main, [*self.args, *extra])

    def __call__(self, *extra: str) -> int:
        return self.invoke(*extra).exit_code

    def clear(self) -> None:
        for d in (self.out, self.partial):
            shutil.rmtree(d, ignore_errors=True)


def boundaries(run: Callable[[], object]) -> list[tuple[str, Path]]:
    """(kind, path) of every boundary `run()` passes, in order."""
    seen: list[tuple[str, Path]] = []
    previous = files.on_boundary
    files.on_boundary = lambda kind, path: seen.append((kind, path))
    try:
        run()
    finally:
        files.on_boundary = previous
    return seen


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread within the block. `killed_at` needs it: an OpenMP pool does not survive a fork, and
    the killed run and its resume must round alike (a CPU reduction's rounding depends on the thread count)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def killed_at(run: Callable[[], int], k: int, timeout_s: float = 300.0) -> int:
    """Run `run()` (returning an exit status) in a forked child that ends with KILLED just before boundary k
    (0-based); returns the child's exit status (KILLED when it got there, else what `run` returned). Call it
    within `single_threaded()`."""
    import signal
    import time

    import torch

    if torch.get_num_threads() != 1:
        raise RuntimeError("killed_at forks: run it within faults.single_threaded()")
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 1
        try:
            count = [0]

            def kill(kind: str, path: Path) -> None:
                if count[0] == k:
                    os._exit(KILLED)
                count[0] += 1

            files.on_boundary = kill
            code = int(run() or 0)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"the run killed at boundary {k} did not end within {timeout_s:.0f} s")
        time.sleep(0.01)


@contextmanager
def small_disk(directory: Path, size: str = "16m") -> Iterator[bool]:
    """Mount a small real filesystem (tmpfs) on `directory` for the block where this process may (root), and
    yield True; else yield False (the caller injects ENOSPC instead: `disk_fills`)."""
    real = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, check=False).returncode == 0
    try:
        yield real
    finally:
        if real:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


@contextmanager
def disk_fills(disk: Path, real: bool, when: Callable[[str, Path], bool]) -> Iterator[dict]:
    """Within the block, the disk of `disk` fills up at the first boundary (kind, path) for which `when` is true:
    a ballast file `disk/ballast` takes all its free space (a real filesystem: the write that follows fails
    for real), or the operation fails with ENOSPC (injection). The yielded dict's "filled" says whether it did."""
    state = {"filled": False}

    def hook(kind: str, path: Path) -> None:
        if state["filled"] or not when(kind, path):
            return
        state["filled"] = True
        if not real:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        with open(disk / "ballast", "wb") as f:
            f.write(b"\0" * shutil.disk_usage(disk).free)

    previous, files.on_boundary = files.on_boundary, hook
    try:
        yield state
    finally:
        files.on_boundary = previous


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def spread(n_total: int, n_pick: int) -> list[int]:
    """n_pick indices spread evenly over range(n_total), first and last included (all when n_pick >= n_total)."""
    if n_pick >= n_total:
        return list(range(n_total))
    if n_pick <= 1:
        return [0][:n_pick]
    return sorted({round(i * (n_total - 1) / (n_pick - 1)) for i in range(n_pick)})


# -- hostile files -----------------------------------------------------------------------------------------------
def _shard_parts(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _shard(header, data: bytes, pad: bool = True) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def header_mutations(raw: bytes) -> Iterator[tuple[str, bytes]]:
    """Malformed variants of the safetensors file `raw` (which must hold at least two tensors), each named."""
    header, data = _shard_parts(raw)
    names = [k for k in header if k != "__metadata__"]
    first, second = names[0], names[1]

    def edit(name: str, **change) -> dict:
        h = json.loads(json.dumps(header))
        h[name].update(change)
        return h

    b0, e0 = header[first]["data_offsets"]
    yield "header length 2^63", struct.pack("<Q", 2**63) + raw[8:]
    yield "header length past the end of the file", struct.pack("<Q", len(raw)) + raw[8:]
    yield "header length 0", struct.pack("<Q", 0) + raw[8:]
    yield "shorter than 8 bytes", raw[:5]
    yield "header not JSON", _shard(b"{\"a\": [1, 2", data)
    yield "header not UTF-8", _shard(b"{\"\xff\xfe\": 1}", data)
    yield "header a JSON list", _shard(b"[1, 2, 3]", data)
    yield "deeply nested header", _shard(b"[" * 100000 + b"]" * 100000, data)
    yield "entry not an object", _shard({**header, first: [1, 2]}, data)
    yield "unknown dtype", _shard(edit(first, dtype="F4"), data)
    yield "dtype missing", _shard({**header, first: {k: v for k, v in header[first].items() if k != "dtype"}}, data)
    yield "dtype not a string", _shard(edit(first, dtype=7), data)
    yield "negative dimension", _shard(edit(first, shape=[-1, *header[first]["shape"][1:]]), data)
    yield "float dimension", _shard(edit(first, shape=[1.5]), data)
    yield "shape not a list", _shard(edit(first, shape="big"), data)
    yield "absurd shape", _shard(edit(first, shape=[2**62, 2**62]), data)
    yield "offsets reversed", _shard(edit(first, data_offsets=[e0, b0]), data)
    yield "offsets negative", _shard(edit(first, data_offsets=[-8, e0 - b0 - 8]), data)
    yield "offsets not numbers", _shard(edit(first, data_offsets=["0", "8"]), data)
    yield "offsets past the end", _shard(edit(first, data_offsets=[b0 + 2**40, e0 + 2**40]), data)
    yield "byte count does not match the shape", _shard(edit(first, shape=[1]), data)
    b1, e1 = header[second]["data_offsets"]
    yield "overlapping tensors", _shard(edit(second, data_offsets=[b1 - 4, e1 - 4]), data)
    at_zero = next(k for k in names if header[k]["data_offsets"][0] == 0)
    yield "gap between tensors", _shard({k: v for k, v in header.items() if k != at_zero}, data)
    yield "trailing bytes after the last tensor", raw + b"\0" * 16
    yield "truncated data", raw[:-16]
    yield "__metadata__ not strings", _shard({**header, "__metadata__": {"format": 1}}, data)


def index_mutations(weight_map: dict[str, str]) -> Iterator[tuple[str, object]]:
    """Malformed or hostile variants of a model.safetensors.index.json (as the JSON value to write), each named."""
    k = next(iter(weight_map))
    yield "not JSON", b"{\"weight_map\": "
    yield "a JSON list", [1, 2]
    yield "no weight_map", {"metadata": {}}
    yield "weight_map a list", {"weight_map": [k]}
    yield "shard name not a string", {"weight_map": {**weight_map, k: 3}}
    yield "parent directory", {"weight_map": {**weight_map, k: "../" + weight_map[k]}}
    yield "absolute path", {"weight_map": {**weight_map, k: "/etc/passwd"}}
    yield "subdirectory", {"weight_map": {**weight_map, k: "sub/" + weight_map[k]}}
    yield "missing shard", {"weight_map": {**weight_map, k: "model-99999-of-99999.safetensors"}}
    other = next((s for s in weight_map.values() if s != weight_map[k]), None)
    if other is not None:
        yield "tensor in another shard", {"weight_map": {**weight_map, k: other}}
    yield "tensor that no shard holds", {"weight_map": {**weight_map, "model.not_there.weight": weight_map[k]}}


def config_mutations(config: dict, values=(-1, 0, "8", None, 1e30, 2.5, [4, 4], True)) -> Iterator[tuple[str, dict]]:
    """config.json variants: every numeric key deleted, or set to each of `values`; named 'key=value'."""
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield f"{key} deleted", {k: v for k, v in config.items() if k != key}
        for bad in values:
            yield f"{key}={bad!r}", {**config, key: bad}
