"""Hostile and malformed input files: every one refused in one line, before any work, with no traceback, no
allocation beyond a small bound and nothing written. The cases come from `ream_lite.faults` (also run, with the
whole config fuzz, by benchmarks/faults.py)."""

import json
import resource
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ream_lite import faults
from ream_lite.checkpoint.reader import INDEX_NAME, CheckpointReader
from ream_lite.cli import main
from ream_lite.errors import ReamLiteError

CONFIG_VALUES = (0, "8", 1e30)  # per numeric key of config.json (and the key deleted); all in the bench


def compress(src, out, calib, *extra):
    return CliRunner().invoke(main, ["compress", str(src), str(out), "--experts", "5", "--calib", str(calib),
                                     "--seq-len", "16", "--num-sequences", "6", "--device", "cpu", *extra])


def refused(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


def nothing_written(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists() and \
        not out.with_name(out.name + ".partial.lock").exists()


@pytest.fixture(scope="module")
def shard_bytes(model_dirs) -> bytes:
    return (model_dirs["qwen3_moe"][1] / "model.safetensors").read_bytes()


def test_malformed_safetensors_headers_are_refused(shard_bytes, tmp_path):
    """Each malformed header of a real shard: refused by the reader in one line, allocating little more than the
    file's own size however large the header says it is."""
    cases = dict(faults.header_mutations(shard_bytes))
    assert len(cases) >= 25
    for case, raw in cases.items():
        d = tmp_path / case.replace(" ", "_")
        d.mkdir()
        (d / "model.safetensors").write_bytes(raw)
        tracemalloc.start()
        try:
            with pytest.raises(ReamLiteError) as e:
                CheckpointReader(d)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "model.safetensors" in str(e.value) and "\n" not in str(e.value), case
        assert peak < 4 * len(raw) + 2**20, f"{case}: {peak:,} bytes allocated for a {len(raw):,}-byte file"


def test_a_malformed_header_is_refused_by_compress_with_nothing_written(shard_bytes, model_dirs, tmp_path,
                                                                        calib_file):
    d = tmp_path / "m"
    shutil.copytree(model_dirs["qwen3_moe"][1], d)
    (d / "model.safetensors").write_bytes(dict(faults.header_mutations(shard_bytes))["overlapping tensors"])
    msg = refused(compress(d, tmp_path / "out", calib_file))
    assert "overlaps the previous tensor" in msg and nothing_written(tmp_path / "out")


def test_a_tensor_of_unknown_dtype_is_refused_before_the_run(model_dirs, tmp_path, calib_file):
    """Even one that would only be copied (not a layer's): it used to be copied unchecked and the run succeed."""
    d = tmp_path / "m"
    shutil.copytree(model_dirs["qwen3_moe"][1], d)
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["extra.weight"] = {"dtype": "F4", "shape": [4], "data_offsets": [end, end + 2]}
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    (d / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :] + b"\0\0")
    msg = refused(compress(d, tmp_path / "out", calib_file))
    assert "'extra.weight'" in msg and "dtype 'F4'" in msg and nothing_written(tmp_path / "out")


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory) -> Path:
    """The tiny Qwen3-MoE in several shards with an index, as hub checkpoints are."""
    from tiny_models import save_model

    return save_model(model_dirs["qwen3_moe"][0], tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


def test_index_cases(sharded, tmp_path):
    weight_map = json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))
    tried = 0
    for name, value in faults.index_mutations(weight_map):
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(sharded, d)
        (d / INDEX_NAME).write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        with pytest.raises(ReamLiteError) as e:
            CheckpointReader(d)
        assert INDEX_NAME in str(e.value) or "missing" in str(e.value), (name, str(e.value))
        tried += 1
    assert tried >= 10


def test_symlinked_shards_are_followed(sharded, tmp_path):
    """The Hugging Face cache holds a snapshot as symlinks into a blobs directory beside it."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for p in sharded.iterdir():
        target = blobs / f"blob-{p.name}"
        shutil.copy(p, target)
        (snap / p.name).symlink_to(target)
    with CheckpointReader(snap) as r:
        assert set(r.keys()) == set(CheckpointReader(sharded).keys())


def test_config_fuzz(model_dirs, tmp_path, calib_file):
    """Every numeric key of config.json deleted, or set to a negative, zero, string, absurd, fractional or list
    value: the run succeeds (a key it does not need) or is refused in one line with nothing written, and no case
    allocates much (max RSS, which only grows)."""
    src = model_dirs["qwen3_moe"][1]
    config = json.loads((src / "config.json").read_text())
    assert compress(src, tmp_path / "warm", calib_file).exit_code == 0  # (RSS of a normal run, before the fuzz)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"ran": 0, "refused": 0}
    for i, (name, cfg) in enumerate(faults.config_mutations(config, CONFIG_VALUES)):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        (d / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"out{i}"
        r = compress(d, out, calib_file)
        if r.exit_code == 0:
            outcomes["ran"] += 1
        else:
            refused(r)
            assert nothing_written(out), name
            outcomes["refused"] += 1
        shutil.rmtree(d)
        shutil.rmtree(out, ignore_errors=True)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"config fuzz: {outcomes}, max RSS grew {grown:.0f} MiB")
    assert outcomes["refused"] > 50 and grown < 256
