"""The MXFP4 codec: decoding equals transformers' own dequantisation bit for bit, re-encoding decoded values is
lossless, and encoding rounds every value to its nearest E2M1 value under the block's scale."""

import pytest
import torch

from ream_lite.checkpoint.mxfp4 import E2M1_VALUES, decode_mxfp4, e2m1_codes, encode_mxfp4, shared_exponents


def random_packed(shape, seed, scale_range=(0, 256)):
    """Random blocks [*shape, 16] and scales [*shape] (every code and, by default, every scale byte)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, shape, generator=g, dtype=torch.uint8)
    return blocks, scales


def oracle():
    try:  # transformers' dequantisation (pure torch; needs neither triton nor the kernels package)
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except Exception:  # pragma: no cover - older / trimmed transformers
        pytest.skip("transformers.integrations.mxfp4 is not importable")
    return convert_moe_packed_tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_decode_matches_transformers_bit_for_bit(dtype):
    convert = oracle()
    blocks, scales = random_packed((3, 5, 4), seed=0)  # [E, rows, G]: every scale byte 0..255 may occur
    ours = decode_mxfp4(blocks, scales, dtype)
    theirs = convert(blocks, scales, dtype=dtype).transpose(1, 2)  # it returns the [E, K, rows] parameter
    assert ours.shape == (3, 5, 128) and ours.dtype == dtype
    same = (ours == theirs) | (ours.isnan() & theirs.isnan())
    assert bool(same.all()) and torch.equal(ours.signbit(), theirs.signbit())


def test_decode_hand_computed():
    # 0x21: low nibble 1 (0.5) is the first element, high nibble 2 (1.0) the second; 0xF8: -0.0, -6.0; 0x7C: -2.0, 6.0
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 1], blocks[0, 15] = 0x21, 0xF8, 0x7C
    got = decode_mxfp4(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)  # scale 2 ** 1
    assert got.shape == (32,)
    assert got[:4].tolist() == [1.0, 2.0, -0.0, -12.0] and got[30:].tolist() == [-4.0, 12.0]
    assert got[4:30].abs().sum() == 0
    half = decode_mxfp4(blocks, torch.tensor([126], dtype=torch.uint8), torch.float32)  # 2 ** -1
    torch.testing.assert_close(half, got / 4, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reencoding_decoded_values_is_lossless(dtype):
    # scales below 250 keep 6 * 2 ** (s - 127) finite in both dtypes; 0 (the subnormal end) included
    blocks, scales = random_packed((4, 6, 3), seed=1, scale_range=(0, 250))
    x = decode_mxfp4(blocks, scales, dtype)
    b2, s2 = encode_mxfp4(x)
    assert b2.shape == blocks.shape and s2.shape == scales.shape and b2.dtype == s2.dtype == torch.uint8
    again = decode_mxfp4(b2, s2, dtype)
    assert torch.equal(again, x)
    # and encoding is a fixed point from then on: the bytes themselves repeat
    b3, s3 = encode_mxfp4(again)
    assert torch.equal(b3, b2) and torch.equal(s3, s2)


def test_encode_error_is_within_half_an_e2m1_step():
    g = torch.Generator().manual_seed(2)
    # blocks of very different magnitudes, some with a single outlier
    w = torch.randn(8, 4, 64, generator=g) * torch.logspace(-6, 3, 8)[:, None, None]
    w[:, 0, 5] *= 40
    blocks, scales = encode_mxfp4(w)
    q = decode_mxfp4(blocks, scales, torch.float32)
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    y = w / scale  # w in units of its block's scale: within E2M1's range, and its largest magnitude above half of it
    amax = y.reshape(*y.shape[:-1], -1, 32).abs().amax(-1)
    assert bool((amax <= 6.0).all()) and bool((amax > 3.0).all())
    grid = torch.tensor(E2M1_VALUES)
    upper = grid[torch.searchsorted(grid, y.abs()).clamp(max=7)]
    lower = grid[(torch.searchsorted(grid, y.abs(), right=True) - 1).clamp(min=0)]
    half_step = (upper - lower) / 2
    err = (q / scale - y).abs()
    assert bool((err <= half_step + 1e-6).all())
    nearest = (y.abs()[..., None] - grid).abs().min(-1).values  # no other E2M1 value is closer
    assert bool((err <= nearest + 1e-6).all())
    assert torch.equal(q.sign() * (q != 0), torch.where(q != 0, w.sign(), torch.zeros_like(w)))


def test_ties_round_to_the_even_code_and_magnitudes_saturate():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -0.1])
    assert e2m1_codes(x).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8 | 2, 8 | 0]


def test_shared_exponent_is_the_smallest_that_fits():
    amax = torch.tensor([6.0, 6.0001, 3.0, 0.75, 1e-30, 0.0, 3e38])
    k = shared_exponents(amax)
    assert bool((amax <= 6.0 * torch.exp2(k.float())).all())
    assert bool((amax[:5] > 6.0 * torch.exp2(k[:5].float() - 1)).all())
    assert k.tolist()[:4] == [0, 1, -1, -3] and bool(((k >= -127) & (k <= 127)).all())


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_mxfp4(torch.zeros(3, 40))
    with pytest.raises(ValueError, match="do not match"):
        decode_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
