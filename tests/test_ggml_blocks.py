"""ream_lite.checkpoint.ggml_blocks against gguf-py's numpy codecs and llama.cpp's C quantizers (via the fixture
tests/data/ggml_golden.npz that benchmarks/ggml_oracle.py --write-golden builds from ggml-quants.c)."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf_quants = pytest.importorskip("gguf.quants")  # llama.cpp's gguf-py, which ggml_blocks builds on
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ream_lite.checkpoint import ggml_blocks as gb
from ream_lite.errors import ReamLiteError

GOLDEN = Path(__file__).parent / "data" / "ggml_golden.npz"
FLOATS = (Q.F32, Q.F16, Q.BF16)
BLOCK_TYPES = sorted(gb.DEVICE_DECODABLE - set(FLOATS), key=int)
ENCODE_TYPES = sorted(gb.ENCODABLE - set(FLOATS), key=int)
# encoders gguf-py ports from ggml-quants.c
GGUF_ENCODERS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4)


def rows(n: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols), dtype=np.float32)
    x[0] = 0.0  # an all-zero row
    x[1, : cols // 2] = 0.25  # flat blocks
    x[2] = np.round(x[2] * 8) / 8  # ties
    x[3] *= np.float32(1e-7)  # scales that go subnormal / zero in fp16
    return x


def random_blocks(q: Q, n_blocks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n_blocks, GGML_QUANT_SIZES[q][1]), dtype=np.uint8)


def test_row_bytes():
    assert gb.row_bytes(Q.Q4_K, 2048) == 8 * 144
    assert gb.row_bytes(int(Q.Q8_0), 64) == 68
    assert gb.row_bytes(Q.MXFP4, 64) == 34
    assert gb.row_bytes(Q.F32, 3) == 12
    assert gb.row_bytes(Q.BF16, 5) == 10
    with pytest.raises(ReamLiteError, match="multiple of 256"):
        gb.row_bytes(Q.Q6_K, 768 + 32)
    with pytest.raises(ReamLiteError, match="unknown"):
        gb.row_bytes(999, 32)


@pytest.mark.parametrize("q", BLOCK_TYPES, ids=lambda q: q.name)
def test_decode_random_blocks_matches_gguf(q):
    raw = random_blocks(q, 64)  # random fp16 scales include inf and NaN: compared NaN-equal
    block = GGML_QUANT_SIZES[q][0]
    cols = 2 * block
    raw = raw.reshape(32, -1)
    with np.errstate(all="ignore"):
        want = gguf_quants.dequantize(raw, q)
    got = gb.decode(q, torch.from_numpy(raw), cols)
    assert got.dtype == torch.float32 and got.shape == (32, cols)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("q", ENCODE_TYPES, ids=lambda q: q.name)
def test_decode_valid_blocks_matches_gguf(q):
    x = rows(6, 512)
    raw = gb.encode(q, torch.from_numpy(x)).numpy()
    want = gguf_quants.dequantize(raw, q)
    got = gb.decode(q, torch.from_numpy(raw), 512)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    # leading axes and the output dtype
    got3 = gb.decode(q, torch.from_numpy(raw).view(2, 3, -1), 512, dtype=torch.bfloat16)
    assert got3.shape == (2, 3, 512) and got3.dtype == torch.bfloat16
    assert torch.equal(got3.reshape(6, 512), torch.from_numpy(want).to(torch.bfloat16))


@pytest.mark.parametrize("q", FLOATS, ids=lambda q: q.name)
def test_float_types_round_trip(q):
    x = rows(4, 64)
    raw = gb.encode(q, torch.from_numpy(x))
    assert raw.dtype == torch.uint8 and raw.shape == (4, gb.row_bytes(q, 64))
    np.testing.assert_array_equal(gb.decode(q, raw, 64).numpy(), gguf_quants.dequantize(raw.numpy(), q))


@pytest.mark.parametrize("q", [Q.IQ4_NL, Q.TQ2_0, Q.IQ2_XXS], ids=lambda q: q.name)
def test_decode_falls_back_to_gguf(q):
    assert q not in gb.DEVICE_DECODABLE
    raw = random_blocks(q, 4).reshape(2, -1)
    cols = 2 * GGML_QUANT_SIZES[q][0]
    with np.errstate(all="ignore"):
        want = gguf_quants.dequantize(raw, q)
    got = gb.decode(q, torch.from_numpy(raw), cols, dtype=torch.float32)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("q", GGUF_ENCODERS, ids=lambda q: q.name)
def test_encode_matches_gguf(q):
    x = rows(16, 512, seed=1)
    want = gguf_quants.quantize(x, q)
    got = gb.encode(q, torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want.view(np.uint8).reshape(got.shape))


def golden_cases():
    if not GOLDEN.exists():
        return []
    with np.load(GOLDEN) as z:
        return sorted(k[2:] for k in z.files if k.startswith("q/"))


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip("no fixture: run benchmarks/ggml_oracle.py --write-golden")
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("key", golden_cases())
def test_encode_matches_llama_cpp(golden, key):
    case, qname = key.split("/")
    q = Q[qname]
    got = gb.encode(q, torch.from_numpy(golden[f"x/{case}"])).numpy()
    want = golden[f"q/{key}"]
    bad = got != want
    assert not bad.any(), f"{qname} on {case!r}: {int(bad.sum())} of {bad.size} bytes differ from llama.cpp"


def test_golden_covers_every_encodable_type(golden):
    fixture_types = {Q[k.split("/")[2]] for k in golden if k.startswith("q/")}
    assert fixture_types == set(ENCODE_TYPES)


def test_decode_matches_llama_cpp(golden):
    keys = [k for k in golden if k.startswith("dq/")]
    assert keys
    for key in keys:
        _, case, qname = key.split("/")
        want = golden[key]
        raw = golden[f"q/{case}/{qname}"][: want.shape[0]]
        got = gb.decode(Q[qname], torch.from_numpy(raw), want.shape[1]).numpy()
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), qname


# relative RMS error of encode -> decode on standard normal rows: each bound is a little above what llama.cpp's reference
# quantizers reach (~1.4x), so a wrong level or scale shows up
RMS_BOUND = {Q.Q8_0: 0.008, Q.Q6_K: 0.026, Q.Q5_K: 0.052, Q.Q5_0: 0.062, Q.Q5_1: 0.054, Q.Q4_K: 0.10,
             Q.Q4_0: 0.125, Q.Q4_1: 0.11, Q.MXFP4: 0.16, Q.Q3_K: 0.21, Q.Q2_K: 0.42}


@pytest.mark.parametrize("q", ENCODE_TYPES, ids=lambda q: q.name)
def test_round_trip_error(q):
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((8, 1024), dtype=np.float32))
    y = gb.decode(q, gb.encode(q, x), 1024)
    rel = ((y - x).square().mean() / x.square().mean()).sqrt().item()
    assert rel < RMS_BOUND[q], f"{q.name}: relative RMS error {rel:.4f}"


def test_q8_0_error_within_half_a_step():
    x = torch.from_numpy(rows(8, 1024, seed=3))
    raw = gb.encode(Q.Q8_0, x)
    y = gb.decode(Q.Q8_0, raw, 1024)
    d = raw.view(-1, 34)[:, :2].contiguous().view(torch.float16).float()  # per-block scale
    err = (y - x).abs().view(-1, 32).amax(-1, keepdim=True)
    # half a step, plus what rounding the scale to fp16 (2**-11 relative, 2**-25 absolute when subnormal) moves
    # the largest level
    assert bool((err <= d * (0.5 + 127 * 2.0**-11) + 127 * 2.0**-25).all())


def test_leading_axes_dtypes_and_chunking(monkeypatch):
    x = torch.from_numpy(rows(6, 512, seed=4))
    for q in (Q.Q4_K, Q.Q6_K, Q.MXFP4, Q.Q3_K):
        whole = gb.encode(q, x)
        assert torch.equal(gb.encode(q, x.view(2, 3, 512)), whole.view(2, 3, -1))
        assert torch.equal(gb.encode(q, x.to(torch.bfloat16)), gb.encode(q, x.to(torch.bfloat16).float()))
        monkeypatch.setattr(gb, "_CHUNK_VALUES_CPU", 256)  # many chunks: same bytes
        assert torch.equal(gb.encode(q, x), whole)
        assert torch.equal(gb.decode(q, whole, 512), gb.decode(q, whole, 512))
        monkeypatch.undo()


def test_bf16_and_f16_bits():
    specials = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), np.inf, -np.inf, 2.0**127, 1e-40, 0.0, -0.0],
                        dtype=np.float32)
    nan = np.array([0x7F800001, 0xFFC12345], dtype=np.uint32).view(np.float32)
    x = np.concatenate([specials, nan])
    bf = gb.encode(Q.BF16, torch.from_numpy(x)).numpy().view(np.uint16)
    assert list(bf[:2]) == [0x3F80, 0x3F82]  # ties to even
    assert bf[3] == 0x7F80 and bf[5] == 0x7F00 and bf[8] == 0x8000
    assert list(bf[-2:]) == [0x7FC0, 0xFFC1]  # NaN forced quiet, payload kept as ggml does
    f16 = gb.encode(Q.F16, torch.from_numpy(x)).numpy().view(np.uint16)
    assert f16[5] == 0x7C00 and list(f16[-2:]) == [0x7E00, 0xFE00]


def test_refusals():
    x = torch.zeros(2, 256)
    for q in (Q.IQ2_XXS, Q.Q8_1, Q.TQ1_0, Q.IQ4_NL):
        with pytest.raises(ReamLiteError, match=f"{q.name} cannot be written") as e:
            gb.encode(q, x)
        assert "\n" not in str(e.value)
    with pytest.raises(ReamLiteError, match="multiple of 32"):
        gb.encode(Q.Q8_0, torch.zeros(2, 48))
    with pytest.raises(ReamLiteError, match="NaN"):
        gb.encode(Q.Q4_K, torch.full((1, 256), float("nan")))
    with pytest.raises(ReamLiteError, match="bytes"):
        gb.decode(Q.Q4_K, torch.zeros(1, 100, dtype=torch.uint8), 256)
    with pytest.raises(ReamLiteError, match="cannot be read"):
        gb.decode(Q.I32, torch.zeros(1, 4, dtype=torch.uint8), 1)
