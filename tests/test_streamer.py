"""The streamer's logits equal transformers' full forward, for every family, layout and store tier."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, build_model, reference_logits, save_model

from ream_lite.arch import ModelLayout
from ream_lite.engine import LayerStreamer, StreamOptions

TIERS = ["host", "disk"] + (["device"] if torch.cuda.is_available() else [])


def stream_logits(directory, ids, tier="host", experts_per_chunk=None, device="cpu", batch_tokens=40, work_dir=None):
    layout = ModelLayout(str(directory))
    s = LayerStreamer(
        layout,
        StreamOptions(device=device, dtype=torch.float32, store_tier=tier, progress=False,
                      tokens_per_batch=batch_tokens, work_dir=work_dir),
    )
    s.make_plan(ids.numel())
    if experts_per_chunk:
        s.plan.experts_per_chunk = experts_per_chunk
    h = s.forward_layers(s.embed(list(ids)))
    out = torch.cat([lg.cpu() for _, lg in s.logits(h)]).reshape(*ids.shape, -1)
    h.close()
    return out


def assert_loads_and_streams_as_transformers_runs_it(out, model, model_class):
    """A compressed output `out` loads with `model_class` with `model`'s parameter names, and the streamer's logits
    on it equal transformers' forward of it (merged experts written in the layout transformers reads)."""
    m = model_class.from_pretrained(out, dtype=torch.float32)
    assert set(m.state_dict()) == set(model.state_dict())
    ids = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(7))
    ref = reference_logits(m, ids)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(stream_logits(out, ids), ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (5, 19), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", TIERS)
def test_streamer_matches_transformers(model_dirs, ids, family, tier, tmp_path):
    model, directory = model_dirs[family]
    ref = reference_logits(model, ids)
    dev = "cuda" if tier == "device" else "cpu"
    got = stream_logits(directory, ids, tier=tier, device=dev, work_dir=tmp_path)
    assert ref.abs().max() > 0.1  # a degenerate model would make the comparison meaningless
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if tier == "disk":
        assert not list(tmp_path.glob("hidden-*")), "disk-tier files are removed when done"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiers_give_identical_results(model_dirs, ids, family, tmp_path):
    _, directory = model_dirs[family]
    a = stream_logits(directory, ids, tier="host")
    b = stream_logits(directory, ids, tier="disk", work_dir=tmp_path)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_fused_expert_layout(tmp_path, ids, family):
    model = build_model(family, seed=3)
    directory = save_model(model, tmp_path / "fused", layout="fused")
    layout = ModelLayout(str(directory))
    assert {x.expert_storage for x in layout.moe_layers} == {"fused"}
    torch.testing.assert_close(stream_logits(directory, ids), reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "flex_olmo", "dbrx"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_expert_chunks(model_dirs, ids, family, chunk):
    """A layer whose experts are processed a few at a time gives the same output (flex_olmo: its post-norm applies
    to the sum over every chunk)."""
    model, directory = model_dirs[family]
    torch.testing.assert_close(stream_logits(directory, ids, experts_per_chunk=chunk), reference_logits(model, ids),
                               atol=1e-4, rtol=1e-4)


def test_variable_lengths_and_small_batches(model_dirs):
    """Sequences of different lengths are batched by length; each equals its own full forward."""
    model, directory = model_dirs["qwen2_moe"]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (7, 7, 12, 3, 12)]
    layout = ModelLayout(str(directory))
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False, tokens_per_batch=14))
    h = s.forward_layers(s.embed(seqs))
    got = {}
    for b, lg in s.logits(h):
        for row, i in enumerate(b.seqs):
            got[i] = lg[row]
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(got[i], reference_logits(model, seq[None])[0], atol=1e-4, rtol=1e-4)


def test_observer_sees_every_token_and_expert(model_dirs, ids):
    _, directory = model_dirs["olmoe"]
    layout = ModelLayout(str(directory))
    s = LayerStreamer(layout, StreamOptions(dtype=torch.float32, progress=False, tokens_per_batch=40))
    s.make_plan(ids.numel())
    s.plan.experts_per_chunk = 3

    class Count:
        def __init__(self):
            self.tokens, self.experts = {}, {}

        def on_routing(self, layer, batch, x, routing):
            self.tokens[layer] = self.tokens.get(layer, 0) + x.shape[0]
            assert routing.indices.shape == (x.shape[0], 2)

        def on_experts(self, layer, batch, x, routing, experts):
            self.experts.setdefault(layer, set()).update(experts.ids)

    obs = Count()
    s.forward_layers(s.embed(list(ids)), observer=obs).close()
    assert obs.tokens == {i: ids.numel() for i in range(3)}
    assert obs.experts == {i: set(range(8)) for i in range(3)}
