"""Every write of an output, a resume record or a spill goes through these few functions.

Why one place:
- a full disk (ENOSPC, or a quota: EDQUOT) surfaces as `DiskFull`, one line naming the file, its filesystem and
  its free space, instead of an OSError from deep inside a write; the pipeline adds how much more the run needs
  and that `--resume` continues it;
- each write, sync, rename and removal is a *boundary* at which `on_boundary` (None in normal runs) is called
  first: the fault tests (`ream_lite.faults`) fail the operation there, fill the disk, or end the process as a
  SIGKILL would, at every boundary of a small run in turn;
- checksums (`Checksum`, crc32) of what is written are kept the same way everywhere, so a resume can tell a
  damaged record, snapshot or partial shard from a good one.
"""

from __future__ import annotations

import errno
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ream_lite.errors import ReamLiteError

# called as on_boundary(kind, path) before every operation below; kind: write | sync | rename | remove | allocate.
# (Inside the full-disk handling: an ENOSPC it raises, as the fault tests inject one, is reported as a real one.)
on_boundary: Callable[[str, Path], None] | None = None

_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(ReamLiteError):
    """No space left (or over quota) while writing `path`."""

    def __init__(self, path: str | os.PathLike, what: str = ""):
        from ream_lite.diskspace import filesystem_name, nearest_existing

        self.path = Path(path)
        existing = nearest_existing(self.path)
        try:
            self.free = shutil.disk_usage(existing).free
        except OSError:
            self.free = 0
        self.filesystem = filesystem_name(existing)
        self.what = what
        super().__init__(f"{self.path}: disk full while writing {what or 'it'} "
                         f"({self.filesystem}, {self.free / 2**20:.0f} MiB free)")


def boundary(kind: str, path: str | os.PathLike) -> None:
    if on_boundary is not None:
        on_boundary(kind, Path(path))


@contextmanager
def reporting_full(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside the block into DiskFull(path)."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise DiskFull(path, what) from None
        raise


def write(f, data, path: str | os.PathLike, what: str = "") -> None:
    """f.write(data) for the open file `f` of `path`."""
    with reporting_full(path, what):
        boundary("write", path)
        f.write(data)


def sync(f, path: str | os.PathLike, what: str = "") -> None:
    """Flush `f`'s buffer and fsync it (a full disk may show only now, when buffered bytes reach the kernel)."""
    with reporting_full(path, what):
        boundary("sync", path)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: str | os.PathLike, data: bytes | str, what: str = "", durable: bool = False) -> None:
    """Write a whole (small) file; `durable`: fsync it before returning."""
    raw = data.encode() if isinstance(data, str) else data
    with reporting_full(path, what):
        boundary("write", path)
        with open(path, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, what: str = "") -> None:
    with reporting_full(dst, what):
        boundary("write", dst)
        shutil.copy2(src, dst)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    boundary("rename", dst)
    os.replace(src, dst)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a whole directory tree."""
    boundary("remove", path)
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def allocate(fd: int, nbytes: int, path: str | os.PathLike, what: str = "") -> None:
    """Reserve `nbytes` of disk for the open file descriptor `fd` now, so that a disk filling up later cannot fail
    writes into it (for a memory-mapped file that failure is a SIGBUS, not an error). Filesystems without fallocate
    get plain zeros written by the C library: slower, as safe."""
    with reporting_full(path, what):
        boundary("allocate", path)
        if nbytes <= 0:
            return
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, nbytes)  # (a filesystem that cannot reserve: sparse, as before)


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the names of the files in it survive a power loss (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checksum:
    """crc32 of a byte stream, fed in pieces: cheap (~4 GiB/s here, a fraction of a disk write) and enough to
    tell accidental damage (a flipped byte, a torn or zeroed block) from good data; not a defence against a
    deliberate forgery, which the resume never needs."""

    def __init__(self) -> None:
        self.crc = 0

    def update(self, data) -> Checksum:
        self.crc = zlib.crc32(data, self.crc)
        return self

    @property
    def value(self) -> str:
        return f"crc32:{self.crc:08x}"


def checksum(data) -> str:
    return Checksum().update(data).value


def sealed(text: str) -> bytes:
    """`text` followed by a line holding its checksum: a record file that can tell it was damaged."""
    body = text.encode() if text.endswith("\n") else (text + "\n").encode()
    return body + checksum(body).encode() + b"\n"


def unseal(raw: bytes) -> str | None:
    """The text of a `sealed` record, or None when its checksum line is missing or does not match."""
    body, sep, tail = raw.rstrip(b"\n").rpartition(b"\n")
    if not sep or tail.decode(errors="replace") != checksum(body + b"\n"):
        return None
    return (body + b"\n").decode(errors="replace")
