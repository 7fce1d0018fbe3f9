"""Lazy reading, streaming writing, and clean errors on bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_model, save_model
from transformers import AutoModelForCausalLM

from ream_lite.arch import ModelLayout
from ream_lite.checkpoint import CheckpointReader, CheckpointWriter
from ream_lite.errors import ReamLiteError


def test_reader_reads_one_tensor_and_row_ranges(tmp_path):
    t = {"a": torch.arange(24, dtype=torch.float32).reshape(4, 6), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    r = CheckpointReader(tmp_path)
    assert r.shape("a") == (4, 6)
    assert torch.equal(r.get("a"), t["a"])
    assert r.bytes_read == 96
    assert torch.equal(r.get("a", rows=(1, 3)), t["a"][1:3])
    assert r.bytes_read == 96 + 48  # only the rows asked for
    assert r.get("b").dtype == torch.bfloat16
    assert r.get("b", dtype=torch.float32).dtype == torch.float32


def test_sharded_checkpoint_is_read_through_its_index(model_dirs, tmp_path):
    model, _ = model_dirs["qwen3_moe"]
    d = save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    r = CheckpointReader(d)
    sd = model.state_dict()
    assert torch.equal(r.get("model.layers.1.self_attn.q_proj.weight"), sd["model.layers.1.self_attn.q_proj.weight"])
    gu = sd["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(r.get("model.layers.2.mlp.experts.5.up_proj.weight"), gu[5, 16:])


def test_writer_round_trip_shards_index_and_side_files(model_dirs, tmp_path):
    model, src = model_dirs["mixtral"]
    r = CheckpointReader(src)
    out = tmp_path / "out"
    w = CheckpointWriter(out, max_shard_bytes=30_000)
    keys = sorted(r.keys())
    for k in keys[: len(keys) // 2]:
        w.copy_from(r, k)  # byte copy, not decoded
    for k in keys[len(keys) // 2 :]:
        w.add(k, r.get(k))
    assert (tmp_path / "out.partial").exists() and not out.exists()  # incomplete output never looks complete
    cfg = json.loads((src / "config.json").read_text())
    w.finish(cfg, source_dir=src)
    assert out.exists() and not (tmp_path / "out.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(keys)
    assert index["metadata"]["total_size"] == sum(r.entry(k).nbytes for k in keys)
    for s in shards:
        for k, v in load_file(str(out / s)).items():  # the safetensors library itself reads our shards
            assert index["weight_map"][k] == s
            assert torch.equal(v, r.get(k))
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_writer_refuses_existing_output_and_never_writes_input(model_dirs, tmp_path):
    _, src = model_dirs["olmoe"]
    with pytest.raises(ReamLiteError, match="already exists"):
        CheckpointWriter(src)
    before = sorted(p.name for p in src.iterdir())
    w = CheckpointWriter(tmp_path / "x")
    w.add("t", torch.zeros(2))
    w.abort()
    assert not (tmp_path / "x.partial").exists()
    assert sorted(p.name for p in src.iterdir()) == before


def test_truncated_shard_is_reported(tmp_path):
    save_file({"a": torch.zeros(1000)}, str(tmp_path / "model.safetensors"))
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ReamLiteError, match="truncated"):
        CheckpointReader(tmp_path)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ReamLiteError, match="no such directory"):
        ModelLayout(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ReamLiteError, match="no safetensors"):
        ModelLayout(str(tmp_path))


def test_dense_and_unknown_families_are_refused(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ReamLiteError, match="dense model.*supported: .*qwen3_moe"):
        ModelLayout(str(tmp_path / "llama"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ReamLiteError, match="not a supported MoE family"):
        ModelLayout(str(tmp_path / "odd"))


def test_layout_finds_dense_leading_layers_and_mtp(tmp_path):
    """DeepSeek-V3 layout: dense first layers, MoE after, an MTP layer stored after the last decoder layer."""
    model = build_model("deepseek_v3")
    d = save_model(model, tmp_path / "ds")
    # add an MTP layer the way released DeepSeek-V3 checkpoints store it: model.layers.{num_hidden_layers}.*
    sd = load_file(str(d / "model.safetensors"))
    for k, v in list(sd.items()):
        if k.startswith("model.layers.2."):
            sd[k.replace("model.layers.2.", "model.layers.3.")] = v.clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    layout = ModelLayout(str(d))
    assert [(x.is_moe, x.is_mtp) for x in layout.layers] == [(False, False), (True, False), (True, False), (True, True)]
    assert [x.index for x in layout.decoder_layers] == [0, 1, 2]
    assert layout.router_config.n_group == 4 and layout.router_config.scaling == 2.5


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"])
def test_synthetic_checkpoint_has_save_pretrained_names(model_dirs, tmp_path, family):
    """The benchmarks' random real-shape checkpoints use exactly the names and shapes transformers writes."""
    from tiny_models import family_config

    from ream_lite.testing import write_random_checkpoint

    _, ref_dir = model_dirs[family]
    d = write_random_checkpoint(family_config(family), tmp_path / "syn", dtype=torch.float32)
    a, b = CheckpointReader(d), CheckpointReader(ref_dir)
    assert {k: a.shape(k) for k in a.keys()} == {k: b.shape(k) for k in b.keys()}
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert torch.equal(m.state_dict()["model.embed_tokens.weight"], a.get("model.embed_tokens.weight"))


def test_hub_id_without_network_is_a_clean_error(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub; offline, that is one clear error, not a traceback."""
    from ream_lite.checkpoint.reader import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReamLiteError, match="hub download failed"):
        resolve_model_path("some-org/some-moe-model")


def test_writer_rolls_shards_when_the_header_fills(tmp_path, monkeypatch):
    """Many small tensors: the header's reserved space, not the size limit, starts new shards; all stay valid."""
    import ream_lite.checkpoint.writer as wmod

    monkeypatch.setattr(wmod, "HEADER_RESERVE", 1024)
    w = CheckpointWriter(tmp_path / "o")
    tensors = {f"layer.{i}.some_long_parameter_name.weight": torch.full((2,), float(i)) for i in range(60)}
    for k, v in tensors.items():
        w.add(k, v)
    w.finish({"model_type": "x"})
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    r = CheckpointReader(tmp_path / "o")
    assert all(torch.equal(r.get(k), v) for k, v in tensors.items())
