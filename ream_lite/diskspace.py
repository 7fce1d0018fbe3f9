"""Refuse, before any work, a compression whose output or spilled hidden states will not fit on disk.

A full disk found hours in is the worst way to learn it; the sizes are known from the headers (see
`ream_lite.estimate`), so they are compared with the free space up front. Paths that do not exist yet are judged
by their nearest existing parent; needs that land on the same filesystem are added up.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ream_lite.errors import ReamLiteError

GiB = 1024**3


@dataclass(frozen=True)
class _Need:
    path: Path
    nbytes: int
    what: str  # "the output", "hidden states"
    advice: str  # what to change, as an option name or a directory


def check_disk_space(
    output_dir: str | os.PathLike, output_bytes: int, work_dir: str | os.PathLike | None = None,
    work_dir_bytes: int = 0,
) -> None:
    """Raise ReamLiteError (one line) when `output_bytes` under `output_dir` and `work_dir_bytes` under `work_dir`
    do not fit in the free space of their filesystems."""
    message = disk_shortfall(output_dir, output_bytes, work_dir, work_dir_bytes)
    if message:
        raise ReamLiteError(message)


def disk_shortfall(
    output_dir: str | os.PathLike, output_bytes: int, work_dir: str | os.PathLike | None = None,
    work_dir_bytes: int = 0,
) -> str | None:
    """The message `check_disk_space` would raise, or None when everything fits."""
    needs = [_Need(Path(output_dir), output_bytes, "the output", "another output directory")]
    if work_dir is not None and work_dir_bytes > 0:
        needs.append(_Need(Path(work_dir), work_dir_bytes, "hidden states", "another --work-dir (or raise --max-cpu-memory)"))
    by_fs: dict[int, list[tuple[_Need, Path]]] = {}
    for need in needs:
        existing = nearest_existing(need.path)
        by_fs.setdefault(os.stat(existing).st_dev, []).append((need, existing))
    for group in by_fs.values():
        total = sum(n.nbytes for n, _ in group)
        existing = group[0][1]
        free = shutil.disk_usage(existing).free
        if total <= free:
            continue
        first, rest = group[0][0], [n for n, _ in group[1:]]
        parts = f"{_gib(first.nbytes)} needed for {first.what}"
        parts += "".join(f" and {_gib(n.nbytes)} for {n.what} in {n.path}" for n in rest)
        advice = " or ".join(n.advice for n, _ in group)
        return f"{first.path}: {parts}, {_gib(free)} free on {filesystem_name(existing)}; free space or choose {advice}"
    return None


def nearest_existing(path: Path) -> Path:
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def filesystem_name(path: Path) -> str:
    """The device of the filesystem holding `path` (as /proc/mounts names it), else its mount point."""
    mount = Path(path).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    devices = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                # mount points are written with octal escapes for blanks (\040)
                if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                    devices.append(fields[0])
    except OSError:
        pass
    return devices[-1] if devices else str(mount)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"
