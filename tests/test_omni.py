"""Qwen3-Omni-MoE (`qwen3_omni_moe`) compressed as released: its thinker's text model (config at
thinker_config.text_config, keys under `thinker.model.*`, a text model transformers names no auto class for) is
compressed; the thinker's audio and vision towers, the talker (an MoE of its own) and code2wav are copied byte for
byte; config.json stays the whole Omni config with only the nested text_config edited.

The oracle is transformers' thinker (Qwen3OmniMoeThinkerForConditionalGeneration) on token ids: the full Omni model
is not built here (its talker and code2wav at their default sizes would take gigabytes).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_compress import compress, masked_reference
from test_streamer import stream_logits
from tiny_models import COMMON, VOCAB, _randomize, reference_logits

from ream_lite.arch import ModelLayout
from ream_lite.checkpoint import CheckpointReader
from ream_lite.testing import save_char_tokenizer

COPIED = ("thinker.audio_tower.", "thinker.visual.", "talker.", "code2wav.")


def thinker_config():
    import transformers as tf

    text = tf.Qwen3OmniMoeTextConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                     num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [1, 1, 2]})
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16,
                 output_dim=32, downsample_hidden_size=8, max_source_positions=16, n_window=4)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
                  temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16, deepstack_visual_indexes=[0])
    return tf.Qwen3OmniMoeThinkerConfig(text_config=text.to_dict(), audio_config=audio, vision_config=vision)


def build_thinker(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return _randomize(tf.Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config()).float().eval())


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(the thinker, an Omni release directory: the thinker's tensors under `thinker.`, a few talker (MoE) and
    code2wav tensors, the whole Omni config.json)."""
    import transformers as tf

    thinker = build_thinker()
    root = tmp_path_factory.mktemp("omni")
    thinker.save_pretrained(root / "thinker")
    sd = {f"thinker.{k}": v for k, v in load_file(str(root / "thinker" / "model.safetensors")).items()}
    g = torch.Generator().manual_seed(9)
    for k, shape in (("talker.model.codec_embedding.weight", (16, 32)),
                     ("talker.model.layers.0.mlp.experts.0.gate_proj.weight", (8, 32)),
                     ("talker.model.layers.0.mlp.gate.weight", (4, 32)),
                     ("code2wav.pre_transformer.norm.weight", (32,))):
        sd[k] = torch.randn(shape, generator=g)
    d = root / "release"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = tf.Qwen3OmniMoeConfig(thinker_config=thinker_config().to_dict()).to_dict()
    cfg["dtype"] = "float32"
    (d / "config.json").write_text(json.dumps(cfg))
    save_char_tokenizer(d, VOCAB)
    return thinker, d


def test_layout_finds_the_thinker_text_model(omni):
    _, d = omni
    layout = ModelLayout(str(d))
    spec = layout.spec
    assert layout.multimodal == "qwen3_omni_moe" and spec.model_type == "qwen3_omni_moe_text"
    assert spec.layers_prefix == "thinker.model.layers" and layout.lm_head_key == "thinker.lm_head.weight"
    assert [x.index for x in layout.moe_layers] == [1, 2] and layout.router_config.num_experts == 8
    assert layout.config["dtype"] == "float32"  # (inherited from the top of config.json)
    assert layout.wrap_config(dict(layout.config)) == json.loads((d / "config.json").read_text())
    assert all(not k.startswith(COPIED) for x in layout.layers for k in layout.layer_keys(x.index))


def test_streamed_logits_equal_the_thinker(omni):
    thinker, d = omni
    ids = torch.randint(0, VOCAB, (3, 19), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(thinker, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(stream_logits(d, ids), ref, atol=1e-4, rtol=1e-4)


def test_pruning_oracle_and_what_is_copied(omni, calib_file, tmp_path):
    """REAP 8 -> 4: the output's text logits (streamed) are the thinker's with the removed experts masked; the
    towers, talker and code2wav are the input's bytes; config.json differs only in thinker_config.text_config's
    expert count."""
    _, src = omni
    out = tmp_path / "out"
    compress(src, out, "--experts", "4", "--method", "reap", "--calib", str(calib_file), "--refit", "off")
    plan = json.loads((out / "ream_plan.json").read_text())
    removed = {L["layer"]: sorted(set(range(8)) - set(L["kept"])) for L in plan["layers"]}
    before, after = (json.loads((p / "config.json").read_text()) for p in (src, out))
    before["thinker_config"]["text_config"]["num_experts"] = 4
    assert after == before
    with CheckpointReader(src) as a, CheckpointReader(out) as b:
        copied = sorted(k for k in a.keys() if k.startswith(COPIED))
        assert len(copied) > 4 and copied == sorted(k for k in b.keys() if k.startswith(COPIED))
        assert all(a.read_raw(k) == b.read_raw(k) for k in copied)
        assert b.shape("thinker.model.layers.1.mlp.gate.weight")[0] == 4
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    oracle = masked_reference(build_thinker(), removed, ids)
    torch.testing.assert_close(stream_logits(out, ids), oracle, atol=1e-4, rtol=1e-4)


def test_guarded_ream_output_is_consistent(omni, calib_file, tmp_path):
    _, src = omni
    out = tmp_path / "out"
    compress(src, out, "--experts", "5", "--method", "ream", "--calib", str(calib_file))
    layout = ModelLayout(str(out))
    assert layout.multimodal == "qwen3_omni_moe" and {x.num_experts for x in layout.moe_layers} == {5}
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(stream_logits(out, ids)).all()
