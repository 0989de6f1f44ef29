"""Calibration statistics of an experts module: what each expert's inputs look like, for fits in that metric.

The error that matters is the one on the inputs an expert actually sees, sum over tokens routed to e of
||g (W_e - What_e) x||^2 = tr((W_e - What_e) M_e (W_e - What_e)^T), with g the routing weight. So per expert:

    M_e  = sum over tokens routed to e of g^2 x x^T      [H, H]  gate and up read the hidden state x
    M'_e = sum over tokens routed to e of g^2 h h^T      [F, F]  down reads h = act(gate x) * (up x)
    n_e  = number of tokens routed to e

accumulated in fp32 (an unnormalised sum: routing frequency is in it already) and saved packed in bf16 (`pack`).
`metric()` regularises them for the fit: every expert gets `shrink * d` pseudo-tokens of the layer-wide Gram (the sum
over all routed tokens, per token), which keeps rarely routed experts well posed and gives an expert with no tokens the
layer-wide statistics; then a damping of `damp` times the mean diagonal, as GPTQ does, but far stronger: on both
bundled testbeds the held-out loss is lowest near damp = 1 (half way to the data-free metric), and GPTQ's 0.01 fits
the calibration tokens' directions so closely that at kept 0.5 the upcycled testbed lost more than data-free.

Shapes: E experts, T tokens, K active experts per token, H hidden, F expert width, d an input size (H or F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_compress.calibration.observe import RoutingCounts
from moe_compress.discovery import split_weights
from moe_compress.experts import apply_gate


@dataclass(frozen=True)
class Regularisation:
    shrink: float = 1.0  # pseudo-tokens of the layer-wide Gram per input dimension
    damp: float = 1.0  # times the mean diagonal, added to it

    def __post_init__(self):
        if self.shrink < 0 or self.damp <= 0:
            raise ValueError(f"shrink={self.shrink} must be >= 0 and damp={self.damp} > 0 (a positive damping keeps "
                             "every metric invertible)")


class ExpertGrams(RoutingCounts):
    """Observer (calibration.observe) of one experts module: the routed-input Grams of each expert, for gate/up and
    for down, and the tokens routed to it."""

    def __init__(self, experts: nn.Module, parts: dict | None = None, keep_inputs: int = 0,
                 keep_outputs: bool = False, device: torch.device | str | None = None):
        """`parts`: the module's split_weights when its own parameters are elsewhere (offloaded, read from disk);
        `keep_inputs`: how many of the first tokens' inputs to keep as they are (`block_inputs`), for the layer-wise
        reconstruction, with their MoE block's outputs (`block_outputs`, its targets), and with `keep_outputs` their
        decoder layer's outputs too (`layer_outputs`); the outputs are given by the layer-by-layer pass. `device`:
        where the layer runs, which the Grams and the weights their intermediate activations need are moved to
        (default: where the weights are)."""
        parts = split_weights(experts) if parts is None else parts
        self.gated = "gate" in parts
        E, F, H = parts["up"][0].shape
        device = parts["up"][0].device if device is None else torch.device(device)
        self.tokens = torch.zeros(E, dtype=torch.long, device=device)  # [E]
        self.inputs = torch.zeros(E, H, H, device=device)  # [E, H, H]
        self.intermediate = torch.zeros(E, F, F, device=device)  # [E, F, F]
        self.weights = {name: (W.detach().to(device), None if b is None else b.detach().to(device))
                        for name, (W, b) in parts.items() if name != "down"}
        self.keep_inputs = keep_inputs
        self.kept: list[torch.Tensor] = []  # [T_i, H] fp32, the first keep_inputs tokens in calibration order
        self.kept_outputs: list[torch.Tensor] = []  # [T_i, H] fp32, their MoE block's outputs
        self.keep_outputs = keep_outputs
        self.layer_outputs: torch.Tensor | None = None  # [N, H] fp32, their decoder layer's outputs

    def observe_layer(self, outputs: list[torch.Tensor]) -> None:
        """The decoder layer's outputs on the calibration batches ([B, L, H] each), of the tokens whose inputs are
        kept."""
        if self.keep_outputs and self.kept:
            tokens = sum(len(x) for x in self.kept)
            self.layer_outputs = torch.cat([y.reshape(-1, y.shape[-1]) for y in outputs])[:tokens].float()

    def observe_block(self, output: torch.Tensor) -> None:
        """The MoE block's output hidden states on one batch, of the tokens whose inputs are kept: the original
        block's outputs on them, which the reconstruction would otherwise compute again."""
        self._keep_first(self.kept_outputs, output.reshape(-1, output.shape[-1]))

    def _keep_first(self, kept: list[torch.Tensor], rows: torch.Tensor) -> None:
        """Append to `kept` as many of `rows` [T, H] (in fp32) as keep it within the first keep_inputs tokens."""
        room = self.keep_inputs - sum(len(part) for part in kept)
        if room > 0:
            kept.append(rows[:room].float().clone())

    @property
    def block_inputs(self) -> torch.Tensor | None:
        """The kept inputs of the experts module (its block's, flattened): [N, H] fp32; None when none are kept."""
        return torch.cat(self.kept) if self.kept else None

    @property
    def block_outputs(self) -> torch.Tensor | None:
        """Their MoE block's outputs [N, H] fp32; None when none were observed (statistics saved without them)."""
        return torch.cat(self.kept_outputs) if self.kept_outputs else None

    def state(self) -> dict[str, torch.Tensor]:
        """The statistics in their saved form: the Grams packed (see `pack`), and the kept inputs and outputs."""
        kept = {key: value for key, value in (("block_inputs", self.block_inputs),
                                              ("block_outputs", self.block_outputs)) if value is not None}
        return {"tokens": self.tokens, "inputs": pack(self.inputs), "intermediate": pack(self.intermediate), **kept}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ExpertGrams:
        """Saved statistics, for the fits (no observing: the weights are not kept); full fp32 [E, d, d] Grams, as
        saved before they were packed, load as they are."""
        grams = cls.__new__(cls)
        grams.tokens = state["tokens"]
        grams.kept = [state["block_inputs"]] if "block_inputs" in state else []
        grams.kept_outputs = [state["block_outputs"]] if "block_outputs" in state else []
        grams.keep_inputs = sum(len(x) for x in grams.kept)
        grams.keep_outputs, grams.layer_outputs = False, None
        grams.inputs, grams.intermediate = (unpack(state[key]) if state[key].dim() == 2 else state[key].float()
                                            for key in ("inputs", "intermediate"))
        return grams

    def _intermediate(self, experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
        """h = act(gate x) * (up x) of expert e on x [T_e, H], with the module's own gating: [T_e, F]."""
        def project(name: str) -> torch.Tensor:
            W, b = self.weights[name]
            y = x @ W[e].T.to(x.dtype)  # in the dtype the layer runs in (layerwise.compute_dtype)
            return y if b is None else y + b[e]
        h = apply_gate(experts, project("gate"), project("up")) if self.gated else experts.act_fn(project("up"))
        return h.float()

    @torch.no_grad()
    def __call__(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> None:
        super().__call__(experts, hidden_states, top_k_index, top_k_weights)
        self.__dict__.pop("_last_metric", None)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        self._keep_first(self.kept, x)
        for e in top_k_index.unique().tolist():
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            g = top_k_weights[token, slot].float().unsqueeze(1)  # [T_e, 1]
            x_e = x[token]
            gx = g * x_e.float()
            self.inputs[e] += gx.T @ gx
            gh = g * self._intermediate(experts, x_e, e)
            self.intermediate[e] += gh.T @ gh

    def gram(self, projection: str) -> torch.Tensor:
        return self.intermediate if projection == "down" else self.inputs

    def metric(self, projection: str, regularisation: Regularisation = Regularisation()) -> torch.Tensor:
        """The regularised metric of every expert for `projection`: [E, d, d], fp32. Gate and up share theirs: the
        last one made is kept until the statistics change."""
        key = ("down" if projection == "down" else "inputs", regularisation)
        if self.__dict__.get("_last_metric", (None,))[0] != key:
            self._last_metric = key, regularised(self.gram(projection), self.tokens, regularisation)
        return self._last_metric[1]

    def starved(self) -> list[int]:
        """Experts that received fewer tokens than their input size: their own statistics cannot be full rank."""
        return [e for e, n in enumerate(self.tokens.tolist()) if n < self.inputs.shape[-1]]


def regularised(gram: torch.Tensor, tokens: torch.Tensor, regularisation: Regularisation) -> torch.Tensor:
    """M_e + shrink * d * (sum_e M_e / sum_e n_e), then + damp * mean diag * I; computed in fp64 one expert at a time
    (the whole [E, d, d] in fp64 is twice the statistics' size, and its passes over fresh memory took 4 s a module of
    128 experts with d = 1024, more than the fit)."""
    E, d, _ = gram.shape
    layer = torch.zeros(d, d, dtype=torch.float64, device=gram.device)
    for M_e in gram:  # gram.sum(0, dtype=float64) casts the whole [E, d, d] to fp64 first: 1 GiB at E = 128, d = 1024
        layer += M_e
    layer /= tokens.sum().clamp_min(1)  # the layer-wide Gram, per routed token
    # an expert with no tokens and no shrinkage would have no scale at all: it takes the layer's
    fallback = layer.diagonal().mean().clamp_min(1e-12)
    metric = torch.empty_like(gram, dtype=torch.float32)  # [E, d, d]
    for e in range(E):
        M = gram[e].double().add_(layer, alpha=regularisation.shrink * d)  # [d, d]
        diagonal = M.diagonal().mean()
        M.diagonal().add_(regularisation.damp * torch.where(diagonal > 0, diagonal, fallback))
        metric[e] = M
    return metric


# Saved Grams keep the upper triangle of each (they are symmetric) in bf16: 2/(d + 1) of fp32 [E, d, d], about a
# quarter (at Qwen3-30B-A3B's shape 0.57 GiB a layer instead of 2.3). bf16, not fp16: Grams are unnormalised sums
# (testbed_fine's largest entry is 4.8e5, past fp16's 65504), and the damping (1 x the mean diagonal) drowns bf16's
# rounding. Measured on testbed_fine (64 calibration windows of 256 bytes; als and delta at kept 0.3 and 0.5, against
# fits on the exact fp32 Grams): the relative error on the routed inputs (exact metric) moves by at most 4.5e-7 (it is
# 0.27-0.45), the held-out loss increase by at most 1.0e-4 nats/byte (0.05-0.44), the fitted weights by 0.2-0.6%.
STORED_DTYPE = torch.bfloat16


def _upper(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the upper triangle's entries sit in a flattened [d, d], row by row, and where their mirror images do."""
    i, j = torch.triu_indices(d, d, device=device)
    return i * d + j, j * d + i


def pack(gram: torch.Tensor) -> torch.Tensor:
    """[E, d, d] symmetric -> [E, d(d+1)/2]: the upper triangle, row by row, in STORED_DTYPE."""
    E, d, _ = gram.shape
    upper, _ = _upper(d, gram.device)
    packed = torch.empty(E, upper.numel(), dtype=STORED_DTYPE, device=gram.device)
    for e in range(E):  # one expert at a time: no fp32 temporary of the whole packed tensor
        packed[e] = gram[e].flatten().index_select(0, upper)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[E, d(d+1)/2] -> [E, d, d] fp32, both triangles set to the packed values."""
    E, n = packed.shape
    d = (math.isqrt(8 * n + 1) - 1) // 2
    upper, lower = _upper(d, packed.device)
    gram = torch.empty(E, d * d, device=packed.device)
    for e in range(E):
        values = packed[e].float()
        gram[e].index_copy_(0, lower, values).index_copy_(0, upper, values)
    return gram.view(E, d, d)
