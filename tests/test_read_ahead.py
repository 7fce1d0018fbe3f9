"""Read-ahead: while a layer computes, a thread fetches into the page cache the bytes the next reads want (the next
layer once the current one is cached, the next expert chunk when chunks are read from the checkpoint). A hint only:
the output's bytes are the same with it and without it."""

import os
import time

import pytest

from ream_lite.arch.layout import ModelLayout
from ream_lite.checkpoint.reader import CheckpointReader, ReadAhead
from ream_lite.engine.streamer import StreamOptions
from ream_lite.pipeline import CompressConfig, compress


@pytest.fixture
def advised(monkeypatch):
    """Every range queued for the read-ahead thread, as (file, start, end)."""
    calls: list[tuple[str, int, int]] = []
    real = ReadAhead.add

    def record(self, ranges):
        calls.extend((os.path.realpath(p), a, b) for p, a, b in ranges)
        return real(self, ranges)

    monkeypatch.setattr(ReadAhead, "add", record)
    return calls


def byte_ranges(reader: CheckpointReader, keys) -> set[tuple[str, int, int]]:
    return {(os.path.realpath(e.path), e.start, e.start + e.nbytes)
            for k in keys for e in reader.entry(k).parts.values()}


def covered(calls, ranges) -> bool:
    """Whether every range lies inside one advised range."""
    return all(any(f == p and a <= s and e <= b for p, a, b in calls) for f, s, e in ranges)


def test_read_ahead_advises_the_bytes_of_the_keys_within_the_budget(model_dirs, advised):
    layout = ModelLayout(str(model_dirs["qwen3_moe"][1]))
    r = layout.reader
    keys = layout.expert_keys(1)
    sizes = [sum(e.nbytes for e in r.entry(k).parts.values()) for k in keys]
    assert r.read_ahead(keys, sum(sizes)) == sum(sizes)
    assert covered(advised, byte_ranges(r, keys))
    assert sum(b - a for _, a, b in advised) == sum(sizes)
    assert len(advised) < len(keys)  # (neighbouring tensors joined into one call)
    advised.clear()
    budget = sum(sizes[:3]) + sizes[3] // 2  # stops before the first key that does not fit
    assert r.read_ahead(keys, budget) == sum(sizes[:3])
    assert covered(advised, byte_ranges(r, keys[:3])) and not covered(advised, byte_ranges(r, keys[3:4]))
    assert r.bytes_read == 0  # (hints are not reads of the run)
    deadline = time.monotonic() + 30
    while not r._ahead.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r._ahead.bytes_fetched == sum(sizes) + sum(sizes[:3])  # (the thread read every byte queued)
    layout.close()
    assert r._ahead is None


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_compress_reads_ahead_and_writes_the_same_bytes(model_dirs, tmp_path, advised, monkeypatch, cache):
    """With the layer cached, the next layer is advised once the current one is read; uncached, each next chunk
    (chunks of 3 experts). Turned off (`REAM_LITE_READ_AHEAD=0`), nothing is queued and the output is the same."""
    src = model_dirs["qwen3_moe"][1]

    def run(name: str) -> bytes:
        out = compress(CompressConfig(model=str(src), output=str(tmp_path / name), experts=5, num_sequences=6,
                                      seq_len=32, guard="off", stream=StreamOptions(
                                          device="cpu", progress=False, expert_cache=cache, experts_per_chunk=3)))
        return (out / "model.safetensors").read_bytes()

    monkeypatch.setenv("REAM_LITE_READ_AHEAD", "1")  # (on by default where a core is free for it: `reads_ahead`)
    with_hints = run("on")
    layout = ModelLayout(str(src))
    if cache == "auto":  # (layer 1's keys advised while layer 0 computes)
        assert covered(advised, byte_ranges(layout.reader, layout.layer_keys(1)))
    else:  # (experts 3..5 of each layer advised while 0..2 compute)
        for layer in range(len(layout.layers)):
            assert covered(advised, byte_ranges(layout.reader, [k for e in (3, 4, 5)
                                                                 for k in layout.per_expert_keys(layer, e)]))
    layout.close()
    advised.clear()
    monkeypatch.setenv("REAM_LITE_READ_AHEAD", "0")
    assert run("off") == with_hints
    assert advised == []


def test_read_ahead_by_default_where_a_core_is_free(monkeypatch):
    import torch

    from ream_lite.engine.budget import usable_cores
    from ream_lite.engine.streamer import reads_ahead

    monkeypatch.delenv("REAM_LITE_READ_AHEAD", raising=False)
    assert reads_ahead(torch.device("cuda", 0))  # (the GPU computes: the host's cores read)
    assert reads_ahead(torch.device("cpu")) == (usable_cores() > torch.get_num_threads())
    monkeypatch.setenv("REAM_LITE_READ_AHEAD", "0")
    assert not reads_ahead(torch.device("cuda", 0))
    monkeypatch.setenv("REAM_LITE_READ_AHEAD", "1")
    assert reads_ahead(torch.device("cpu"))
