"""bitsandbytes 4-bit serialization (ream_lite.checkpoint.bnb4) against bitsandbytes and transformers themselves."""

from __future__ import annotations

import json

import pytest
import torch

from ream_lite.checkpoint.bnb4 import (
    bnb4_part_suffixes,
    bnb4_quantization_config,
    bnb4_skip_modules,
    bnb4_target_keys,
    bnb4_targets_and_skips,
    decode_bnb4,
    dynamic_map,
    encode_bnb4,
    group_bnb4_keys,
    is_bnb4_packed,
    quant_map,
)

SHAPES = [(64, 128), (48, 96), (5, 33), (1000,), (3, 7)]  # whole blocks, rows across blocks, odd and tiny counts


def _parts(enc: dict[str, torch.Tensor], name: str = "X") -> dict[str, torch.Tensor]:
    return {k[len(name):]: v for k, v in enc.items()}


def _bnb_state_dict(q, state, name: str = "X") -> dict[str, torch.Tensor]:
    """What Linear4bit._save_to_state_dict writes for a weight quantized by bitsandbytes."""
    return {name: q} | {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}


def _bnb_reference_dequantize(q, state):
    """bitsandbytes' portable (pure torch) dequantizer: the reference its CUDA kernels agree with."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return compute(q.reshape(-1), absmax.float(), _get_4bit_code(state.quant_type, q.device),
                                    state.blocksize, state.shape, state.dtype)


# -- hand-computed format (no bitsandbytes needed) ------------------------------------------------------------------

def test_format_by_hand():
    """Three values, one block: absmax 2, codes of +1, -1, 0 (and a zero pad), packed high nibble first."""
    enc = encode_bnb4("m.weight", torch.tensor([2.0, -2.0, 0.0]), "nf4")
    assert set(enc) == {"m.weight", "m.weight.absmax", "m.weight.quant_map",
                        "m.weight.quant_state.bitsandbytes__nf4"}
    assert enc["m.weight"].dtype == torch.uint8 and enc["m.weight"].shape == (2, 1)
    assert enc["m.weight"].flatten().tolist() == [0xF0, 0x77]  # nf4 codes 15 (=1), 0 (=-1), 7 (=0), pad 7
    assert enc["m.weight.absmax"].tolist() == [2.0] and enc["m.weight.absmax"].dtype == torch.float32
    assert enc["m.weight.quant_map"].dtype == torch.float32 and enc["m.weight.quant_map"].shape == (16,)
    assert bytes(enc["m.weight.quant_state.bitsandbytes__nf4"].tolist()) == (
        b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3]}')
    assert decode_bnb4(_parts(enc, "m.weight")).tolist() == [2.0, -2.0, 0.0]
    # fp4: +1 is code 3 (magnitude 12/12), -1 code 11 (sign bit 8), 0 code 0
    fp4 = encode_bnb4("w", torch.tensor([3.0, -3.0, 0.0, 0.0]), "fp4")
    assert fp4["w"].flatten().tolist() == [0x3B, 0x00]


def test_double_quant_parts_by_hand():
    w = torch.randn(4, 4096, generator=torch.Generator().manual_seed(1))  # 256 blocks of 64 -> 1 nested block
    enc = encode_bnb4("w", w.to(torch.bfloat16), "nf4", compress_statistics=True)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in enc.items()} == {
        "w": (torch.uint8, (8192, 1)),
        "w.absmax": (torch.uint8, (256,)),
        "w.quant_map": (torch.float32, (16,)),
        "w.nested_absmax": (torch.float32, (1,)),
        "w.nested_quant_map": (torch.float32, (256,)),
        "w.quant_state.bitsandbytes__nf4": (torch.uint8, (enc["w.quant_state.bitsandbytes__nf4"].numel(),)),
    }
    state = json.loads(bytes(enc["w.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["dtype"] == "bfloat16" and state["shape"] == [4, 4096] and state["nested_blocksize"] == 256
    assert decode_bnb4(_parts(enc, "w")).dtype == torch.bfloat16  # the recorded dtype when none is asked for


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_roundtrip_is_nearest_code(quant_type, double):
    """Every decoded value is the block's absmax times the code value nearest to w / absmax (the 4-bit step), up
    to the double-quant error of the absmax itself (8-bit dynamic code: < 1% here)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g) * torch.rand(96, 1, generator=g)
    d = decode_bnb4(_parts(encode_bnb4("X", w, quant_type, 64, double)), torch.float32)
    blocks = w.reshape(-1, 64)
    amax = blocks.abs().amax(1, keepdim=True)
    code = quant_map(quant_type)
    nearest = code[(blocks[..., None] / amax[..., None] - code).abs().argmin(-1)] * amax
    slack = 0.01 * amax.max().item() if double else 1e-6
    assert (d.reshape(-1, 64) - nearest).abs().max().item() <= slack
    half_step = code.sort().values.diff().max() / 2  # the 4-bit step: half the widest gap between code values
    assert ((d.reshape(-1, 64) - blocks).abs() <= half_step * amax + slack).all()


def test_grouping_and_config_detection():
    enc = encode_bnb4("a.weight", torch.randn(8, 64), "fp4", compress_statistics=True)
    keys = set(enc) | {"b.weight", "a.bias"}
    assert group_bnb4_keys(keys) == {"a.weight": {"": "a.weight"} | {s: "a.weight" + s for s in (
        ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__fp4")}}
    assert bnb4_part_suffixes("a.weight", keys)[0] == "" and len(bnb4_part_suffixes("a.weight", keys)) == 6
    assert bnb4_part_suffixes("b.weight", keys) == []
    assert is_bnb4_packed({"quantization_config": bnb4_quantization_config("nf4")})
    assert not is_bnb4_packed({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
    assert not is_bnb4_packed({"quantization_config": {"quant_method": "fp8"}}) and not is_bnb4_packed({})


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_quantization_config_is_transformers(quant_type, double):
    from transformers import BitsAndBytesConfig

    ours = bnb4_quantization_config(quant_type, torch.bfloat16, 64, double, ["lm_head"])
    theirs = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]).to_dict()
    assert ours == theirs
    assert BitsAndBytesConfig.from_dict(ours).to_dict() == theirs


# -- against bitsandbytes itself ------------------------------------------------------------------------------------

def test_code_tables_are_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(quant_map("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant_map("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_encode_is_bitsandbytes_bit_for_bit(shape, dtype, quant_type, double):
    """Same keys, dtypes, shapes and bytes as bitsandbytes.functional.quantize_4bit + QuantState.as_dict(packed)
    (its CPU backend). With double quant the 8-bit absmax codes may differ where bitsandbytes' approximate search
    misses the nearest code: then ours is the nearer one, and such places are rare."""
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(2 * SHAPES.index(shape) + (quant_type == "fp4"))
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    if w.numel() >= 128:
        w.view(-1)[64:128] = 0  # an all-zero block
    q, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
    ref = _bnb_state_dict(q, state)
    ours = encode_bnb4("X", w, quant_type, 64, double)
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in ref.items()}
    for k in ref:
        if k != "X.absmax" or not double:
            assert torch.equal(ours[k], ref[k]), k
    if double:
        differ = ours["X.absmax"] != ref["X.absmax"]
        assert differ.sum() <= 2 + 0.02 * differ.numel()  # measured ~0.2% of codes over many weights
        # (a single-block weight has absmax - mean = 0: bitsandbytes divides 0 by 0 and takes code 0, we take the
        # code of 0; both decode to the offset. Elsewhere the two are neighbouring codes.)
        nested = _parts(ours)
        amax_true = w.float().reshape(-1).abs()
        amax_true = torch.nn.functional.pad(amax_true, (0, -amax_true.numel() % 64)).view(-1, 64).amax(1)
        code2, scale2 = nested[".nested_quant_map"], nested[".nested_absmax"]
        offset = json.loads(bytes(nested[".quant_state.bitsandbytes__" + quant_type].tolist()))["nested_offset"]
        ours_v = code2[ours["X.absmax"].long()] * scale2.repeat_interleave(256)[: differ.numel()] + offset
        ref_v = code2[ref["X.absmax"].long()] * scale2.repeat_interleave(256)[: differ.numel()] + offset
        assert ((ours_v - amax_true).abs() <= (ref_v - amax_true).abs() + 1e-9).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_decode_is_bitsandbytes_dequantize(shape, quant_type, double):
    """Decoding bitsandbytes' own parts (nested statistics included) gives bitsandbytes' values exactly: its
    reference dequantizer always, and its CPU kernel (dequantize_4bit) where that kernel is right."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
    ours = decode_bnb4(_parts(_bnb_state_dict(q, state)), torch.bfloat16)
    assert torch.equal(ours, _bnb_reference_dequantize(q, state))
    if len(shape) == 2 and shape[1] % 64 == 0:
        # bitsandbytes 0.50.2's CPU kernel garbles rows that are not whole blocks (48x96: errors 5x the nf4 step)
        assert torch.equal(ours, F.dequantize_4bit(q, state))


# -- a tiny Qwen3-MoE through transformers --------------------------------------------------------------------------

# hidden 64, 8 heads, 4 KV heads: every Linear has in_features a multiple of 64 and out_features of 32, which
# bitsandbytes' CPU inference path needs (else it fails inside bitsandbytes, whoever wrote the checkpoint)
TINY = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from tiny_models import build_model, save_model

    model = build_model("qwen3_moe", **TINY).to(torch.bfloat16)
    src = save_model(model, tmp_path_factory.mktemp("bnb") / "src")
    return model, src


def _write_quantized(src, dst, quant_type, double):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    targets = bnb4_target_keys(cfg)
    state = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        out.update(encode_bnb4(k, v, quant_type, 64, double) if k in targets else {k: v})
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = bnb4_quantization_config(quant_type, torch.bfloat16, 64, double,
                                                             bnb4_skip_modules(cfg))
    (dst / "config.json").write_text(json.dumps(config))
    return targets, out


def test_target_keys_are_transformers_linear4bit(tiny_moe):
    """The weights transformers quantizes in memory (BitsAndBytesConfig) are exactly bnb4_target_keys: attention
    projections only; fused experts, router and lm_head stay bf16."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, src = tiny_moe
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    linear4 = {f"{n}.weight" for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    targets = bnb4_target_keys(model.config)
    assert targets == linear4
    assert targets == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qkvo"}
    assert bnb4_skip_modules(model.config) == ["lm_head"]
    assert bnb4_targets_and_skips(model.config) == (targets, ["lm_head"])  # (one build of the meta model)


@pytest.mark.parametrize("quant_type,double", [("nf4", False), ("fp4", True)])
def test_tiny_qwen3_moe_loads_as_4bit(tiny_moe, tmp_path, quant_type, double):
    """A checkpoint written with encode_bnb4 + bnb4_quantization_config loads with from_pretrained on CPU as
    Linear4bit; its tensors are those transformers saves for the same model quantized in memory; its logits equal
    the in-memory quantized model's (bit for bit without double quant) and a plain model holding the decoded
    weights' (bf16 compute noise), and are within 4-bit quantization error of the bf16 model's."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, src = tiny_moe
    targets, written = _write_quantized(src, tmp_path / "q", quant_type, double)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {f"{n}.weight" for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == targets

    inmem = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]))
    theirs = {k: v for k, v in inmem.state_dict().items() if ".mlp.experts." not in k}
    ours = {k: v for k, v in written.items() if ".mlp.experts." not in k}  # (experts: per-expert keys on disk)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in theirs.items()}
    for k in theirs:
        if not (double and k.endswith(".absmax")):
            assert torch.equal(ours[k], theirs[k]), k

    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    decoded = {k: decode_bnb4({s: written[k + s] for s in bnb4_part_suffixes(k, written)}, torch.bfloat16)
               for k in targets}
    plain.load_state_dict(decoded, strict=False)

    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref_q, ref_dec, ref_bf16 = (m(ids).logits.float() for m in (loaded, inmem, plain, model))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    if double:
        assert rel(got, ref_q) < 0.02
    else:
        assert torch.equal(got, ref_q)
    print(f"{quant_type} double={double}: rel logits error vs in-memory {rel(got, ref_q):.4f}, vs decoded "
          f"weights {rel(got, ref_dec):.4f}, vs bf16 {rel(got, ref_bf16):.4f}")
    # measured 0.075 (nf4) / 0.022 (fp4 + double quant): bitsandbytes' CPU matmul rounds absmax to bf16, and
    # top-2 routing of the tiny random model amplifies it
    assert rel(got, ref_dec) < 0.15
    # measured 0.40 (nf4) / 0.48 (fp4): 4-bit noise on random tiny weights (std 0.2), amplified by routing flips
    assert rel(got, ref_bf16) < 0.6


def test_reader_decodes_transformers_bnb_checkpoint(tiny_moe, tmp_path):
    """A bnb-4bit checkpoint saved by transformers reads back through CheckpointReader as logical weights equal to
    bitsandbytes' dequantization (the input path for bnb MoE checkpoints)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ream_lite.checkpoint import CheckpointReader

    _, src = tiny_moe
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    q.save_pretrained(tmp_path / "bnb")
    with CheckpointReader(tmp_path / "bnb") as r:
        assert r.encodings == {"plain", "bnb4"}
        for name, m in q.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                key = f"{name}.weight"
                assert r.shape(key) == tuple(m.weight.quant_state.shape)
                ref = _bnb_reference_dequantize(m.weight.data, m.weight.quant_state)
                assert torch.equal(r.get(key, dtype=ref.dtype), ref)
