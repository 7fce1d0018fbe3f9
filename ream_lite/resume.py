"""Resume: what `compress` records in its partial output after every finished layer, and the checks on resuming.

After each layer the partial output `<OUT>.partial/` gets, in this order:
  1. the next layer's input hidden states, `resume/hidden-<step>.bin` (raw bytes of the store, synced),
  2. `resume/manifest.json`, replaced atomically: the settings and input fingerprint of the run, how many steps
     (decoder layers, then MTP layers) are done, the writer's state (shards, entries, bytes so far), the per-layer
     records written so far, and which hidden-state file belongs to that state.
A kill at any moment leaves the last manifest valid: everything written after it (tensor bytes appended to a shard,
a newer hidden-state file) is discarded on resume. Since the saved hidden states are exactly those the next layer
would have read, and every computation is seeded, the resumed run's output is byte for byte an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.writer import RESUME_MANIFEST, RESUME_SUBDIR
from ream_lite.engine.store import HiddenStateStore
from ream_lite.errors import ReamLiteError

FORMAT = 1


def input_fingerprint(layout: ModelLayout) -> dict:
    """What identifies the input model without reading its weights: config.json, and per shard its size,
    modification time and a hash of its header (names, dtypes, shapes and offsets of every tensor)."""
    shards = {}
    for path in sorted({e.path for e in layout.reader.entries.values()}):
        st = os.stat(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = hashlib.sha256(f.read(n)).hexdigest()
        shards[Path(path).name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": header}
    config = hashlib.sha256((layout.path / "config.json").read_bytes()).hexdigest()
    return {"config_sha256": config, "shards": shards}


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
        """A one-line reason why `recorded` (a manifest) cannot be resumed by this run, or None."""
        if recorded.get("format") != FORMAT:
            return "it was written by another version of ream-lite"
        old = recorded.get("settings", {})
        changed = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            return f"settings differ: {k} was {old.get(k)!r}, now {self.settings.get(k)!r}{more}"
        if recorded.get("inputs") != self.inputs:
            old_shards, new_shards = recorded.get("inputs", {}).get("shards", {}), self.inputs["shards"]
            diff = sorted(n for n in set(old_shards) | set(new_shards) if old_shards.get(n) != new_shards.get(n))
            return "the input model changed" + (f" ({diff[0]})" if diff else " (config.json)")
        if recorded.get("calibration") != self.calibration:
            return "the calibration tokens differ (calibration files or tokenizer changed)"
        return None


class ResumeLog:
    """The resume records inside one partial output directory."""

    def __init__(self, partial_dir: Path):
        self.partial = Path(partial_dir)
        self.dir = self.partial / RESUME_SUBDIR
        self.path = self.dir / RESUME_MANIFEST

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ReamLiteError(f"{self.path}: unreadable resume record; start over with --overwrite") from None

    def commit(self, identity: RunIdentity, steps_done: int, total_steps: int, writer_state: dict, layers: list,
               hidden: HiddenStateStore, first_run: dict) -> None:
        """Record that `steps_done` steps are finished: hidden states first, then the manifest that points to them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"hidden-{steps_done:05d}.bin"
        hidden.save(self.dir / name)
        manifest = {
            "format": FORMAT, "settings": identity.settings, "inputs": identity.inputs,
            "calibration": identity.calibration, "steps_done": steps_done, "total_steps": total_steps,
            "hidden": {"file": name, "lengths": hidden.lengths}, "writer": writer_state, "layers": layers,
            "first_run": first_run,
        }
        tmp = self.dir / (RESUME_MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _sync_dir(self.dir)
        _sync_dir(self.partial)  # the shard files' own directory entries, for power loss
        for p in self.dir.glob("hidden-*.bin"):  # older snapshots: no manifest points to them any more
            if p.name != name:
                p.unlink()

    def hidden_path(self, manifest: dict) -> Path:
        return self.dir / manifest["hidden"]["file"]

    def remove(self) -> None:
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


def _sync_dir(path: Path) -> None:
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
