"""The per-layer expert cache: a load served from it holds exactly what the checkpoint gives, it reads the layer's
experts once and is freed with the layer, and `compress` writes the same bytes with it as without it."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_plan import reads_of
from tiny_models import build_model, save_model

from ream_lite.arch import ModelLayout
from ream_lite.cli import main
from ream_lite.engine.expert_cache import LayerExpertCache
from ream_lite.engine.experts import load_experts
from ream_lite.engine.streamer import LayerStreamer, StreamOptions
from ream_lite.pipeline import CompressConfig, compress


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The tiny Qwen3-MoE stored in bfloat16, as released checkpoints are."""
    return save_model(build_model("qwen3_moe").to(torch.bfloat16), tmp_path_factory.mktemp("bf16"))


def same(a, b) -> bool:
    return a.ids == b.ids and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in
                                  ((a.gate, b.gate), (a.up, b.up), (a.down, b.down)))


@pytest.mark.parametrize("cached,exact", [(torch.bfloat16, True), (torch.float32, True), (torch.float16, False)])
def test_a_cached_load_is_the_checkpoints_load(bf16_dir, cached, exact):
    """In the cache's own dtype always; in float32 (what merges load) only where the cast to the cache's dtype lost
    nothing: bf16 -> fp16 rounds, so a fp16 cache of a bf16 checkpoint does not serve float32 loads."""
    layout = ModelLayout(str(bf16_dir))
    layer = layout.moe_layers[0].index
    cache = LayerExpertCache(layout, layer, cached, "cpu")
    assert cache.exact == exact and cache.serves(cached) and cache.serves(torch.float32) == exact
    for ids in ([0, 1, 2], [2, 5, 7], [3], list(range(8))):
        for dtype in {cached, torch.float32}:
            if cache.serves(dtype):
                assert same(cache.take(ids, dtype), load_experts(layout, layer, ids, dtype, "cpu"))
                assert same(cache.take(ids, dtype, copy=True), load_experts(layout, layer, ids, dtype, "cpu"))


def test_the_streamer_reads_a_layer_once_and_frees_it(bf16_dir):
    layout = ModelLayout(str(bf16_dir))
    layer = layout.moe_layers[0].index
    s = LayerStreamer(layout, StreamOptions(device="cpu", progress=False))
    s.make_plan(64)
    assert s.plan.cache_experts
    r = layout.reader
    with s.layer_experts(layer):
        before = r.bytes_read
        view = s.experts(layer, [0, 1, 2, 3])
        fresh = s.experts(layer, [0, 1, 2, 3], copy=True)
        f32 = s.experts(layer, [1, 6], torch.float32)
        assert r.bytes_read == before  # all served from the one read
        fresh.gate.zero_()  # a copy is the caller's own: the cache is untouched
        assert same(s.experts(layer, [0, 1, 2, 3]), load_experts(layout, layer, [0, 1, 2, 3], s.dtype, "cpu"))
        assert same(f32, load_experts(layout, layer, [1, 6], torch.float32, "cpu"))
        other = layout.moe_layers[1].index  # another layer's experts come from the checkpoint
        assert same(s.experts(other, [0]), load_experts(layout, other, [0], s.dtype, "cpu"))
        assert r.bytes_read > before
    assert s._cache is None and view.gate.shape[0] == 4
    before = r.bytes_read
    s.experts(layer, [0])  # closed: read again
    assert r.bytes_read > before


def test_no_cache_when_off(bf16_dir):
    layout = ModelLayout(str(bf16_dir))
    s = LayerStreamer(layout, StreamOptions(device="cpu", progress=False, expert_cache="off"))
    s.make_plan(64)
    assert not s.plan.cache_experts and s.plan.expert_cache_bytes == 0
    assert "--expert-cache off" in "\n".join(s.plan.lines())
    with s.layer_experts(layout.moe_layers[0].index):
        assert s._cache is None


def test_no_cache_without_room(bf16_dir):
    """A budget that holds an expert chunk but not the whole layer's experts beside it: chunks are re-read, and the
    chunking is what it is without the cache."""
    layout = ModelLayout(str(bf16_dir))
    s = LayerStreamer(layout, StreamOptions(device="cpu", progress=False, max_gpu_memory=10**9))
    roomy = s.make_plan(64)
    tight = roomy.max_layer_dense_bytes + roomy.activation_bytes + roomy.all_stores_bytes + roomy.layer_experts_bytes
    s.opts.max_gpu_memory = tight  # just the chunk of all experts, not the cache beside it
    plan = s.make_plan(64)
    assert roomy.cache_experts and not plan.cache_experts and plan.experts_per_chunk == roomy.experts_per_chunk
    assert "no room" in "\n".join(plan.lines())


@pytest.mark.parametrize("settings,dtype", [
    ({"method": "ream"}, None),  # the guard: every candidate, the greedy undo
    ({"method": "ream", "guard": "off", "options_group_size": 2}, None),  # merges written and run sequentially
    ({"method": "ream", "guard": "off", "options_group_size": 2}, torch.bfloat16),  # merges from the checkpoint
    ({"method": "reap"}, None),
])
def test_compress_writes_the_same_bytes_with_and_without_the_cache(model_dirs, tmp_path, monkeypatch, settings,
                                                                   dtype):
    from ream_lite.methods import MethodOptions

    src = model_dirs["deepseek_v3"][1]
    settings = dict(settings)
    group = settings.pop("options_group_size", None)
    read = reads_of(src, monkeypatch)
    outs, reads = {}, {}
    for cache in ("off", "auto"):
        read.clear()
        outs[cache] = compress(CompressConfig(
            model=str(src), output=str(tmp_path / cache), experts=12, num_sequences=8, seq_len=32,
            options=MethodOptions(group_size=group), **settings,
            stream=StreamOptions(device="cpu", progress=False, dtype=dtype, expert_cache=cache)))
        reads[cache] = max(read)
    a, b = outs["off"], outs["auto"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "ream_plan.json").read_text() == (b / "ream_plan.json").read_text()
    if group:
        assert all(L["groups"] for L in json.loads((b / "ream_plan.json").read_text())["layers"])
    assert reads["auto"] < reads["off"]  # the cache was used


def test_plan_command_says_whether_experts_are_cached(model_dirs):
    src = model_dirs["qwen3_moe"][1]
    r = CliRunner().invoke(main, ["plan", str(src), "--experts", "6", "--device", "cpu", "--no-measure"])
    assert r.exit_code == 0, r.output
    assert "cached once per layer" in r.output
    r = CliRunner().invoke(main, ["plan", str(src), "--experts", "6", "--device", "cpu", "--no-measure",
                                  "--expert-cache", "off"])
    assert r.exit_code == 0, r.output
    assert "re-read from the checkpoint by every pass (--expert-cache off" in r.output
    r = CliRunner().invoke(main, ["compress", "--help"])
    assert "--expert-cache" in r.output
