"""One run per output: `compress` and `apply` hold `<OUT>.partial.lock` while they write `<OUT>.partial/`.

Two runs writing one partial output would interleave shards and resume records into a model that looks complete
and is not. The lock is an flock on a small file beside the partial directory (not inside it: a fresh run removes
the directory): the kernel releases it when its process dies however it dies, so a lock file left by a killed run
is stale by construction and is taken over with a note. The file records who holds it (host, pid, command start)
for the refusal message. On a filesystem without flock (some network mounts) the holder's pid is checked instead,
which is only reliable on one host, and said so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from ream_lite.errors import ReamLiteError

log = logging.getLogger(__name__)


def lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial.lock")


class OutputLock:
    """Context manager: hold the lock of output directory `out_dir` (refused with one line if another run holds
    it); `command` names this run in the lock file."""

    def __init__(self, out_dir: str | os.PathLike, command: str = "ream-lite"):
        self.out_dir = Path(out_dir)
        self.path = lock_path(self.out_dir)
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if held is False:  # another live process holds it
                holder = _describe(_read(fd))
                os.close(fd)
                raise ReamLiteError(f"{self.out_dir}: another ream-lite run is writing this output ({holder}); wait "
                                    f"for it to finish or stop it (its lock: {self.path})")
            # the file may have been removed (and another created) between our open and our lock: retry on the new
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous and held is True:
                log.warning("%s: taking over a stale lock (%s, which is no longer running)", self.path,
                            _describe(previous))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                       "command": self.command}) + "\n").encode(), 0)
            self._fd = fd
            return

    def _flock(self, fd: int) -> bool | None:
        """True: locked by us; False: held by another process; None: locked by us on a filesystem without flock
        after checking the recorded holder is not a live process on this host."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        holder = _read(fd)
        if holder and holder.get("host") == socket.gethostname() and _alive(int(holder.get("pid", 0))):
            return False
        log.warning("%s: this filesystem has no file locks; only runs on this host are kept apart", self.path)
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed while held, so a waiting process re-checks the inode (see acquire)
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        rec = json.loads(raw) if raw.strip() else {}
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"
