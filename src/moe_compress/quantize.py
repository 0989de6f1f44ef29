"""Integer weight quantization in compressed-tensors' conventions: round to nearest, GPTQ, and int32 packing.

A weight W [rows, cols] = [out, in] is quantized in groups of `group_size` consecutive columns (the input dimension),
each row and group with its own scale s (and, asymmetric, an integer zero point z):
  symmetric   codes q in [-2^(b-1), 2^(b-1) - 1],  w ~ q * s
  asymmetric  codes q in [-2^(b-1), 2^(b-1) - 1],  w ~ (q - z) * s, z an integer in the same range
Scales and zero points are compressed-tensors' min-max ones (calculate_qparams), codes its quantize()
(clamp, then round half to even), so that a folder can be written in its `pack-quantized` format, which vLLM reads.
Scales come in W's dtype, as compressed-tensors computes them: quantize W in the dtype its scales are to be stored in
(bf16 or fp16; storage_bits counts them as 16 bits).

Shapes: any leading dimensions ([E] experts) ride along: W [..., rows, cols], H [..., cols, cols].
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (2, 3, 4, 8)
SCALE_BITS = 16  # scales are stored in the weight's 16-bit dtype
WORD_BITS = 32  # codes and zero points are stored packed in int32 words


@dataclass(frozen=True)
class QuantFormat:
    """`bits` per code; `group_size` columns share a scale (None: one group per row); `symmetric`: no zero points."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or self.bits not in BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, BITS))}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} is not a positive number of columns; use e.g. 128, "
                             "or None for one group per row")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} is not a bool; use True (no zero points) or False")

    @property
    def code_range(self) -> tuple[int, int]:
        """The signed codes' [min, max]: [-2^(b-1), 2^(b-1) - 1]."""
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1

    def groups(self, cols: int) -> int:
        """Groups per row of a matrix with `cols` columns."""
        if self.group_size is None:
            return 1
        if cols % self.group_size:
            raise ValueError(f"{cols} columns do not split into groups of {self.group_size}; use a group_size that "
                             f"divides {cols}, or None for one group per row")
        return cols // self.group_size

    def storage_bits(self, rows: int, cols: int) -> int:
        """Bits stored for a [rows, cols] matrix in compressed-tensors' pack-quantized layout: the codes packed along
        each row into int32 words (weight_packed [rows, ceil(cols*b/32)]), a 16-bit scale per row and group
        (weight_scale [rows, groups]) and, asymmetric, the zero points packed along the columns of
        weight_zero_point [ceil(rows*b/32), groups]. The two-int64 weight_shape (128 bits per matrix) is left out."""
        groups = self.groups(cols)
        codes = WORD_BITS * rows * packed_words(cols, self.bits)
        zeros = 0 if self.symmetric else WORD_BITS * packed_words(rows, self.bits) * groups
        return codes + SCALE_BITS * rows * groups + zeros

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.storage_bits(rows, cols) / (rows * cols)


@dataclass(frozen=True)
class QuantizedMatrix:
    """codes [..., rows, cols] int8, scales [..., rows, groups] (W's dtype), zeros [..., rows, groups] int8 or None
    (symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    format: QuantFormat

    def dequantize(self) -> torch.Tensor:
        """(q - z) * s per group, in the scales' dtype (compressed-tensors' dequantize, operation for operation)."""
        groups = self.scales.shape[-1]
        q = self.codes.unflatten(-1, (groups, -1)).to(self.scales.dtype)  # [..., rows, groups, G]
        if self.zeros is not None:
            q = q - self.zeros.to(self.scales.dtype)[..., None]
        return (q * self.scales[..., None]).flatten(-2)


def minmax_qparams(W: torch.Tensor, format: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [..., rows, groups] (W's dtype) and integer zero points (int8, None if symmetric) of W [..., rows, cols]
    from each group's range, widened to include 0 so that 0 is exact (compressed-tensors' calculate_qparams):
      symmetric   s = max(|lo|, |hi|) / ((2^b - 1) / 2)   (the range maps onto [-2^(b-1) + 1/2, 2^(b-1) - 1/2])
      asymmetric  s = (hi - lo) / (2^b - 1),  z = round(clamp(q_min - lo / s, q_min, q_max))
    An all-zero group gets s = eps of the dtype (not 0, which would divide by 0)."""
    q_min, q_max = format.code_range
    Wg = W.unflatten(-1, (format.groups(W.shape[-1]), -1))  # [..., rows, groups, G]
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    eps = torch.finfo(W.dtype).eps
    if format.symmetric:
        return torch.maximum(lo.abs(), hi).div((q_max - q_min) / 2).masked_fill(hi == lo, eps), None
    s = (hi - lo).div(q_max - q_min).masked_fill(hi == lo, eps)
    # compressed-tensors takes z from the unfixed s, which makes it NaN (cast to int8: platform-defined) in an
    # all-zero group; from the fixed s it is q_min there, and the group still dequantizes to 0
    return s, (q_min - lo / s).clamp(q_min, q_max).round().to(torch.int8)


def round_codes(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, format: QuantFormat) -> torch.Tensor:
    """Codes round(clamp(w / s + z)) as floats, of W with s and z broadcast to it (compressed-tensors' quantize:
    clamp first, then round half to even)."""
    scaled = W / s if z is None else W / s + z.to(W.dtype)
    return scaled.clamp(*format.code_range).round()


def quantize_rtn(W: torch.Tensor, format: QuantFormat) -> QuantizedMatrix:
    """Round to nearest of W [..., rows, cols] with min-max scales per group (compressed-tensors' quantization of a
    weight: its observer's min and max, calculate_qparams, quantize), computed in W's dtype."""
    s, z = minmax_qparams(W, format)
    Wg = W.unflatten(-1, (s.shape[-1], -1))  # [..., rows, groups, G]
    codes = round_codes(Wg, s[..., None], None if z is None else z[..., None], format)
    return QuantizedMatrix(codes.flatten(-2).to(torch.int8), s, z, format)


def gptq(W: torch.Tensor, H: torch.Tensor, format: QuantFormat, block_size: int = 128,
         damp: float = 0.01) -> QuantizedMatrix:
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) of W [..., rows, cols]: codes that minimise
    tr((W - Q) H (W - Q)^T) greedily, column by column, for H [..., cols, cols] (e.g. sum of x x^T over inputs x; its
    scale does not matter). After column j is quantized, the columns from j on take up its error:
      W[:, j:] -= (w_j - q_j) / [H_j^-1]_jj * [H_j^-1]_{j, j:}  (H_j: H restricted to the columns from j on)
               = (w_j - q_j) / U_jj * U_{j, j:}                  (U: the upper Cholesky factor of H^-1),
    so H^-1 is factored once; the updates to the columns after the current block of `block_size` are applied once
    per block, as one product.

    As llm-compressor: the scales and zero points are the min-max ones of the original W (static groups, so no g_idx),
    no act-order (with groups it needs a g_idx, which vLLM rejects); a dead column (H_jj = 0) gets H_jj = 1 and a weight of 0;
    H + damp * mean(diag H) * I is inverted; where its Cholesky factorization fails, that matrix falls back to round to
    nearest (H^-1 = I: no error is propagated), with a warning. The sweep runs in fp32 (fp64 for an fp64 W), H^-1 in
    fp64."""
    cols = W.shape[-1]
    if H.shape[-2:] != (cols, cols) or H.shape[:-2] != W.shape[:-2]:
        raise ValueError(f"H is {list(H.shape)} but W is {list(W.shape)}; pass H of shape "
                         f"{[*W.shape[:-2], cols, cols]} (the Gram of W's inputs)")
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size={block_size}, damp={damp}: use block_size >= 1 and damp >= 0")
    s, z = minmax_qparams(W, format)
    U = _inverse_hessian_factor(H, damp)
    dtype = torch.promote_types(W.dtype, torch.float32)
    dead = H.diagonal(dim1=-2, dim2=-1)[..., None, :] == 0  # [..., 1, cols]
    W = W.to(dtype).masked_fill(dead, 0)
    U = U.to(dtype)
    G = cols // s.shape[-1]
    S = s.to(dtype).repeat_interleave(G, -1)  # [..., rows, cols]: each column's scale
    Z = None if z is None else z.repeat_interleave(G, -1)
    codes = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[..., i1:i2].clone(), U[..., i1:i2, i1:i2]  # [..., rows, n], [..., n, n]
        E1 = torch.empty_like(W1)  # each column's scaled error (w_j - q_j) / U_jj
        for i in range(i2 - i1):
            j = i1 + i
            q = round_codes(W1[..., i], S[..., j], None if Z is None else Z[..., j], format)  # [..., rows]
            codes[..., j] = q
            w_hat = q if Z is None else q - Z[..., j].to(dtype)
            E1[..., i] = (W1[..., i] - w_hat * S[..., j]) / U1[..., i, i, None]
            W1[..., i:] -= E1[..., i, None] * U1[..., None, i, i:]
        W[..., i2:] -= E1 @ U[..., i1:i2, i2:]
    return QuantizedMatrix(codes.to(torch.int8), s, z, format)


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U [..., cols, cols] (fp64) of (H + damp * mean(diag H) * I)^-1, dead columns set to 1 on
    the diagonal; the identity for a matrix whose damped H does not factor."""
    H = H.double().clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1)
    diag += damp * diag.mean(-1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(H)
    failed = info != 0
    if failed.any():
        warnings.warn(f"GPTQ: the damped Hessian of {int(failed.sum())} of {failed.numel()} matrices is not positive "
                      "definite; those are rounded to nearest instead. Raise damp, or add calibration tokens",
                      stacklevel=3)
        L = torch.where(failed[..., None, None], torch.eye(H.shape[-1], dtype=H.dtype, device=H.device), L)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # an SPD inverse: factors


def _bit_positions(cols: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset [cols] of each code in the densely packed row, on `device`: code i starts at bit
    i*b."""
    start = torch.arange(cols, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS


def packed_words(count: int, bits: int) -> int:
    """int32 words that `count` codes of `bits` bits take, packed densely."""
    return math.ceil(count * bits / WORD_BITS)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [..., cols] (int8) -> int32 [..., ceil(cols*b/32)], bit for bit compressed-tensors' (0.18+)
    pack_to_int32 along the last dimension: each code plus 2^(b-1) (unsigned), code 0 in the lowest bits of word 0,
    densely, so that a 3-bit code may straddle two words. compressed-tensors 0.17 (pinned by vLLM 0.32) packs 2, 4 and
    8 bits the same way, but 3 bits differently: 10 codes per word, in its low 30 bits, never straddling."""
    QuantFormat(bits)  # checks bits
    q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.dtype != torch.int8 or (codes.numel() and (codes.min() < q_min or codes.max() > q_max)):
        raise ValueError(f"pack takes int8 codes in [{q_min}, {q_max}] for bits={bits}; got {codes.dtype} codes"
                         + (f" in [{int(codes.min())}, {int(codes.max())}]" if codes.numel() else ""))
    cols = codes.shape[-1]
    word, offset = _bit_positions(cols, bits, codes.device)
    u = codes.long() - q_min  # [..., cols], unsigned
    packed = torch.zeros(*codes.shape[:-1], packed_words(cols, bits), dtype=torch.long, device=codes.device)
    last = packed.ndim - 1
    packed.index_add_(last, word, (u << offset) & 0xFFFFFFFF)
    straddles = offset + bits > WORD_BITS
    packed.index_add_(last, word[straddles] + 1, u[..., straddles] >> (WORD_BITS - offset[straddles]))
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # the words as signed int32


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack: int32 [..., ceil(cols*b/32)] -> signed int8 codes [..., cols]."""
    QuantFormat(bits)  # checks bits
    words = packed_words(cols, bits)
    if packed.dtype != torch.int32 or packed.shape[-1] != words:
        raise ValueError(f"unpack takes int32 [..., {words}] for {cols} codes of {bits} bits; got {packed.dtype} "
                         f"{list(packed.shape)}: pass the cols that were packed")
    if bytewise(bits):  # uint8 arithmetic wraps, so the offset codes read as int8 are the signed ones
        return whole_codes(packed, bits, cols).sub_(1 << (bits - 1)).view(torch.int8)
    word, offset = _bit_positions(cols, bits, packed.device)
    unsigned = packed.long() & 0xFFFFFFFF
    u = unsigned[..., word] >> offset
    straddles = offset + bits > WORD_BITS
    u[..., straddles] |= unsigned[..., word[straddles] + 1] << (WORD_BITS - offset[straddles])
    return ((u & ((1 << bits) - 1)) - (1 << (bits - 1))).to(torch.int8)


def bytewise(bits: int) -> bool:
    """Whether codes of `bits` can be read from the packed words' bytes (whole_codes): 2, 4 and 8 bits on a
    little-endian machine; 3-bit codes straddle words."""
    return WORD_BITS % bits == 0 and sys.byteorder == "little"


def whole_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The unsigned codes [..., cols] (uint8) of packed words, for `bits` that are bytewise: the words' bytes in
    memory order hold the codes in order, lowest bits first, so each code is one byte operation (3.6x faster than
    shifting the int32 words, at 4 bits on this project's CPU)."""
    data, mask = packed.view(torch.uint8), (1 << bits) - 1
    return torch.stack([data >> shift & mask for shift in range(0, 8, bits)], -1).flatten(-2)[..., :cols]


# codes dequantize_packed turns into floats at a time: their intermediates stay in cache and reuse their memory, where
# dequantizing 600M codes at once spent most of its time in fresh pages (Qwen3-30B-A3B's experts in one layer)
DEQUANTIZE_CHUNK = 1 << 20


def dequantize_packed(packed: torch.Tensor, cols: int, scales: torch.Tensor, zeros: torch.Tensor | None,
                      format: QuantFormat) -> torch.Tensor:
    """QuantizedMatrix(unpack(packed, bits, cols), scales, zeros, format).dequantize(), bit for bit, in fewer passes
    over the weights, DEQUANTIZE_CHUNK codes at a time: for widths that divide a word, the unsigned codes go to the
    scales' dtype at once and the offset joins the zero point, (u - (2^(b-1) + z)) * s, every term a small integer
    that bf16 and fp16 hold exactly."""
    bits = format.bits
    if not bytewise(bits):
        return QuantizedMatrix(unpack(packed, bits, cols), scales, zeros, format).dequantize()
    lead, groups = packed.shape[:-1], scales.shape[-1]
    offset = 1 << (bits - 1)
    shift = torch.full_like(scales, offset) if zeros is None else zeros.to(scales.dtype) + offset
    packed, scales, shift = packed.reshape(-1, packed.shape[-1]), scales.reshape(-1, groups), shift.reshape(-1, groups)
    out = torch.empty(packed.shape[0], cols, dtype=scales.dtype, device=packed.device)
    step = max(1, DEQUANTIZE_CHUNK // cols)
    for start in range(0, packed.shape[0], step):
        rows = slice(start, start + step)
        unsigned = whole_codes(packed[rows], bits, cols).to(scales.dtype).unflatten(-1, (groups, -1))  # [r, groups, G]
        part = out[rows].unflatten(-1, (groups, -1))
        torch.mul(unsigned.sub_(shift[rows, :, None]), scales[rows, :, None], out=part)
    return out.reshape(*lead, cols)


INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 weight-only kernels take
# tokens from which dequantizing a 4-bit matrix and a bf16 matmul beat torch's int4 kernel, where bf16 matmuls are
# native: at Qwen3-30B-A3B's 768 x 2048 on an AVX512 CPU the kernel took 0.04 ms on one token against 1.8 ms, and they
# tied at 128 (BENCHMARKS §3)
INT4_KERNEL_ROWS = 128


@functools.lru_cache(maxsize=None)
def int4_kernel_rows(device_type: str) -> float:
    """INT4_KERNEL_ROWS, or infinity on a CPU without oneDNN's bf16 path (AVX2 alone), whose bf16 matmul is emulated:
    on an AVX2 CPU at Qwen3-30B-A3B's 768 x 2048 the kernel took 0.3 ms on one token and 198 on 2,048, against 3.9
    and 938 dequantized and multiplied in bf16 (4.7x-13x slower at every count from 1 to 2,048; 2026-12-03,
    benchmarks.inference.int4_kernel)."""
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if device_type == "cpu" and native is not None and not native():
        return math.inf
    return INT4_KERNEL_ROWS


@dataclass(frozen=True)
class Int4Weight:
    """A 4-bit matrix [out, in] in the layout of torch's int4 weight-only kernels (tinygemm's on CUDA), which compute
    x @ W^T from the codes without dequantizing W: bf16 activations, groups of 32 to 256 columns, rows in sixteens.
    The kernels read w = (u - 8) * s + zero for unsigned codes u, so our (q - z) * s, with q = u - 8, is
    zero = -z * s (in bf16). A matrix of one group a row (the narrow rank-r factors) runs with unit scales, which
    every such matrix of its shape shares, and its own scale s and zero point z applied to the product:
    (x @ (u - 8)^T) * s - sum(x) * z * s, so that its kernel layout holds nothing per row but the codes (a scale
    repeated over kernel groups would be 4 bytes a group and row). Columns are padded to whole kernel groups and rows
    to sixteens with zero codes, the kernel's alone: x is padded and the output cut to size on each call."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [groups, padded out, 2] bf16
    group_size: int
    in_features: int
    out_features: int
    row_scale: torch.Tensor | None = None  # [out]: one group a row, applied to the unit-scaled product
    row_shift: torch.Tensor | None = None  # [out] fp32 z * s, asymmetric with one group a row

    @classmethod
    def of(cls, packed: torch.Tensor, cols: int, scales: torch.Tensor, zeros: torch.Tensor | None,
           format: QuantFormat) -> Int4Weight | None:
        """From our storage (packed words [out, words], scales and integer zero points [out, groups]); None where the
        kernels do not take it: not 4 bits, groups the kernel has no size for, scales not bf16, a device without
        the kernel."""
        rows, groups = scales.shape
        per_row = groups == 1
        group = INT4_KERNEL_GROUPS[0] if per_row else cols // groups
        if (format.bits != 4 or group not in INT4_KERNEL_GROUPS or scales.dtype != torch.bfloat16
                or packed.device.type not in ("cpu", "cuda")):
            return None
        padded_cols, padded_rows = -(-cols // group) * group, -(-rows // 16) * 16
        unsigned = F.pad(unpack(packed, 4, cols).int() + 8, (0, padded_cols - cols, 0, padded_rows - rows), value=8)
        if per_row:
            scales_and_zeros = unit_scales(padded_cols // group, padded_rows, packed.device)
        else:
            zero = torch.zeros_like(scales) if zeros is None else -zeros.to(scales.dtype) * scales
            scales_and_zeros = F.pad(torch.stack([scales, zero], -1), (0, 0, 0, 0, 0, padded_rows - rows))
            scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous()
        try:
            if packed.device.type == "cpu":
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
            else:  # two codes a byte, the even column high, and 8 inner k-tiles: tinygemm's layout
                pairs = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)
                weight = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        except (RuntimeError, AttributeError):  # shapes or GPUs the kernel refuses, a torch without it
            return None
        row_scale = scales[:, 0] if per_row else None
        row_shift = zeros[:, 0].float() * row_scale.float() if per_row and zeros is not None else None
        return cls(weight, scales_and_zeros, group, cols, rows, row_scale, row_shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] bf16 -> x @ W^T [N, out]."""
        padded_cols = self.scales_and_zeros.shape[0] * self.group_size
        if padded_cols != self.in_features:
            x = F.pad(x, (0, padded_cols - self.in_features))
        if x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        y = y if y.shape[-1] == self.out_features else y[:, :self.out_features]
        if self.row_scale is None:
            return y
        y = y.float() * self.row_scale.float()  # in fp32: the zero point's term may cancel much of the product
        if self.row_shift is not None:
            y = y - x.float().sum(-1, keepdim=True) * self.row_shift
        return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def unit_scales(groups: int, rows: int, device: torch.device) -> torch.Tensor:
    """The kernels' scales and zeros [groups, rows, 2] of scale 1 and zero 0, one tensor for every matrix of its
    shape."""
    ones = torch.ones(groups, rows, 1, dtype=torch.bfloat16, device=device)
    return torch.cat([ones, torch.zeros_like(ones)], -1)


@dataclass(frozen=True)
class Int4Matrices:
    """A stack of 4-bit matrices in the int4 kernels' layout, called as cpu_matmul.PackedMatrices is: x W_i^T."""

    weights: list[Int4Weight]

    @property
    def out_features(self) -> int:
        return self.weights[0].out_features

    def __call__(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.weights[index](x)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [..., rows, groups] (int8) packed along the rows, as compressed-tensors packs them:
    int32 [..., groups, ceil(rows*b/32)]."""
    return pack(zeros.mT.contiguous(), bits)


def unpack_zeros(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The inverse of pack_zeros: int8 zero points [..., rows, groups]."""
    return unpack(packed, bits, rows).mT


class QuantizedLinear(torch.nn.Module):
    """An nn.Linear whose weight [out, in] is kept as packed codes, 16-bit scales and (asymmetric) packed zero points,
    dequantized at each forward and dropped after it: its resident memory is the integers."""

    def __init__(self, linear: torch.nn.Linear, format: QuantFormat):
        super().__init__()
        weight = linear.weight.detach()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        scale_dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float16
        self.format = format if format.group_size is None or weight.shape[1] % format.group_size == 0 else \
            QuantFormat(format.bits, None, format.symmetric)
        quantized = quantize_rtn(weight.to(scale_dtype), self.format)
        self.register_buffer("weight_packed", pack(quantized.codes, format.bits))
        self.register_buffer("weight_scale", quantized.scales)
        if quantized.zeros is not None:
            self.register_buffer("weight_zero", pack_zeros(quantized.zeros, format.bits))
        self.bias = linear.bias

    def weight(self) -> torch.Tensor:
        rows, cols = self.shape
        zeros = None if self.format.symmetric else unpack_zeros(self.weight_zero, self.format.bits, rows)
        codes = unpack(self.weight_packed, self.format.bits, cols)
        return QuantizedMatrix(codes, self.weight_scale, zeros, self.format).dequantize().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(), self.bias)
