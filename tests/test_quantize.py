"""Quantization primitives against references: packing against a hand-packed word and compressed-tensors'
pack_to_int32; round to nearest against the per-group formula written out and compressed-tensors' quantize; GPTQ
against the textbook column-by-column algorithm with explicit H^-1 updates; storage against a hand count."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moe_compress import quantize
from moe_compress.quantize import QuantFormat, QuantizedMatrix, dequantize_packed, gptq, pack, quantize_rtn, unpack

FORMATS = [QuantFormat(4, 16, True), QuantFormat(4, 16, False), QuantFormat(2, None, False), QuantFormat(3, 32, True),
           QuantFormat(8, None, True), QuantFormat(8, 32, False)]


def random_codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=generator).to(torch.int8)


def correlated_inputs(tokens: int, cols: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Inputs X [tokens, cols] of a few shared directions plus a little noise, so that H = X^T X is far from diagonal."""
    generator = torch.Generator().manual_seed(seed)
    k = cols // 4
    X = torch.randn(tokens, k, generator=generator) @ torch.randn(k, cols, generator=generator)
    return (X + 0.1 * torch.randn(tokens, cols, generator=generator)).to(dtype)


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X


def weighted_error(W: torch.Tensor, Q: QuantizedMatrix, H: torch.Tensor) -> float:
    D = (W - Q.dequantize()).double()
    return torch.trace(D @ H.double() @ D.T).item()


def minmax_reference(W: torch.Tensor, format: QuantFormat):
    """Scales, zero points (or None) and codes of W [rows, cols], one row and group at a time, as compressed-tensors
    defines them: the group's range widened to include 0; symmetric s = max|w| / ((2^b - 1) / 2), asymmetric
    s = (max - min) / (2^b - 1) and z = round(clamp(-2^(b-1) - min / s)); q = round(clamp(w / s + z))."""
    rows, cols = W.shape
    G = format.group_size or cols
    q_min, q_max = -(2 ** (format.bits - 1)), 2 ** (format.bits - 1) - 1
    S = torch.zeros(rows, cols // G, dtype=W.dtype)
    Z = torch.zeros(rows, cols // G, dtype=torch.int8)
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    for r in range(rows):
        for g in range(cols // G):
            w = W[r, g * G:(g + 1) * G]
            lo, hi = min(w.min(), torch.zeros((), dtype=W.dtype)), max(w.max(), torch.zeros((), dtype=W.dtype))
            if format.symmetric:
                s, z = max(-lo, hi) / ((q_max - q_min) / 2), 0
            else:
                s = (hi - lo) / (q_max - q_min)
                z = int(torch.round(torch.clamp(q_min - lo / s, q_min, q_max)))
            S[r, g], Z[r, g] = s, z
            codes[r, g * G:(g + 1) * G] = torch.round(torch.clamp(w / s + z, q_min, q_max)).to(torch.int8)
    return S, None if format.symmetric else Z, codes


def gptq_textbook(W: torch.Tensor, H: torch.Tensor, format: QuantFormat, damp: float) -> torch.Tensor:
    """Codes of GPTQ without blocks, lazy updates or Cholesky: quantize column j with the min-max scales of the original
    W, spread its error over the later columns by the row j of H^-1, then remove j from H^-1 explicitly
    (H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / H^-1[j, j]). Dead columns: H_jj = 1, w_j = 0; H += damp * mean(diag H)."""
    S, Z, _ = minmax_reference(W, format)
    G = format.group_size or W.shape[1]
    q_min, q_max = -(2 ** (format.bits - 1)), 2 ** (format.bits - 1) - 1
    W, H = W.double().clone(), H.double().clone()
    for j in range(H.shape[0]):
        if H[j, j] == 0:
            H[j, j], W[:, j] = 1, 0
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(W.shape, dtype=torch.int8)
    for j in range(W.shape[1]):
        s, z = S[:, j // G].double(), 0 if Z is None else Z[:, j // G].double()
        q = torch.round(torch.clamp(W[:, j] / s + z, q_min, q_max))
        codes[:, j] = q.to(torch.int8)
        W[:, j:] -= torch.outer((W[:, j] - (q - z) * s) / Hinv[j, j], Hinv[j, j:])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


# ---- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 33, 64])
def test_pack_round_trip(bits, cols):
    """Exact, with the densest word count, for odd widths and a leading [E] dimension too."""
    codes = random_codes((2, 3, cols), bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (2, 3, math.ceil(cols * bits / 32))
    assert torch.equal(unpack(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_of_whole_words_equals_the_bit_by_bit_reading(bits):
    """unpack's bytewise path for widths that divide a word, against reading each code's bits one by one from
    arbitrary words (every int32 bit pattern, negative words included)."""
    cols = 50
    packed = torch.randint(-2**31, 2**31, (3, math.ceil(cols * bits / 32)), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(0)).to(torch.int32)
    expected = torch.empty(3, cols, dtype=torch.int8)
    for row in range(3):
        for i in range(cols):
            word = int(packed[row, i * bits // 32]) & 0xFFFFFFFF
            u = sum(((word >> (i * bits % 32 + b)) & 1) << b for b in range(bits))
            expected[row, i] = u - (1 << (bits - 1))
    assert torch.equal(unpack(packed, bits, cols), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_packed_equals_unpacking_then_dequantizing(bits, symmetric, dtype, monkeypatch):
    """Bit for bit, with experts in front and a width that leaves the last word part empty, in one piece and in
    chunks of two rows (the last one short)."""
    format = QuantFormat(bits, 8, symmetric)
    W = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(bits)).to(dtype)
    q = quantize_rtn(W, format)
    packed = pack(q.codes, bits)
    expected = QuantizedMatrix(unpack(packed, bits, 40), q.scales, q.zeros, format).dequantize()
    assert torch.equal(dequantize_packed(packed, 40, q.scales, q.zeros, format), expected)
    monkeypatch.setattr(quantize, "DEQUANTIZE_CHUNK", 80)
    assert torch.equal(dequantize_packed(packed, 40, q.scales, q.zeros, format), expected)


def test_pack_layout_by_hand():
    """Code 0 in the lowest bits, offset to unsigned: 4-bit -8..-1 are 0..7, i.e. the word 0x76543210; 8-bit 127 in
    the top byte makes the word negative."""
    assert pack(torch.arange(-8, 0, dtype=torch.int8)[None], 4).item() == 0x76543210
    assert pack(torch.tensor([[-128, -127, 0, 127]], dtype=torch.int8), 8).item() == 0xFF800100 - 2**32
    # 3-bit: code 10 takes bits 30-32, so its top bit is bit 0 of word 1
    three = torch.zeros(1, 11, dtype=torch.int8) - 4
    three[0, 10] = 3  # unsigned 7 = 0b111
    assert pack(three, 3).tolist() == [[-(2**31) + 2**30, 1]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 33, 64, 100])
def test_pack_matches_compressed_tensors(bits, cols):
    """Bit for bit the words of compressed-tensors' pack_to_int32 (>= 0.18: 3-bit codes straddle words), and its
    unpack_from_int32 reads ours."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = random_codes((5, cols), bits, seed=cols)
    assert torch.equal(pack(codes, bits), helpers.pack_to_int32(codes, bits))
    assert torch.equal(helpers.unpack_from_int32(pack(codes, bits), bits, codes.shape), codes)


# ---- round to nearest


@pytest.mark.parametrize("format", FORMATS, ids=str)
def test_rtn_matches_formula(format):
    """Scales, zero points and codes equal the per-group formula written out (the same fp32 operations: exact)."""
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    W[0, :32] = W[0, :32].abs()  # a group with no negative value: its range still includes 0
    S, Z, codes = minmax_reference(W, format)
    Q = quantize_rtn(W, format)
    assert torch.equal(Q.scales, S) and torch.equal(Q.codes, codes)
    assert Q.zeros is None if Z is None else torch.equal(Q.zeros, Z)
    zeros = 0 if Z is None else Z.repeat_interleave(format.group_size or 64, 1).float()  # int8 would overflow at 8 bits
    torch.testing.assert_close(Q.dequantize(), (codes.float() - zeros) * S.repeat_interleave(format.group_size or 64, 1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("format", FORMATS, ids=str)
def test_rtn_matches_compressed_tensors(format, dtype):
    """compressed-tensors' min-max qparams (compute_dynamic_scales_and_zp: amin/amax per group, calculate_qparams),
    quantize and dequantize give the same scales, zero points, codes and weights, exactly, in fp32 and bf16."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, dequantize, quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    args = QuantizationArgs(num_bits=format.bits, type="int", symmetric=format.symmetric, strategy="group",
                            group_size=format.group_size or 64)
    scale, zero = compute_dynamic_scales_and_zp(W, args, module=None)
    codes = quantize(W, scale, zero, args, dtype=torch.int8)
    Q = quantize_rtn(W, format)
    assert torch.equal(Q.scales, scale) and torch.equal(Q.codes, codes)
    assert Q.zeros is None if format.symmetric else torch.equal(Q.zeros, zero)
    assert torch.equal(Q.dequantize(), dequantize(codes, scale, zero, args))


@pytest.mark.parametrize("format", [QuantFormat(4, 8, True), QuantFormat(4, 8, False)], ids=str)
def test_rtn_zero_group(format):
    """An all-zero group gets the dtype's eps as its scale (compressed-tensors' fix of a zero scale) and dequantizes to
    exact zeros; the other group of the row is untouched."""
    W = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    W[1, :8] = 0
    Q = quantize_rtn(W, format)
    assert Q.scales[1, 0].item() == torch.finfo(W.dtype).eps
    assert torch.equal(Q.dequantize()[1, :8], torch.zeros(8))
    assert torch.equal(Q.codes[:, 8:], quantize_rtn(W[:, 8:], format).codes)


# ---- GPTQ


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("format", [QuantFormat(4, 16, True), QuantFormat(3, None, False), QuantFormat(2, 32, False)],
                         ids=str)
def test_gptq_matches_textbook(format, block_size):
    """In fp64, blocked lazy updates through the Cholesky factor of H^-1 give the textbook's codes exactly (both are the
    same arithmetic up to rounding of ~1e-15, far from any rounding tie on this seed) and its objective to 1e-6, with
    a dead column (an input that is always 0)."""
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X = correlated_inputs(256, 64)
    X[:, 5] = 0
    H = gram(X)
    Q = gptq(W, H, format, block_size=block_size)
    codes = gptq_textbook(W, H, format, damp=0.01)
    assert torch.equal(Q.codes, codes)
    assert Q.codes[:, 5].tolist() == (Q.zeros[:, 0] if Q.zeros is not None else torch.zeros(8)).tolist()
    reference = QuantizedMatrix(codes, Q.scales, Q.zeros, format)
    assert weighted_error(W, Q, H) == pytest.approx(weighted_error(W, reference, H), rel=1e-6)


@pytest.mark.parametrize("format", FORMATS, ids=str)
def test_gptq_identity_hessian_is_rtn(format):
    """With H = I no error is propagated (H^-1's factor is diagonal), so GPTQ's codes are RTN's, exactly."""
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    Q, R = gptq(W, torch.eye(64), format, block_size=16), quantize_rtn(W, format)
    assert torch.equal(Q.codes, R.codes) and torch.equal(Q.dequantize(), R.dequantize())


def test_gptq_lowers_error():
    """On correlated inputs GPTQ's tr(D H D^T) is a fraction of RTN's: 0.137 measured (4-bit, groups of 32, W [32,
    128], this seed); the bound leaves room for other platforms' rounding."""
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    H = gram(correlated_inputs(512, 128, seed=6, dtype=torch.float32))
    format = QuantFormat(4, 32, True)
    ratio = weighted_error(W, gptq(W, H, format), H) / weighted_error(W, quantize_rtn(W, format), H)
    assert ratio < 0.2


def test_gptq_batched_and_fallback():
    """A stack of [E] matrices gives each matrix's own result; a Hessian that is not positive definite even damped
    (here a negative diagonal entry: its factorization fails midway) falls back to RTN for that matrix only, with one
    warning."""
    W = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(7))
    H = torch.stack([gram(correlated_inputs(128, 64, seed=e, dtype=torch.float32)) for e in range(3)])
    H[2, 10, 10] *= -1
    format = QuantFormat(4, 16, False)
    with pytest.warns(UserWarning, match="1 of 3 matrices is not positive definite"):
        Q = gptq(W, H, format)
    for e in range(2):
        assert torch.equal(Q.codes[e], gptq(W[e], H[e], format).codes)
    assert torch.equal(Q.codes[2], quantize_rtn(W[2], format).codes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq(W[:2], H[:2], format)


# ---- storage


@pytest.mark.parametrize("format, rows, cols, bits", [
    # 64 x 1024: 4 bits a code; 16 / 128 a weight for scales; asymmetric: 8 words x 8 groups of zero points
    (QuantFormat(4, 128, True), 64, 1024, 64 * 1024 * 4 + 64 * 8 * 16),
    (QuantFormat(4, 128, False), 64, 1024, 64 * 1024 * 4 + 64 * 8 * 16 + 8 * 8 * 32),
    # 3-bit, 10 x 100, one group: 300 bits a row -> 10 words; 30 bits of zero points -> 1 word
    (QuantFormat(3, None, False), 10, 100, 10 * 10 * 32 + 10 * 16 + 32),
    # 2-bit, 5 x 24, groups of 8: 48 bits a row -> 2 words
    (QuantFormat(2, 8, True), 5, 24, 5 * 2 * 32 + 5 * 3 * 16),
])
def test_storage_bits(format, rows, cols, bits):
    """storage_bits equals a hand count and the size of the tensors written: the packed codes, 16-bit scales, and the
    zero points packed along the rows (compressed-tensors' weight_zero_point)."""
    assert format.storage_bits(rows, cols) == bits
    assert format.bits_per_weight(rows, cols) == bits / (rows * cols)
    Q = quantize_rtn(torch.randn(rows, cols), format)
    stored = pack(Q.codes, format.bits).numel() * 32 + Q.scales.numel() * 16
    if Q.zeros is not None:
        stored += pack(Q.zeros.T.contiguous(), format.bits).numel() * 32
    assert stored == bits


def test_bits_per_weight_of_the_notes():
    """int4, groups of 128: 4.125 bits a weight symmetric, 4.156 asymmetric (shared/notes/quantization.md)."""
    assert QuantFormat(4, 128, True).bits_per_weight(4096, 4096) == 4.125
    assert QuantFormat(4, 128, False).bits_per_weight(4096, 4096) == 4 + 20 / 128


# ---- errors


@pytest.mark.parametrize("call, error, message", [
    (lambda: QuantFormat(5), ValueError, "bits=5 is not supported; use one of 2, 3, 4, 8"),
    (lambda: QuantFormat(4.0), ValueError, "bits=4.0 is not supported"),
    (lambda: QuantFormat(4, 0), ValueError, "group_size=0 is not a positive number of columns; use e.g. 128, or None"),
    (lambda: QuantFormat(4, 64.0), ValueError, "group_size=64.0 is not a positive number"),
    (lambda: QuantFormat(4, 64, "yes"), TypeError, "symmetric='yes' is not a bool; use True"),
    (lambda: quantize_rtn(torch.randn(4, 100), QuantFormat(4, 64)), ValueError,
     "100 columns do not split into groups of 64; use a group_size that divides 100, or None"),
    (lambda: QuantFormat(4, 64).storage_bits(4, 100), ValueError, "100 columns do not split into groups of 64"),
    (lambda: gptq(torch.randn(4, 64), torch.eye(32), QuantFormat(4, 16)), ValueError,
     r"H is \[32, 32\] but W is \[4, 64\]; pass H of shape \[64, 64\]"),
    (lambda: pack(torch.full((1, 4), 8, dtype=torch.int8), 4), ValueError,
     r"pack takes int8 codes in \[-8, 7\] for bits=4; got torch.int8 codes in \[8, 8\]"),
    (lambda: unpack(torch.zeros(1, 3, dtype=torch.int32), 4, 8), ValueError,
     r"unpack takes int32 \[..., 1\] for 8 codes"),
])
def test_refusals(call, error, message):
    """Each bad input raises one exception, one line, naming the cause and the fix (TypeError for a wrong type)."""
    with pytest.raises(error, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)
