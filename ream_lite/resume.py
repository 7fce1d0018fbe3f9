"""Resume: what `compress` records in its partial output at snapshot points, and the checks on resuming.

A snapshot after step s (decoder layers, then MTP layers) writes into `<OUT>.partial/resume/`, in this order:
  1. the next layer's input hidden states, `hidden-<s>.bin` (raw bytes of the store, synced),
  2. the records not yet on disk, in small files written once each: `layers/<i>.json`, the i-th MoE layer's
     record, and `shards/<i>-<j>.json`, the j-th batch of shard i's tensor entries (those the writer added to it
     since the previous snapshot),
  3. `manifest.json`, replaced atomically: the settings and input fingerprint of the run, `steps_done` = s, how
     many layer records and entry batches are valid, each shard's file and data length, and which hidden-state
     file belongs to that state.
So a snapshot writes the hidden states and what finished since the last one, never the whole history again: the
manifest stays a few KB however long the run (only its list of shards grows, by one short line per output shard).
A kill at any moment leaves the last manifest valid: everything written after it (tensor bytes appended to a
shard, shards begun, record files, a newer hidden-state file) is discarded or overwritten on resume, which re-runs
the steps after s. Since the saved hidden states are exactly those step s + 1 would have read, and every
computation is seeded, the resumed run's output is byte for byte an uninterrupted one's.

Damage is detected, not carried into the model: every record file ends with a checksum line (`files.sealed`), the
manifest holds the hidden-state file's checksum, the entry batches hold a checksum of every tensor written (the
writer checks the partial shards against them on resume), and the input fingerprint holds content samples of
every input shard, so an input rewritten in place (same names, shapes, size and even modification time) is refused.

When snapshots are taken is `SnapshotSchedule`'s choice (`--snapshot-every`): the hidden states are one
[tokens x hidden] buffer (6 GiB at the paper's calibration size of Qwen3-30B-A3B), so a snapshot after every layer
can take a large share of the run. After the last step a record without hidden states is always committed (unless
snapshots are off): it is small, and a kill while the output is being finished then re-runs no layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint import files
from ream_lite.checkpoint.writer import RESUME_MANIFEST, RESUME_SUBDIR
from ream_lite.engine.store import HiddenStateStore
from ream_lite.errors import ReamLiteError

# 3: records sealed with checksums, tensor checksums, sampled input contents; 2: records in files of their own,
# snapshots at intervals; 1: every record in the manifest, every layer
FORMAT = 3
LAYERS, SHARDS = "layers", "shards"  # subdirectories of the record files (see the module docstring)

# --snapshot-every auto: a snapshot when the time since the last one reaches AUTO_COST_RATIO times what the last
# one took, so snapshots take at most 1 / (1 + 20) ~ 5% of the run, while a kill loses on average half an interval,
# ~10 snapshot durations (Qwen3-30B-A3B at the paper's size: a 6 GiB snapshot takes ~5-10 s on an NVMe disk, so
# one every ~2-3 minutes, every few layers). AUTO_MAX_INTERVAL_S bounds the work a kill loses where snapshots are
# slow (over 90 s each: a slow disk or huge buffers): then they may cost more than 5%.
AUTO_COST_RATIO = 20
AUTO_MAX_INTERVAL_S = 30 * 60


# content samples of each input shard in the fingerprint: SAMPLE_BLOCKS blocks of SAMPLE_BYTES, evenly spread
# (a shard this small or smaller is hashed whole): 512 KiB read per shard, ~80 MiB for a 163-shard DeepSeek-V3
SAMPLE_BLOCKS = 8
SAMPLE_BYTES = 64 * 1024


def input_fingerprint(layout: ModelLayout) -> dict:
    """What identifies the input model without reading all its weights: config.json, and per shard its size,
    modification time, a hash of its header (names, dtypes, shapes and offsets of every tensor) and a checksum of
    evenly spread samples of its contents (`content_sample`)."""
    shards = {}
    gguf_headers = layout.reader.gguf.header_digests if layout.gguf else {}
    for path in sorted({e.path for e in layout.reader.entries.values()}):
        st = os.stat(path)
        with open(path, "rb") as f:
            if layout.gguf:  # (its header: metadata and tensor index, up to the first tensor)
                header = gguf_headers[Path(path).name]
            else:
                n = int.from_bytes(f.read(8), "little")
                header = hashlib.sha256(f.read(n)).hexdigest()
            sample = content_sample(f, st.st_size)
        shards[Path(path).name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": header,
                                   "content_sample": sample}
    raw = json.dumps(layout.config, sort_keys=True).encode() if layout.gguf else (layout.path / "config.json"
                                                                                   ).read_bytes()
    config = hashlib.sha256(raw).hexdigest()
    return {"config_sha256": config, "shards": shards}


def content_sample(f, size: int) -> str:
    """Checksum of SAMPLE_BLOCKS blocks spread evenly over the open file `f` of `size` bytes (the first starting
    at 0, the last ending at the end), or of the whole file when it is no larger."""
    crc = files.Checksum()
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        starts = range(0, size, SAMPLE_BYTES)
    else:
        stride = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
        starts = [round(i * stride) for i in range(SAMPLE_BLOCKS)]
    for a in starts:
        crc.update(os.pread(f.fileno(), min(SAMPLE_BYTES, size - a), a))
    return crc.value


def tokens_hash(sequences: list[torch.Tensor]) -> str:
    """sha256 of the calibration token ids in order: covers the text, the tokenizer, the mix and the seed."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class RunIdentity:
    """Everything a resumed run must share with the interrupted one for the output to be the same bytes."""

    settings: dict  # compress settings and the numerics of the execution (device type, dtype, chunking, batching)
    inputs: dict  # input_fingerprint()
    calibration: str  # tokens_hash()

    def mismatch(self, recorded: dict) -> str | None:
        """A one-line reason why `recorded` (a manifest of this FORMAT, see ResumeLog.load) cannot be resumed by
        this run, or None."""
        old = recorded.get("settings", {})
        changed = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            return f"settings differ: {k} was {old.get(k)!r}, now {self.settings.get(k)!r}{more}"
        if recorded.get("inputs") != self.inputs:
            old_shards, new_shards = recorded.get("inputs", {}).get("shards", {}), self.inputs["shards"]
            diff = sorted(n for n in set(old_shards) | set(new_shards) if old_shards.get(n) != new_shards.get(n))
            if not diff:
                return "the input model changed (config.json)"
            old, new = old_shards.get(diff[0]) or {}, new_shards.get(diff[0]) or {}
            what = next((k for k in ("bytes", "header_sha256", "content_sample", "mtime_ns")
                         if old.get(k) != new.get(k)), "")
            how = {"bytes": "size", "header_sha256": "tensor index", "content_sample": "contents",
                   "mtime_ns": "modification time"}.get(what, "presence")
            return f"the input model changed ({diff[0]}: {how})"
        if recorded.get("calibration") != self.calibration:
            return "the calibration tokens differ (calibration files or tokenizer changed)"
        return None


def parse_snapshot_every(value: str | int) -> str | int:
    """--snapshot-every as given: "auto", "off", or a number of layers between snapshots ("layer" = 1)."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    if text == "layer":
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ReamLiteError(f"--snapshot-every {value}: give auto, layer, off or a positive number of layers")
    return n


class SnapshotSchedule:
    """When `compress` takes a resume snapshot, after a finished step: "auto" (see AUTO_COST_RATIO; the first
    right after the first layer, so a run interrupted early can resume and the cost of one is measured), every N
    steps (steps_done a multiple of N, wherever the run started), or "off" (never). The last step's record, which
    holds no hidden states, is always due unless snapshots are off."""

    def __init__(self, every: str | int = "auto", clock: Callable[[], float] = time.monotonic):
        self.every = parse_snapshot_every(every)
        self.clock = clock
        self._since = clock()  # when the last snapshot ended (or the schedule began)
        self._cost: float | None = None  # seconds the last snapshot took; None before the first

    def due(self, steps_done: int, total_steps: int) -> bool:
        if self.every == "off":
            return False
        if steps_done >= total_steps:
            return True
        if self.every != "auto":
            return steps_done % self.every == 0
        if self._cost is None:
            return True
        elapsed = self.clock() - self._since
        return elapsed >= AUTO_COST_RATIO * self._cost or elapsed >= AUTO_MAX_INTERVAL_S

    def took(self, seconds: float) -> None:
        """A snapshot just ended after `seconds`."""
        self._cost = seconds
        self._since = self.clock()


def expected_snapshots(every: str | int, total_steps: int, step_seconds: float, snapshot_seconds: float) -> int:
    """Hidden-state snapshots a run of `total_steps` takes if each step takes `step_seconds` and each snapshot
    `snapshot_seconds`: the schedule itself, run on a simulated clock (exact for N / layer / off)."""
    now = 0.0
    schedule = SnapshotSchedule(every, clock=lambda: now)
    count = 0
    for steps_done in range(1, total_steps):  # the last step's record holds no hidden states
        now += step_seconds
        if schedule.due(steps_done, total_steps):
            now += snapshot_seconds
            schedule.took(snapshot_seconds)
            count += 1
    return count


class ResumeLog:
    """The resume records inside one partial output directory. `continues`: the manifest (as `load` returns it)
    of the run this process resumes, whose record files are on disk already."""

    def __init__(self, partial_dir: Path, continues: dict | None = None):
        self.partial = Path(partial_dir)
        self.dir = self.partial / RESUME_SUBDIR
        self.path = self.dir / RESUME_MANIFEST
        # the record files the manifest on disk counts: each is written once; files past these counts are leftovers
        # of a kill between writing them and the manifest, overwritten when their step is done again
        self._layers = 0  # layer records stored
        self._shards: list[tuple[int, int]] = []  # per shard: (tensor entries stored, entry batch files)
        if continues is not None:
            self._layers = len(continues["layers"])
            shards = continues["writer"]["shards"]
            self._shards = [(len(s["entries"]), n) for s, n in zip(shards, continues["entry_batches"])]
        self.snapshots = 0  # hidden-state snapshots this process wrote
        self.bytes_written = 0  # and every byte it wrote into the resume directory

    def load(self) -> dict | None:
        """The last committed manifest, with its records assembled as the pipeline and the writer take them:
        `layers` the list of MoE layer records, `writer` a CheckpointWriter state; None if there is none."""
        if not self.path.exists():
            return None
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise ReamLiteError(f"{self.path}: unreadable resume record ({e.strerror}); start over with "
                                "--overwrite") from None
        text = files.unseal(raw)
        try:  # (unsealed: a record of an older version, which holds one JSON line, or a damaged one)
            manifest = json.loads(text if text is not None else raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _damaged(self.path) from None
        if isinstance(manifest, dict) and manifest.get("format") not in (FORMAT, None):
            raise ReamLiteError(
                f"{self.partial} holds an interrupted run recorded by another version of ream-lite (resume format "
                f"{manifest.get('format')}, this version reads {FORMAT}); finish it with that version, or start "
                "over with --overwrite")
        if text is None or not isinstance(manifest, dict):
            raise _damaged(self.path)
        try:
            w = manifest["writer"]
            layers = [self._read(LAYERS, f"{i:05d}") for i in range(manifest["layers"])]
            shards = [self._shard(i, rec) for i, rec in enumerate(w["shards"])]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise ReamLiteError(f"{self.dir}: incomplete resume records; start over with --overwrite") from None
        return {**manifest, "layers": layers, "entry_batches": [rec["batches"] for rec in w["shards"]],
                "writer": {"shards": shards, "bytes_written": w["bytes_written"]}}

    def commit(self, identity: RunIdentity, steps_done: int, total_steps: int, writer_state: dict, layers: list,
               hidden: HiddenStateStore | None, first_run: dict) -> None:
        """Record that `steps_done` steps are finished: hidden states first (None when no step is left to read
        them), then the records not yet on disk, then the manifest that points to them."""
        with files.reporting_full(self.dir, "the resume record"):
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / LAYERS).mkdir(exist_ok=True)
            (self.dir / SHARDS).mkdir(exist_ok=True)
        name = None
        hidden_sum = None
        if hidden is not None:
            name = f"hidden-{steps_done:05d}.bin"
            hidden_sum = hidden.save(self.dir / name)
            self.snapshots += 1
            self.bytes_written += hidden.nbytes
        self._store_layers(layers)
        manifest = {
            "format": FORMAT, "settings": identity.settings, "inputs": identity.inputs,
            "calibration": identity.calibration, "steps_done": steps_done, "total_steps": total_steps,
            "hidden": {"file": name, "lengths": hidden.lengths, "checksum": hidden_sum} if hidden is not None
            else None,
            "layers": len(layers), "first_run": first_run,
            "writer": {"shards": self._store_shards(writer_state["shards"]),
                       "bytes_written": writer_state["bytes_written"]},
        }
        tmp = self.dir / (RESUME_MANIFEST + ".tmp")
        self._write(tmp, manifest)
        files.replace(tmp, self.path)
        files.sync_dir(self.dir)
        files.sync_dir(self.partial)  # the shard files' own directory entries, for power loss
        for p in self.dir.glob("hidden-*.bin"):  # older snapshots: no manifest points to them any more
            if p.name != name:
                files.remove(p)

    def _store_layers(self, layers: list) -> None:
        """The layer records past those stored, a file each."""
        if len(layers) > self._layers:
            for i in range(self._layers, len(layers)):
                self._write(self.dir / LAYERS / f"{i:05d}.json", layers[i])
            files.sync_dir(self.dir / LAYERS)
            self._layers = len(layers)

    def _store_shards(self, shards: list[dict]) -> list[dict]:
        """The tensor entries each shard got since the last commit, as one batch file; returns what the manifest
        keeps of every shard (its file, data length, whether it is closed, how many batches hold its entries)."""
        self._shards += [(0, 0)] * (len(shards) - len(self._shards))
        out = []
        for i, s in enumerate(shards):
            stored, batches = self._shards[i]
            names = list(s["entries"])  # (a shard's entries are only ever appended to)
            if len(names) > stored:
                batch = {"entries": {k: s["entries"][k] for k in names[stored:]},
                         "sums": {k: s["sums"][k] for k in names[stored:]}}
                self._write(self.dir / SHARDS / f"{i:05d}-{batches:05d}.json", batch)
                stored, batches = len(names), batches + 1
                self._shards[i] = (stored, batches)
            out.append({"file": s["file"], "data_bytes": s["data_bytes"], "closed": s["closed"], "batches": batches})
        files.sync_dir(self.dir / SHARDS)
        return out

    def _shard(self, i: int, rec: dict) -> dict:
        """Shard i's writer state: its manifest record with its entries gathered from its batch files."""
        entries, sums = {}, {}
        for j in range(rec["batches"]):
            batch = self._read(SHARDS, f"{i:05d}-{j:05d}")
            entries.update(batch["entries"])
            sums.update(batch["sums"])
        return {"file": rec["file"], "entries": entries, "sums": sums, "data_bytes": rec["data_bytes"],
                "closed": rec["closed"]}

    def _write(self, path: Path, obj) -> None:
        data = files.sealed(json.dumps(obj))
        files.write_file(path, data, "the resume record", durable=True)
        self.bytes_written += len(data)

    def _read(self, kind: str, stem: str):
        path = self.dir / kind / f"{stem}.json"
        text = files.unseal(path.read_bytes())
        if text is None:
            raise _damaged(path)
        return json.loads(text)

    def hidden_path(self, manifest: dict) -> Path | None:
        """The snapshot's hidden states; None when every step is done (only finishing the output is left)."""
        return self.dir / manifest["hidden"]["file"] if manifest.get("hidden") else None

    def remove(self) -> None:
        if self.dir.exists():
            files.remove(self.dir)


def _damaged(path: Path) -> ReamLiteError:
    return ReamLiteError(f"{path}: resume record damaged since it was written (checksum mismatch); the layers it "
                         "records cannot be trusted: start over with --overwrite")
