"""SharedCoreExperts: a drop-in replacement for a transformers experts module.

Every expert projection W_e (out x in) of a layer is stored as one shared core C and per-expert low-rank factors:

    wrapped:  W_e = (I + U_out,e V_out,e^T) C (I + U_in,e V_in,e^T)     (the method)
    delta:    W_e = C + U_e V_e^T                                       (the additive baseline, rank 2r)

Shapes: E experts, G cores, T tokens, K active experts per token, S = T*K (token, expert) pairs, r rank.
C is stored as [G, out, in] with a map expert -> core, so that several cores (expert groups) fit in the same module;
G = 1 is the plain shared-core method.

The forward never rebuilds a dense W_e. It relies on
    C (I + U_in V_in^T) x = C x + (C U_in)(V_in^T x),
so the core runs once per token, not once per (token, expert) pair; for the down projection the core runs once per
token on the routing-weighted sum of the pairs' inputs. Only rank-r products are per pair.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _default_apply_gate

from moe_compress import cpu_matmul
from moe_compress.cpu_matmul import ExpertTables, PackedMatrices
from moe_compress.discovery import join_weights, projection_names, split_weights
from moe_compress.quantize import (Int4Matrices, Int4Weight, QuantFormat, QuantizedMatrix, dequantize_packed,
                                   int4_kernel_rows, pack, pack_zeros, packed_words, round_codes, unpack_zeros)

# padded_bmm's bound on its padded stack: PADDING_LIMIT times the pairs' rows or PADDED_BYTES, whichever is larger.
# A skewed routing (one expert taking most of a batch) makes it up to as many times the pairs as there are experts;
# past both, the loop over the experts is kinder to memory (a long prefill in fp16). A random router at Qwen3-30B-A3B's
# 128 experts gave its busiest 5x the mean on a step's 1,024 tokens.
PADDING_LIMIT = 4
PADDED_BYTES = 2**30


@dataclass
class Route:
    """The (token, expert) pairs of one forward, sorted by expert so that per-expert work is a grouped matmul."""

    token: torch.Tensor  # [S] token of each sorted pair
    expert: torch.Tensor  # [S] expert of each sorted pair, ascending
    weight: torch.Tensor  # [S] routing weight of each sorted pair
    order: torch.Tensor  # [S] position of each sorted pair in the flattened [T, K] routing grid
    slot: torch.Tensor  # [S] the inverse: the sorted pair at each position of the flattened grid
    counts: list[int]  # [E] pairs per expert
    num_routed: int  # experts with some pair
    offsets: torch.Tensor  # [E] int32 cumulative counts, for torch's grouped_mm
    num_tokens: int
    top_k: int
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # token_rows' copies
    padded: tuple[torch.Tensor, int] | None = None  # padded_rows()

    @classmethod
    def build(cls, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Route:
        num_tokens, top_k = top_k_index.shape
        expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
        counts = torch.bincount(expert, minlength=num_experts)
        per_expert = counts.tolist()
        return cls(
            token=order // top_k,
            expert=expert,
            weight=top_k_weights.reshape(-1).index_select(0, order),
            order=order,
            slot=torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device)),
            counts=per_expert,
            num_routed=sum(1 for c in per_expert if c),
            offsets=torch.cumsum(counts, 0, dtype=torch.int32),
            num_tokens=num_tokens,
            top_k=top_k,
        )

    @property
    def busy(self) -> bool:
        """Whether more than half the experts are routed: below that (decoding), work per routed expert is cheaper
        than work over all of them."""
        return self.num_routed > len(self.counts) // 2

    @property
    def thin(self) -> bool:
        """Whether the pairs are spread thin, at most six a routed expert on average (decoding, short prompts): a
        product per pair then takes less time than one per expert (cpu_matmul.ExpertTables; at Qwen3-30B-A3B's
        factors, bf16, the two crossed between 6 and 8 pairs an expert)."""
        return len(self.expert) <= 6 * self.num_routed

    def per_expert(self, x: torch.Tensor, product: Callable[[torch.Tensor, int], torch.Tensor],
                   out_features: int) -> torch.Tensor:
        """product(rows of expert e, e) for the routed experts alone, in expert order: [S, a] -> [S, out_features]."""
        blocks, start = [], 0
        for expert, count in enumerate(self.counts):
            if count:
                blocks.append(product(x[start:start + count], expert))
            start += count
        return torch.cat(blocks) if blocks else x.new_zeros(0, out_features)

    def padded_rows(self) -> tuple[torch.Tensor, int]:
        """Where each sorted pair goes when every expert's rows are padded to the busiest's count M: its row of the
        [E * M] padded stack, and M (experts.padded_bmm); computed once per forward."""
        if self.padded is None:
            most = max(self.counts, default=0)
            starts = self.offsets.long() - self.offsets.new_tensor(self.counts, dtype=torch.long)
            within = torch.arange(len(self.expert), device=self.expert.device) - starts[self.expert]
            self.padded = self.expert * most + within, most
        return self.padded

    def routed_experts(self) -> torch.Tensor | None:
        """The experts some pair is routed to, ascending, where at most half of them are (decoding); None otherwise,
        when gathering their part of each tensor would cost more than it saves."""
        if self.busy:
            return None
        return torch.tensor([e for e, c in enumerate(self.counts) if c], device=self.expert.device)

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each sorted pair's token's row of x [T, d]: [S, d], gathered once per forward whoever asks. On the CPU
        by index_select, whose backward (index_add) took 0.4x the time of indexing's (index_put with accumulation)
        at 2,048 pairs of width 256; elsewhere by indexing, whose backward stays deterministic on CUDA with a token's
        K copies to add up."""
        if id(x) not in self.gathered:
            rows = x.index_select(0, self.token) if x.device.type == "cpu" else x[self.token]
            self.gathered[id(x)] = x, rows  # x kept too, so that its id is not reused while the route lives
        return self.gathered[id(x)][1]

    def to_grid(self, y: torch.Tensor) -> torch.Tensor:
        """[S, d] sorted pairs -> [T, K, d] routing grid (a permutation: no two rows meet in its backward)."""
        return y.index_select(0, self.slot).view(self.num_tokens, self.top_k, y.shape[-1])

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the pairs of each token: [S, d] -> [T, d]. A reshape and sum, not index_add, to stay deterministic."""
        return self.to_grid(y).sum(dim=1)


def apply_gate(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The experts module's gating of its gate and up projections' outputs: act(gate) * up, or the model's own."""
    own = type(experts)._apply_gate
    if own is _default_apply_gate:
        return experts.act_fn(gate) * up
    # A model's own gating reads the fused layout: [gate | up] or interleaved [g0, u0, g1, u1, ...]
    fused = torch.cat([gate, up], -1) if experts.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
    return own(experts, fused)


def wrapped_weights(core, u_out, v_out, u_in, v_in) -> torch.Tensor:
    """(I + U_out V_out^T) C (I + U_in V_in^T) densely, [E, out, in]; a side given as None is the identity."""
    W = core
    if u_in is not None:
        W = W + (W @ u_in) @ v_in.mT
    if u_out is not None:
        W = W + u_out @ (v_out.mT @ W)
    return W


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped_mm wants 16-byte aligned rows and columns, in the forward and in the backward's layouts."""
    sizes_ok = all((n * t.element_size()) % 16 == 0 for n in t.shape[1:])
    return sizes_ok and all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride()) and t.data_ptr() % 16 == 0


def _padded(t: torch.Tensor) -> torch.Tensor:
    """A zero-padded contiguous copy of `t` whose every dimension but the first is a multiple of 16 bytes."""
    multiple = max(1, 16 // t.element_size())
    pads = [size for n in reversed(t.shape[1:]) for size in (0, -n % multiple)]
    return F.pad(t, pads).contiguous()


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel takes inputs like x: any dtype on the CPU, bf16 alone on CUDA (other dtypes
    there run torch's fallback, a loop over the experts)."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16)


def padded_bmm(x: torch.Tensor, w: torch.Tensor, route: Route) -> torch.Tensor | None:
    """grouped_mm as one batched product: each expert's rows zero-padded to the busiest expert's count, [E, M, a] x
    [E, a, b]; None where the padded stack would pass both PADDING_LIMIT times the pairs and PADDED_BYTES."""
    rows, most = route.padded_rows()
    stacked = len(route.counts) * most
    if stacked > PADDING_LIMIT * len(x) and stacked * x.shape[-1] * x.element_size() > PADDED_BYTES:
        return None
    padded = x.new_zeros(stacked, x.shape[-1]).index_copy(0, rows, x)
    y = torch.bmm(padded.view(len(route.counts), most, -1), w)
    return y.view(-1, w.shape[-1]).index_select(0, rows)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, route: Route) -> torch.Tensor:
    """Per-expert matmul of sorted pairs: [S, a] x [E, a, b] -> [S, b], row block e times w[e]."""
    fast = kernel_takes(x)
    training = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    # torch's kernel visits every expert; with few of them routed (decoding) a loop over those is cheaper
    if fast and route.busy and hasattr(F, "grouped_mm"):
        kernel_x, kernel_w = x, w
        if training:
            # in training (the reconstruction), zero-padded copies of the small factors: forward and backward of the
            # upcycled testbed's block took ~20% less time a step than on the loop below (fp32, rank 21 and 14). Only
            # the operand that needs it is copied: the pairs' inputs [S, F] are most of a step's memory traffic
            kernel_x = x if _aligned(x) else _padded(x)
            kernel_w = w if _aligned(w) else _padded(w)
        if _aligned(kernel_x) and _aligned(kernel_w):
            try:
                y = F.grouped_mm(kernel_x, kernel_w, offs=route.offsets)
            except RuntimeError:  # the kernel refuses some layouts and GPUs; the loop below handles all of them
                pass
            else:
                if y.requires_grad:  # its backward refuses strided gradients, which a model's gating can hand it
                    y.register_hook(torch.Tensor.contiguous)  # (gpt_oss reads gate and up as every other column)
                return y[:, :w.shape[-1]]
    if not fast and route.busy:
        # fp32 on CUDA (the reconstruction trains in it): one kernel for all the experts, where the loops below
        # launch one a routed expert and an autograd node each (BENCHMARKS §8)
        y = padded_bmm(x, w, route)
        if y is not None:
            return y
    if training:
        # unbind, not w[e]: each w[e]'s backward writes a zero gradient the size of all of w (at Qwen3-30B-A3B's shape
        # the loop's backward took 24-67x longer than with unbind's one stacked gradient)
        blocks = [x_e @ w_e for x_e, w_e in zip(x.split(route.counts), w.unbind(0)) if x_e.shape[0] > 0]
        return torch.cat(blocks) if blocks else x.new_zeros(0, w.shape[-1])
    # the routed experts alone: views of all 128 cost a tenth of a decoding step (vLLM, Qwen3-30B-A3B's shape)
    return route.per_expert(x, lambda rows, e: rows @ w[e], w.shape[-1])


@dataclass(frozen=True)
class Stored:
    """How a quantized tensor of a projection is kept: its format, its shape and dtype as a float tensor, and whether
    its matrix is its transpose (the matrix's columns are what a product contracts, along which groups run)."""

    format: QuantFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    transposed: bool

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, cols) of each matrix of the stack."""
        rows, cols = self.shape[-2:]
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def scale_dtype(self) -> torch.dtype:
        """Scales are kept in 16 bits: bf16 for a bf16 tensor (its range), fp16 otherwise (its precision)."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16


def group_format(format: QuantFormat, cols: int) -> QuantFormat:
    """`format` for a matrix of `cols` columns: one group per row where its group size does not divide them (the
    narrow rank-r factors)."""
    fits = format.group_size is not None and cols % format.group_size == 0
    return format if fits or format.group_size is None else QuantFormat(format.bits, None, format.symmetric)


class Projection(nn.Module):
    """What every storage form shares: the cores, the expert -> core map, the optional per-expert bias, and the
    integer storage of any of its tensors (quantize_): packed codes and 16-bit scales, dequantized where the forward
    reads them (once per forward, see dequantized_once)."""

    TENSORS: tuple[str, ...] = ("core",)  # what the form stores, the bias and the expert -> core map aside
    # the stored tensors whose matrix is their transpose: [in, r] factors that multiply the input (x @ v)
    TRANSPOSED: frozenset[str] = frozenset()

    def __init__(self, num_experts: int, out_features: int, in_features: int, num_cores: int, bias: bool, **factory):
        super().__init__()
        self.core = nn.Parameter(torch.empty(num_cores, out_features, in_features, **factory))
        self.register_buffer("expert_core", torch.zeros(num_experts, dtype=torch.long, device=factory.get("device")))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        self._derived_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.stored: dict[str, Stored] = {}  # the quantized tensors, by name
        self._memo: dict[str, torch.Tensor] | None = None
        self._routed: torch.Tensor | None = None  # the experts this forward reads, where not all (dequantized_once)
        # 4-bit tensors in the int4 kernel's layout, a matrix each, with the key of the codes they were built from
        self._kernels: dict[str, tuple[tuple, Int4Matrices | None]] = {}
        # tensors laid out for oneDNN, as embedding_bag's tables or for the int4 kernel in their stead
        # (pack_for_cpu_), with the data pointer of their placeholder
        self._packed: dict[str, tuple[int, PackedMatrices | ExpertTables | Int4Matrices]] = {}

    def __getattr__(self, name: str) -> Any:
        stored = self.__dict__.get("stored")
        if stored and name in stored:  # a quantized tensor, read as the float tensor it stands for
            memo = self.__dict__["_memo"]
            value = None if memo is None else memo.get(name)
            if value is None:
                value = (self.fake_quantized(name) if name in self._parameters
                         else self.dequantized(name, self._routed if self.per_expert(name) else None))
                if memo is not None:
                    memo[name] = value
            return value
        return super().__getattr__(name)

    def train_quantization_aware_(self, names: Iterable[str]) -> None:
        """Make the quantized tensors among `names` trainable: each gets a float shadow parameter, read through its
        rounding to the stored format (scales and zero points fixed) with a straight-through gradient; saving writes
        the shadows' codes into the integer storage and leaves the shadows out, so that a checkpoint is a quantized
        folder, and loading one sets the shadows from its codes."""
        for name in set(names) & set(self.stored):
            if name not in self._parameters:
                self._parameters[name] = nn.Parameter(self.dequantized(name).detach().clone())
        if not self.__dict__.get("_qat_hooks"):
            self._qat_hooks = (self.register_state_dict_post_hook(_shadows_into_codes),
                               self.register_load_state_dict_pre_hook(_shadows_expected),
                               self.register_load_state_dict_post_hook(_codes_into_shadows))

    def end_quantization_aware_(self) -> None:
        """The shadows' codes written into the integer storage and the shadows dropped: plain quantized storage, as
        before train_quantization_aware_."""
        for name in self.stored:
            shadow = self._parameters.pop(name, None)
            if shadow is not None:
                self.write_codes(name, shadow)
        for handle in self.__dict__.pop("_qat_hooks", ()):
            handle.remove()

    def write_codes(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The integer storage of `name` set to the codes of the float tensor `value` (rounded with its stored scales
        and zero points); the packed buffer."""
        packed = self._buffers[f"{name}_packed"]
        packed.copy_(pack(self._codes_of(name, value), self.stored[name].format.bits))
        return packed

    def _zeros(self, name: str, experts: torch.Tensor | None = None) -> torch.Tensor | None:
        stored = self.stored[name]
        if stored.format.symmetric:
            return None
        return unpack_zeros(self._stored_part(f"{name}_zero", experts), stored.format.bits, stored.matrix[0])

    def _stored_part(self, buffer: str, experts: torch.Tensor | None) -> torch.Tensor:
        """A buffer of the integer storage, or the part of it that holds `experts` (per-expert tensors)."""
        value = self._buffers[buffer]
        return value if experts is None else value[experts]

    def per_expert(self, name: str) -> bool:
        """Whether the stored tensor `name` holds one matrix per expert (its first dimension indexes experts); the
        cores are indexed by core, which is not the expert."""
        return name != "core" and self.shape_of(name)[0] == self.num_experts

    def _codes_of(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The codes [..., rows, cols] (int8) of a float tensor shaped as `name`, rounded with its stored scales and
        zero points."""
        stored = self.stored[name]
        with torch.no_grad():
            X = value.mT if stored.transposed else value
            scales, zeros = self._buffers[f"{name}_scale"].to(X.dtype), self._zeros(name)
            Xg = X.unflatten(-1, (scales.shape[-1], -1))  # [..., rows, groups, G]
            codes = round_codes(Xg, scales[..., None], None if zeros is None else zeros[..., None], stored.format)
        return codes.flatten(-2).to(torch.int8)

    def _from_codes(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """The float tensor, in its dtype and shape, that codes [..., rows, cols] of `name` stand for."""
        stored = self.stored[name]
        value = QuantizedMatrix(codes, self._buffers[f"{name}_scale"], self._zeros(name), stored.format)
        value = value.dequantize().to(stored.dtype)
        return value.mT if stored.transposed else value

    def fake_quantized(self, name: str) -> torch.Tensor:
        """The shadow of a quantized tensor as its codes would store it, the gradient passed straight through."""
        shadow = self._parameters[name]
        return shadow + (self._from_codes(name, self._codes_of(name, shadow)) - shadow).detach()

    def shape_of(self, name: str) -> tuple[int, ...]:
        """A stored tensor's shape as a float tensor, without dequantizing it."""
        return self.stored[name].shape if name in self.stored else tuple(self._parameters[name].shape)

    @property
    def num_experts(self) -> int:
        return self.expert_core.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.shape_of("core")[1:]

    def matrix(self, name: str) -> torch.Tensor:
        """A float tensor as the stack of matrices it is quantized as: [..., rows, cols], cols contracted."""
        value = self._parameters[name].detach()
        return value.mT if name in self.TRANSPOSED else value

    def quantize_(self, name: str, quantized: QuantizedMatrix) -> None:
        """Keep the tensor `name` as `quantized` (of its matrix(name)): its parameter is replaced by packed codes,
        scales and, asymmetric, packed zero points."""
        parameter = self._parameters[name]
        stored = Stored(quantized.format, tuple(parameter.shape), parameter.dtype, name in self.TRANSPOSED)
        del self._parameters[name]
        self._quantized_buffers(name, stored, quantized)

    def empty_quantized_(self, name: str, format: QuantFormat) -> None:
        """The tensor `name` as empty quantized storage in `format`, to load saved codes and scales into."""
        parameter = self._parameters.pop(name)
        transposed = name in self.TRANSPOSED
        cols = parameter.shape[-2] if transposed else parameter.shape[-1]
        stored = Stored(group_format(format, cols), tuple(parameter.shape), parameter.dtype, transposed)
        rows, cols = stored.matrix
        lead = parameter.shape[:-2]
        codes = torch.empty(*lead, rows, cols, dtype=torch.int8, device=parameter.device)
        groups = stored.format.groups(cols)
        scales = torch.empty(*lead, rows, groups, dtype=stored.scale_dtype, device=parameter.device)
        zeros = None if stored.format.symmetric else torch.empty(*lead, rows, groups, dtype=torch.int8,
                                                                  device=parameter.device)
        self._quantized_buffers(name, stored, QuantizedMatrix(codes, scales, zeros, stored.format), pack_codes=False)

    def _quantized_buffers(self, name: str, stored: Stored, quantized: QuantizedMatrix, pack_codes: bool = True):
        rows, cols = stored.matrix
        bits, codes, zeros = stored.format.bits, quantized.codes, quantized.zeros
        device = codes.device
        if pack_codes and device.type != "meta":
            codes = pack(codes, bits)
            zeros = None if zeros is None else pack_zeros(zeros, bits)
        else:  # shapes only (the meta device, or storage to be loaded): pack's and pack_zeros' shapes
            codes = torch.empty(*codes.shape[:-1], packed_words(cols, bits), dtype=torch.int32, device=device)
            zeros = None if zeros is None else torch.empty(*zeros.shape[:-2], zeros.shape[-1], packed_words(rows, bits),
                                                           dtype=torch.int32, device=device)
        self.register_buffer(f"{name}_packed", codes)
        self.register_buffer(f"{name}_scale", quantized.scales.to(stored.scale_dtype))
        if zeros is not None:
            self.register_buffer(f"{name}_zero", zeros)
        self.stored[name] = stored

    def dequantized(self, name: str, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The float tensor a quantized one stands for, in its dtype and shape. With `experts` (a per-expert tensor),
        only their matrices are dequantized and the others' are left unset: for a forward that reads no other (a
        decoding step routes 8 of Qwen3-30B-A3B's 128 experts, so it dequantizes 1/16 of them)."""
        stored = self.stored[name]
        value = self._matrices(name, experts)
        if experts is not None:  # in the matrices' layout, as the whole tensor would be: the same products after
            value = value.new_empty(stored.shape[0], *stored.matrix).index_copy_(0, experts, value)
        return value.mT if stored.transposed else value

    def _matrices(self, name: str, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The quantized tensor's matrices, dequantized as they are stored ([n, rows, cols], cols contracted): all of
        them, or those of `experts` alone."""
        stored = self.stored[name]
        return dequantize_packed(self._stored_part(f"{name}_packed", experts), stored.matrix[1],
                                 self._stored_part(f"{name}_scale", experts), self._zeros(name, experts),
                                 stored.format).to(stored.dtype)

    def train(self, mode: bool = True) -> Projection:
        if mode and any(self._packed_matrices(name) for name in list(self._packed)):
            raise RuntimeError("these experts were packed for inference on the CPU (pack_for_cpu_), which freed the "
                               "tensors training would update; load the model again to train it")
        # Trainers update parameters in ways the version counters below do not always see: start afresh
        self._derived_cache.clear()
        return super().train(mode)

    def expert_mm(self, x: torch.Tensor, name: str, route: Route) -> torch.Tensor:
        """x_s T_e for each sorted pair s (expert e), T_e expert e's matrix of the stored tensor `name` as products
        read it: the tensor's own [in, k] where it is stored so (TRANSPOSED), else its transpose. [S, a] -> [S, b]."""
        packed = self._packed_matrices(name)
        if isinstance(packed, ExpertTables) and route.thin:
            return packed.on_pairs(x, route.expert)
        if packed is not None:  # 4-bit per-expert tensors run through the int4 kernel packed alone: its layout beside
            return route.per_expert(x, packed, packed.out_features)  # the codes of every expert would double them
        tensor = getattr(self, name)
        return grouped_mm(x, tensor if name in self.TRANSPOSED else tensor.transpose(1, 2), route)

    def shared_mm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x T for the one matrix T of a stored tensor the experts share ([1, ., .]: a single core, a shared basis),
        oriented as expert_mm's. [N, a] -> [N, b]."""
        packed = self._packed_matrices(name)
        if packed is not None:
            return packed(x)
        kernels = self._int4_kernels(name, x) if x.shape[0] < int4_kernel_rows(x.device.type) else None
        if kernels is not None:
            return kernels(x)
        matrix = getattr(self, name)[0]
        return x @ (matrix if name in self.TRANSPOSED else matrix.T)

    def packable(self) -> list[str]:
        """The stored tensors pack_for_cpu_ can lay out for the CPU's fast products: the float ones oneDNN multiplies
        well, and the 4-bit ones torch's int4 kernel takes, that the forward reads through expert_mm and shared_mm
        alone: not the cores of several groups of experts (read per group), nor the wrapped form's (multiplied with
        its factors ahead of the forward)."""
        if self.form == "wrapped":
            return []
        names = [name for name in self.TENSORS
                 if name != "core" or self.per_expert("core") or self.shape_of("core")[0] == 1]
        # a tensor packed already is: its placeholder must not be laid out again (as zeros, beside the real layout)
        return [name for name in names if self._packed_matrices(name) is not None or self._packs_for_cpu(name)]

    def _packs_for_cpu(self, name: str) -> bool:
        if name in self.stored:
            return self._storage(name).device.type == "cpu" and self._int4_layout(name) is not None
        return cpu_matmul.available(self._parameters[name])

    def pack_for_cpu_(self) -> None:
        """For inference on the CPU: lay each packable tensor out for oneDNN's matmul (a shared one) or as
        embedding_bag's tables (one a expert: cpu_matmul), or, 4-bit, for torch's int4 kernel, and free it, so that
        the experts hold their bytes once. The tensor (a parameter, or the packed codes) keeps its shape as a
        1-element placeholder that nothing reads; training is refused from then on. The 4-bit tensors then run
        through the kernel on any number of tokens (dequantizing needs the codes)."""
        if self.training:
            raise RuntimeError("pack_for_cpu_ is for inference: call .eval() first")
        for name in self.packable():
            if self._packed_matrices(name) is not None:
                continue
            storage = self._storage(name)
            if name in self.stored:
                packed = self._kernels.pop(name)[1]
            else:
                weights = storage.detach().mT if name in self.TRANSPOSED else storage.detach()  # [., out, in]
                packed = ExpertTables(weights) if self.per_expert(name) else PackedMatrices(weights.unbind(0))
            storage.data = storage.new_zeros(1).expand(storage.shape)
            self._packed[name] = (storage.data_ptr(), packed)

    def _storage(self, name: str) -> torch.Tensor:
        """The tensor holding the values of the stored tensor `name`: its parameter, or its packed codes."""
        return self._buffers[f"{name}_packed"] if name in self.stored else self._parameters[name]

    def _packed_matrices(self, name: str) -> PackedMatrices | ExpertTables | Int4Matrices | None:
        """The packed matrices of `name`, unless values were loaded into its tensor since (a new storage in place of
        the placeholder: vLLM reloading weights), which makes them stale and drops them."""
        entry = self._packed.get(name)
        if entry is not None and entry[0] != self._storage(name).data_ptr():
            del self._packed[name]
            return None
        return None if entry is None else entry[1]

    def _derived(self, name: str, inputs: tuple[torch.Tensor, ...], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A product of parameters, cached in eval mode while they stay unchanged; recomputed in training mode and
        under autograd, so that gradients flow and updates show at once."""
        memo = self._memo or {}
        dequantized = any(t is value for t in inputs for value in memo.values())  # this forward's own: not kept
        if dequantized or self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return fn()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in inputs)
        cached = self._derived_cache.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, fn())
            self._derived_cache[name] = cached
        return cached[1]

    def core_of_experts(self, per_expert: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """fn(C_g, factor of the experts of core g) for every core, assembled back in expert order."""
        if self.core.shape[0] == 1:
            return fn(self.core[0], per_expert)
        out = None
        for g in range(self.core.shape[0]):
            members = (self.expert_core == g).nonzero().squeeze(1)
            part = fn(self.core[g], per_expert[members])
            out = part.new_empty(self.num_experts, *part.shape[1:]) if out is None else out
            out[members] = part
        return out

    def _int4_kernels(self, name: str, x: torch.Tensor) -> Int4Matrices | None:
        """The 4-bit stored tensor `name` in torch's int4 kernel layout, for products with x where that pays: bf16
        tokens (the caller sees to fewer than int4_kernel_rows of them: from there a dequantized matrix and a bf16
        matmul are faster), no gradient to pass back. None otherwise, or where the kernel does not take the tensor.
        The layout is kept beside the codes: for the tensors the experts share, a small part of what they hold."""
        if x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad):
            return None
        return self._int4_layout(name)

    def _int4_layout(self, name: str) -> Int4Matrices | None:
        """`name`'s matrices in the int4 kernel's layout, where it is stored in 4 bits with bf16 scales and has no
        float shadow (training); built once, again when its codes change or move."""
        stored = self.stored.get(name)
        if stored is None or stored.format.bits != 4 or name in self._parameters:
            return None
        packed = self._buffers[f"{name}_packed"]
        key = (packed.data_ptr(), packed._version, packed.device)
        cached = self._kernels.get(name)
        if cached is None or cached[0] != key:
            scales, zeros, cols = self._buffers[f"{name}_scale"], self._zeros(name), stored.matrix[1]
            kernels = [Int4Weight.of(packed[i], cols, scales[i], None if zeros is None else zeros[i], stored.format)
                       for i in range(packed.shape[0])]
            kernels = None if any(k is None for k in kernels) else self._checked(name, Int4Matrices(kernels))
            self._kernels[name] = cached = (key, kernels)
        return cached[1]

    def _checked(self, name: str, kernels: Int4Matrices) -> Int4Matrices | None:
        """`kernels` if the first computes what its dequantized matrix does on a few random tokens (to bf16's
        precision), else None with a warning: the CUDA layout could not be tested on this project's machines."""
        # the first matrix alone, [out, in] as the kernel reads it (not the whole tensor: at pack time that is the
        # float size of every expert's factor, for one matrix)
        matrix = self._matrices(name, torch.zeros(1, dtype=torch.long, device=self.expert_core.device))[0]
        x = torch.randn(4, matrix.shape[1], generator=torch.Generator().manual_seed(0)).to(matrix)
        reference = x.float() @ matrix.float().T
        try:
            error = ((kernels(x).float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        except RuntimeError as failure:  # a GPU or shape the kernel refuses only when it runs
            error, why = float("inf"), f"failed ({str(failure).splitlines()[0]})"
        else:
            why = f"is off by {error:.1e} from the dequantized {name}"
        if error <= 1e-2:  # bf16 rounding of the activations and outputs is ~3e-3
            return kernels
        warnings.warn(f"torch's int4 kernel on {x.device.type} {why}; the {name} is dequantized instead (please "
                      "report this with your torch version and device)")
        return None

    def core_on_tokens(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """C_{g(e)} x for each sorted pair, computing each core once per token: [T, in] -> [S, out]."""
        G, out_f, in_f = self.shape_of("core")
        if G == 1:
            return route.token_rows(self.shared_mm(x, "core"))
        z = (x @ self.core.reshape(G * out_f, in_f).T).view(-1, G, out_f)  # [T, G, out]
        return z[route.token, self.expert_core[route.expert]]

    def core_on_pairs(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        """C_{g(e)} h for each sorted pair: [S, in] -> [S, out]."""
        if self.shape_of("core")[0] == 1:
            return self.shared_mm(h, "core")
        return torch.einsum("si,soi->so", h, self.core[self.expert_core[route.expert]])

    def core_reduce(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        """sum_k w_k C_{g(e_k)} h_k per token, each core once per token on a weighted sum: [S, in] -> [T, out]."""
        weighted = route.to_grid(h * route.weight.unsqueeze(-1))  # [T, K, in]
        if self.shape_of("core")[0] == 1:
            return self.shared_mm(weighted.sum(1), "core")
        core_grid = route.to_grid(self.expert_core[route.expert].unsqueeze(-1)).squeeze(-1)  # [T, K]
        one_hot = F.one_hot(core_grid, self.core.shape[0]).to(h.dtype)  # [T, K, G]
        return torch.einsum("tkg,tki,goi->to", one_hot, weighted, self.core)

    @classmethod
    def stored_params(cls, num_experts: int, out_features: int, in_features: int, rank: int, num_cores: int = 1,
                      projection: str = "up") -> int:
        """Parameters stored: G*out*in cores + E*2r*(out+in) factors (wrapped and delta alike)."""
        return num_cores * out_features * in_features + num_experts * 2 * rank * (out_features + in_features)

    def add_bias(self, y: torch.Tensor, route: Route) -> torch.Tensor:
        return y if self.bias is None else y + self.bias[route.expert]

    def expand(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """W_e x for each sorted pair, from token inputs x [T, in]."""
        return self.add_bias(self._pairs(self.core_on_tokens(x, route), route.token_rows(x), route), route)

    def pairs(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        """W_e h for each sorted pair, from pair inputs: [S, in] -> [S, out]."""
        return self.add_bias(self._pairs(self.core_on_pairs(h, route), h, route), route)


class WrappedProjection(Projection):
    """W_e = (I + U_out V_out^T) C (I + U_in V_in^T); U_out, V_out: [E, out, r]; U_in, V_in: [E, in, r]."""

    form = "wrapped"
    TENSORS = ("core", "u_out", "v_out", "u_in", "v_in")
    TRANSPOSED = frozenset({"v_out", "v_in"})

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int, num_cores: int = 1,
                 bias: bool = False, **factory):
        super().__init__(num_experts, out_features, in_features, num_cores, bias, **factory)
        self.u_out = nn.Parameter(torch.empty(num_experts, out_features, rank, **factory))
        self.v_out = nn.Parameter(torch.empty(num_experts, out_features, rank, **factory))
        self.u_in = nn.Parameter(torch.empty(num_experts, in_features, rank, **factory))
        self.v_in = nn.Parameter(torch.empty(num_experts, in_features, rank, **factory))

    @property
    def rank(self) -> int:
        return self.shape_of("u_out")[-1]

    def dense(self) -> torch.Tensor:
        """The reference: every W_e rebuilt, [E, out, in]."""
        return wrapped_weights(self.core[self.expert_core], self.u_out, self.v_out, self.u_in, self.v_in)

    def _core_u_in_t(self) -> torch.Tensor:  # (C U_in)^T: [E, r, out]
        return self._derived("core_u_in_t", (self.core, self.u_in),
                             lambda: self.core_of_experts(self.u_in, lambda C, U: (C @ U).transpose(1, 2)))

    def _core_t_v_out(self) -> torch.Tensor:  # C^T V_out: [E, in, r]
        return self._derived("core_t_v_out", (self.core, self.v_out),
                             lambda: self.core_of_experts(self.v_out, lambda C, V: C.T @ V))

    def _out_wrapper(self, z: torch.Tensor, route: Route) -> torch.Tensor:  # (I + U_out V_out^T) z
        return z + grouped_mm(grouped_mm(z, self.v_out, route), self.u_out.transpose(1, 2), route)

    def _pairs(self, core_x: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        # C (I + U_in V_in^T) x = Cx + (C U_in)(V_in^T x)
        z = core_x + grouped_mm(grouped_mm(x, self.v_in, route), self._core_u_in_t(), route)
        return self._out_wrapper(z, route)

    def reduce(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        """sum_k w_k W_{e_k} h_k per token: [S, in] -> [T, out]."""
        s = h + grouped_mm(grouped_mm(h, self.v_in, route), self.u_in.transpose(1, 2), route)  # (I + U_in V_in^T) h
        # (I + U_out V_out^T) C s = C s + U_out ((C^T V_out)^T s): the first term is summed per token before C
        low_rank = grouped_mm(grouped_mm(s, self._core_t_v_out(), route), self.u_out.transpose(1, 2), route)
        low_rank = self.add_bias(low_rank, route) * route.weight.unsqueeze(-1)
        return self.core_reduce(s, route) + route.to_tokens(low_rank)


class DeltaProjection(Projection):
    """The additive baseline of equal storage: W_e = C + U_e V_e^T; U: [E, out, 2r], V: [E, in, 2r]."""

    form = "delta"
    TENSORS = ("core", "u", "v")
    TRANSPOSED = frozenset({"v"})

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int, num_cores: int = 1,
                 bias: bool = False, **factory):
        super().__init__(num_experts, out_features, in_features, num_cores, bias, **factory)
        self.u = nn.Parameter(torch.empty(num_experts, out_features, 2 * rank, **factory))
        self.v = nn.Parameter(torch.empty(num_experts, in_features, 2 * rank, **factory))

    @property
    def rank(self) -> int:
        return self.shape_of("u")[-1] // 2

    def dense(self) -> torch.Tensor:
        return self.core[self.expert_core] + self.u @ self.v.transpose(1, 2)

    def _low_rank(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return self.expert_mm(self.expert_mm(x, "v", route), "u", route)

    def _pairs(self, core_x: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        return core_x + self._low_rank(x, route)

    def reduce(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        low_rank = self.add_bias(self._low_rank(h, route), route) * route.weight.unsqueeze(-1)
        return self.core_reduce(h, route) + route.to_tokens(low_rank)


def basis_side(projection: str) -> str:
    """The side whose basis the experts share: the one on the residual stream, the input of gate and up and the
    output of down (each expert's intermediate neurons are its own, so nothing is shared on that side)."""
    return "out" if projection == "down" else "in"


class BasisProjection(Projection):
    """W_e = C + U_e V^T with one input basis V [in, k] for all experts (shared="in"), or W_e = C + U V_e^T with one
    output basis U [out, k] (shared="out"); k is the rank. u: [E or 1, out, k], v: [1 or E, in, k].

    The shared side costs k*(in or out) once, so at equal storage k is far larger than delta's 2r, and its product
    runs once per token (V^T x before the pairs, U after the routing-weighted sum), like the core."""

    form = "basis"
    TENSORS = ("core", "u", "v")
    TRANSPOSED = frozenset({"v"})

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int, num_cores: int = 1,
                 bias: bool = False, shared: str = "in", **factory):
        super().__init__(num_experts, out_features, in_features, num_cores, bias, **factory)
        self.shared = shared
        self.u = nn.Parameter(torch.empty(1 if shared == "out" else num_experts, out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(1 if shared == "in" else num_experts, in_features, rank, **factory))

    @classmethod
    def stored_params(cls, num_experts: int, out_features: int, in_features: int, rank: int, num_cores: int = 1,
                      projection: str = "up") -> int:
        """G*out*in cores + k*(shared side + E*other side)."""
        shared, own = ((in_features, out_features) if basis_side(projection) == "in"
                       else (out_features, in_features))
        return num_cores * out_features * in_features + rank * (shared + num_experts * own)

    @property
    def rank(self) -> int:
        return self.shape_of("u")[-1]

    def dense(self) -> torch.Tensor:
        return self.core[self.expert_core] + self.u @ self.v.transpose(1, 2)  # the shared factor broadcasts

    def _pairs(self, core_x: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        if self.shared == "in":
            return core_x + self.expert_mm(self.shared_mm(x, "v"), "u", route)
        return core_x + self.shared_mm(self.expert_mm(x, "v", route), "u")

    def expand(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        if self.shared == "out":
            return super().expand(x, route)
        z = route.token_rows(self.shared_mm(x, "v"))  # V^T x once per token: [S, k]
        return self.add_bias(self.core_on_tokens(x, route) + self.expert_mm(z, "u", route), route)

    def reduce(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        weight = route.weight.unsqueeze(-1)
        if self.shared == "in":
            low_rank = self.expert_mm(self.shared_mm(h, "v"), "u", route)
            return self.core_reduce(h, route) + route.to_tokens(self.add_bias(low_rank, route) * weight)
        # sum_k w_k U V_{e_k}^T h_k = U (sum_k w_k V_{e_k}^T h_k): U once per token, on the weighted sum
        y = self.core_reduce(h, route) + self.shared_mm(route.to_tokens(self.expert_mm(h, "v", route) * weight), "u")
        if self.bias is not None:
            y = y + route.to_tokens(self.bias[route.expert] * weight)
        return y


class DenseProjection(Projection):
    """Every expert's own W_e, as the original stores it (kept fraction 1): stored as one core per expert, the form
    of pure quantization, where the experts are only quantized. Its products are per pair, as the original's."""

    form = "dense"

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int = 0, num_cores: int = 1,
                 bias: bool = False, **factory):
        super().__init__(num_experts, out_features, in_features, num_experts, bias, **factory)
        self.expert_core.copy_(torch.arange(num_experts, device=self.expert_core.device))

    @classmethod
    def stored_params(cls, num_experts: int, out_features: int, in_features: int, rank: int = 0, num_cores: int = 1,
                      projection: str = "up") -> int:
        return num_experts * out_features * in_features

    @property
    def rank(self) -> int:
        return 0

    def per_expert(self, name: str) -> bool:
        return True  # its cores are the experts' own, in expert order

    def dense(self) -> torch.Tensor:
        return self.core

    def _pairs(self, core_x: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        return core_x

    def expand(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        return self.pairs(route.token_rows(x), route)

    def core_on_pairs(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        return self.expert_mm(h, "core", route)

    def reduce(self, h: torch.Tensor, route: Route) -> torch.Tensor:
        return route.to_tokens(self.pairs(h, route) * route.weight.unsqueeze(-1))


PROJECTION_FORMS: dict[str, type[Projection]] = {"wrapped": WrappedProjection, "delta": DeltaProjection,
                                                  "basis": BasisProjection, "dense": DenseProjection}


FORM_DESCRIPTIONS = {
    "wrapped": "one shared core C and per-expert low-rank wrappers, W_e ~ (I + U_out V_out^T) C (I + U_in V_in^T)",
    "delta": "one shared core C and a per-expert low-rank term, W_e ~ C + U_e V_e^T",
    "basis": "one shared core C and per-expert factors on a basis the experts share, W_e ~ C + U_e V^T (gate, up; "
             "V shared) or C + U V_e^T (down; U shared)",
    "mixed": "one shared core C per projection, with per-expert factors on an input basis the experts share for gate "
             "and up (W_e ~ C + U_e V^T) and a per-expert low-rank term for down (W_e ~ C + U_e V_e^T)",
    "dense": "its own W_e, as the original stores it",
}


def describe_form(form: str | dict[str, str]) -> str:
    """In words, a spec's form: one for every projection, or one per projection (the mixed form's)."""
    return FORM_DESCRIPTIONS[form if isinstance(form, str) else "mixed"]


def form_of(form: str | dict[str, str], projection: str) -> str:
    """The form of `projection` under a spec's form: one form for every projection, or one per projection."""
    return form if isinstance(form, str) else form[projection]


@dataclass(frozen=True)
class ModuleSpec:
    """The shape of one compressed experts module: the form of its projections (one for all, or one per projection, as
    method=mixed has), the cores per projection and each projection's rank. A compressed folder's
    quantization_config records it as a plain dict (`to_dict`)."""

    form: str | Mapping[str, str]
    ranks: Mapping[str, int]
    num_cores: int = 1
    quant: Mapping[str, QuantFormat] | None = None  # projection -> the integer format of all its stored tensors

    def form_of(self, projection: str) -> str:
        return form_of(self.form, projection)

    def quant_of(self, projection: str) -> QuantFormat | None:
        """The integer format of the projection's stored tensors, None for floats."""
        return (self.quant or {}).get(projection)

    def to_dict(self) -> dict[str, Any]:
        form = self.form if isinstance(self.form, str) else dict(self.form)
        spec = {"form": form, "num_cores": self.num_cores, "ranks": dict(self.ranks)}
        if self.quant:
            spec["quant"] = {p: dataclasses.asdict(format) for p, format in self.quant.items()}
        return spec

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ModuleSpec:
        """A spec as a folder records it."""
        quant = {p: QuantFormat(**format) for p, format in spec["quant"].items()} if spec.get("quant") else None
        return cls(spec["form"], dict(spec["ranks"]), spec.get("num_cores", 1), quant)


def make_projection(form: str, projection: str, num_experts: int, out_features: int, in_features: int, rank: int,
                    num_cores: int = 1, bias: bool = False, quant: QuantFormat | None = None, **factory) -> Projection:
    """An unfitted projection of `form` for the expert projection named `projection` (gate, up or down); with `quant`,
    its tensors as empty integer storage in that format, to load saved codes and scales into."""
    extra = {"shared": basis_side(projection)} if form == "basis" else {}
    proj = PROJECTION_FORMS[form](num_experts, out_features, in_features, rank, num_cores, bias, **extra, **factory)
    for tensor in proj.TENSORS if quant is not None else ():
        proj.empty_quantized_(tensor, quant)
    return proj


def _shadows_into_codes(module: Projection, state: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post hook of a projection trained quantization-aware: the shadows' codes into the integer storage
    (the module's and the state's), the shadows themselves left out."""
    for name in module.stored:
        shadow = state.pop(prefix + name, None)
        if shadow is not None:
            state[prefix + f"{name}_packed"] = module.write_codes(name, shadow)


def _shadows_expected(module: Projection, state: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre hook: a checkpoint holds no shadows (the post hook sets them from its codes), so that they
    are not reported missing."""
    for name in module.stored:
        if name in module._parameters:
            state.setdefault(prefix + name, module._parameters[name].detach())


def _codes_into_shadows(module: Projection, incompatible: Any) -> None:
    """load_state_dict post hook: the shadows from the integer storage just loaded (a checkpoint resumed)."""
    with torch.no_grad():
        for name in module.stored:
            if name in module._parameters:
                module._parameters[name].copy_(module.dequantized(name))


@contextmanager
def dequantized_once(projections, route: Route) -> Iterator[None]:
    """Within the block, each quantized tensor is dequantized once, at its first read, and the float copies are
    dropped at its end: a forward reads a core several times, and resident memory stays the integer storage. Per-expert
    tensors are dequantized for the experts of `route` alone."""
    projections = [proj for proj in projections if proj.stored]  # float ones have nothing to dequantize
    if not projections:  # (and setting a module's attributes costs a decoding step about 5 us each)
        yield
        return
    routed = route.routed_experts()
    for proj in projections:
        proj._memo, proj._routed = {}, routed
    try:
        yield
    finally:
        for proj in projections:
            proj._memo = proj._routed = None


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """`model` (in eval mode) laid out for inference on the CPU, in place: in every compressed experts module, the
    shared float tensors in oneDNN's layout, the per-expert ones as embedding_bag's tables and the 4-bit ones in
    torch's int4 kernel's, in their stead (Projection.pack_for_cpu_, cpu_matmul). Decoding then runs about twice as
    fast (bf16), and the 4-bit per-expert factors, which unpacked are dequantized at each forward, through the
    kernel; training and saving the packed model are refused or meaningless: load it again for them. What the vLLM
    plugin does with each layer it loads."""
    for module in model.modules():
        if isinstance(module, Projection):
            module.pack_for_cpu_()
    return model


class SharedCoreExperts(nn.Module):
    """Replaces a transformers experts module (same forward signature) with shared-core projections.

    `projections` holds "gate", "up" (or "up" alone for ungated experts) and "down". The original module, stripped of
    its weights, is kept as a template: its gating function, activation and layout flags define the math, and the
    reference path rebuilds it with dense weights to run transformers' own code.
    """

    def __init__(self, template: nn.Module, projections: dict[str, Projection]):
        super().__init__()
        self.__dict__["template"] = template  # a plain attribute: no weights, and not a submodule to save or move
        self.projections = nn.ModuleDict(projections)
        self.act_fn = getattr(template, "act_fn", None)
        # transformers before 5.20 has no post-expert norms and no flag for them
        self.post_expert_norm = template.post_expert_norm if getattr(template, "has_post_expert_norm", False) else None
        self.num_experts = projections["down"].num_experts
        self.has_gate = template.has_gate

    @classmethod
    def empty(cls, experts: nn.Module, spec: ModuleSpec) -> SharedCoreExperts:
        """An unfitted replacement for `experts`, shaped by `spec`; its parameters take the experts' dtype and device
        (meta while transformers loads a checkpoint)."""
        parts = split_weights(experts)
        projections = {}
        for name in projection_names(experts):
            W, bias = parts[name]
            projections[name] = make_projection(spec.form_of(name), name, *W.shape, spec.ranks[name], spec.num_cores,
                                                bias is not None, spec.quant_of(name), dtype=W.dtype, device=W.device)
        return cls(cls.from_template(experts), projections).train(experts.training)

    @staticmethod
    def from_template(experts: nn.Module) -> nn.Module:
        """A weightless copy of an experts module, kept as the template of its replacement."""
        template = copy.copy(experts)
        template._parameters = {}
        template._buffers = {}
        template._modules = dict(experts._modules)
        return template

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        route = Route.build(top_k_index, top_k_weights.to(hidden_states.dtype), self.num_experts)
        with dequantized_once(self.projections.values(), route):
            return self._forward(hidden_states, route)

    def _forward(self, hidden_states: torch.Tensor, route: Route):
        p, x = self.projections, hidden_states
        if self.has_gate:
            h = apply_gate(self.template, p["gate"].expand(x, route), p["up"].expand(x, route))
        else:
            h = self.act_fn(p["up"].expand(x, route))
        if self.post_expert_norm is None:
            return p["down"].reduce(h, route).to(hidden_states.dtype)
        y = self.post_expert_norm(p["down"].pairs(h, route))  # the norm is per expert, so the down core is per pair
        return route.to_tokens(y * route.weight.unsqueeze(-1)).to(hidden_states.dtype)

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The original module's weights rebuilt from the cores and factors, in its own layout."""
        return join_weights(self.template, {name: (p.dense(), p.bias) for name, p in self.projections.items()})

    def to_dense(self) -> nn.Module:
        """The original experts module, with every W_e rebuilt: the reference path."""
        dense = copy.copy(self.template)
        dense._parameters = {}
        dense._modules = dict(self.template._modules)
        for name, value in self.dense_state().items():
            dense.register_parameter(name, nn.Parameter(value.detach().clone()))
        if self.post_expert_norm is not None:
            dense._modules["post_expert_norm"] = self.post_expert_norm
        return dense

    def reference_forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """Transformers' own eager experts code on the rebuilt dense weights."""
        dense = self.to_dense()
        eager = type(dense).forward.__wrapped__
        return eager(dense, hidden_states, top_k_index, top_k_weights)
