"""A compressed experts module as vLLM holds it: parameter names, checkpoint names, and the forward on routed tokens.

This is the part of the vLLM plugin (moe_compress.serving.vllm_plugin) that needs no vLLM, so that the main test suite checks
it against SharedCoreExperts. vLLM owns an MoE layer's parameters (its `RoutedExperts`), loads them by name and routes
the tokens; the plugin registers our projections' parameters on that layer, under vLLM's names, and runs the same
algebra as SharedCoreExperts on vLLM's routing (cores once per token, rank-r work per routed pair).

Names. vLLM's experts loader accepts only checkpoint names with an expert index,
`<layer>.<e>.<gate|up|down ckpt name>.<suffix>`, and looks up `w13_<suffix>` (gate, up) or `w2_<suffix>` (down) on
the layer. Our tensors are stacked over experts (factors) or have no expert at all (cores, expert -> core map), so each
is renamed onto expert 0, with the projection in the suffix, and the plugin's loader takes the whole stacked tensor:

    model.layers.0.mlp.experts.projections.gate.u_in  ->  model.layers.0.mlp.experts.0.gate_proj.gate_u_in
                                                      ->  (vLLM) parameter w13_gate_u_in of that layer

Shapes: E experts, T tokens, K active experts per token, H hidden, F expert width.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_compress.experts import ModuleSpec, Projection, Route, dequantized_once, make_projection

SUPPORTED_FORMS = ("wrapped", "delta", "basis", "dense")
# vLLM's shard ids: w1 gate, w3 up (both in w13), w2 down; an ungated experts module's up projection is vLLM's w1
SHARD = {"gate": "w1", "up": "w3", "down": "w2"}
# vLLM's MoE activations (MoEActivation values) in plain torch: gated ones multiply by up, "_no_mul" ones do not
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def layer_param_name(projection: str, tensor: str) -> str:
    """The name vLLM's loader looks up on the layer for one of our tensors: w13_gate_core, w2_down_u_in, ..."""
    return f"{'w2' if projection == 'down' else 'w13'}_{projection}_{tensor}"


def checkpoint_renames(gate: str = "gate_proj", down: str = "down_proj", up: str | None = "up_proj"
                       ) -> dict[re.Pattern, str]:
    """Regex renames (for vLLM's WeightsMapper) of our saved names onto expert 0 of vLLM's experts names, given the
    model's checkpoint projection names (vLLM's RoutedExperts.ckpt_*_proj_name; up is None for ungated experts)."""
    ckpt = {"gate": gate, "up": up if up is not None else gate, "down": down}
    return {re.compile(rf"\.projections\.{p}\.(\w+)$"): rf".0.{ckpt[p]}.{p}_\1" for p in SHARD}


def new_projections(spec: ModuleSpec, num_experts: int, hidden: int, intermediate: int, activation: str, bias: bool,
                    dtype: torch.dtype, where: str) -> dict[str, Projection]:
    """Empty projections of an experts module of `spec` with vLLM's `activation`
    (a MoEActivation value), in eval mode and without gradients. `where` names the module in the errors raised for
    what we cannot serve."""
    if activation.removesuffix("_no_mul") not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not served by moe-compress's vLLM plugin (it serves "
                         f"{', '.join(ACTIVATIONS)}, gated or _no_mul); serve a dense copy (`moe-compress export`)")
    form = spec.form
    if not {spec.form_of(p) for p in spec.ranks} <= set(SUPPORTED_FORMS):
        raise ValueError(f"{where}: form {form!r} cannot be served by moe-compress's vLLM plugin (it serves "
                         f"{', '.join(SUPPORTED_FORMS)}); serve a dense copy (`moe-compress export`) instead")
    shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    names = ("up", "down") if activation.endswith("_no_mul") else ("gate", "up", "down")
    if set(spec.ranks) != set(names):
        raise ValueError(f"{where}: the folder has projections {sorted(spec.ranks)}, vLLM's layer "
                         f"{sorted(names)}; check that the folder was compressed from this architecture")
    projections = {}
    for name in names:
        proj = make_projection(spec.form_of(name), name, num_experts, *shapes[name], spec.ranks[name],
                               spec.num_cores, bias, spec.quant_of(name), dtype=dtype)
        projections[name] = proj.eval().requires_grad_(False)
    return projections


def layer_tensors(projections: dict[str, Projection]) -> dict[str, torch.Tensor]:
    """Every tensor of the projections (parameters and the expert -> core map) by the name vLLM gives it."""
    return {layer_param_name(name, tensor): value for name, proj in projections.items()
            for tensor, value in [*proj.named_parameters(), *proj.named_buffers()]}


def routed_forward(projections: dict[str, Projection], activation: str, x: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k w_k W_down,e_k act(W_gate,e_k x) * (W_up,e_k x) for tokens x [T, H] routed to topk_ids [T, K] with
    topk_weights [T, K]: [T, H]. The same algebra as SharedCoreExperts.forward (each core once per token)."""
    gated = not activation.endswith("_no_mul")
    act = ACTIVATIONS[activation.removesuffix("_no_mul")]
    route = Route.build(topk_ids.long(), topk_weights.to(x.dtype), projections["down"].num_experts)
    with dequantized_once(projections.values(), route):  # integer storage: each tensor dequantized once per forward
        return _routed(projections, gated, act, x, route)


def _routed(projections: dict[str, Projection], gated: bool, act: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor, route: Route) -> torch.Tensor:
    down = projections["down"]
    up = projections["up"].expand(x, route)  # [S, F]
    h = act(projections["gate"].expand(x, route)) * up if gated else act(up)
    return down.reduce(h, route).to(x.dtype)
