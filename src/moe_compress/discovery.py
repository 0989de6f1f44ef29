"""Finding experts modules through transformers' unified experts interface, and reading and writing their weights.

transformers' `use_experts_implementation` decorator gives every MoE experts class the same shape: 3-D `gate_up_proj`
(or `up_proj` when `has_gate` is false) and `down_proj` parameters, with flags `has_gate`, `has_bias`,
`is_transposed`, `is_concatenated`. We find experts by that interface, never by per-model names.
"""

from __future__ import annotations

import torch
from torch import nn

INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
LOOKED_FOR = (
    "modules built with transformers' use_experts_implementation (3-D gate_up_proj or up_proj and down_proj "
    "parameters with has_gate/is_transposed flags)"
)


class NoExpertsError(ValueError):
    pass


def is_experts_module(module: nn.Module) -> bool:
    if not all(hasattr(module, flag) for flag in INTERFACE_FLAGS):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every experts module of the model, by qualified name; a clear error when there is none."""
    found = [(name, module) for name, module in model.named_modules() if is_experts_module(module)]
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoExpertsError(
            f"no experts found in this {model_type} model: looked for {LOOKED_FOR}; "
            "pass a Mixture-of-Experts model (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, ...)"
        )
    return found


def projection_names(experts: nn.Module) -> tuple[str, ...]:
    return ("gate", "up", "down") if experts.has_gate else ("up", "down")


def _as_out_in(weight: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    return weight.transpose(1, 2) if is_transposed else weight  # [E, out, in]


def _split_fused(t: torch.Tensor, concatenated: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if concatenated:
        return t.chunk(2, dim=dim)
    index = [slice(None)] * t.dim()
    gate, up = list(index), list(index)
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return t[tuple(gate)], t[tuple(up)]


def split_weights(experts: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{projection: (W [E, out, in], bias [E, out] or None)}; a fused gate_up is split into its gate and up halves."""
    bias = (lambda name: getattr(experts, f"{name}_bias")) if experts.has_bias else (lambda name: None)
    down = (_as_out_in(experts.down_proj, experts.is_transposed), bias("down_proj"))
    if not experts.has_gate:
        return {"up": (_as_out_in(experts.up_proj, experts.is_transposed), bias("up_proj")), "down": down}
    gate_w, up_w = _split_fused(_as_out_in(experts.gate_up_proj, experts.is_transposed), experts.is_concatenated, 1)
    gate_b, up_b = _split_fused(bias("gate_up_proj"), experts.is_concatenated, 1) if experts.has_bias else (None, None)
    return {"gate": (gate_w, gate_b), "up": (up_w, up_b), "down": down}


def _join_fused(gate: torch.Tensor, up: torch.Tensor, concatenated: bool, dim: int) -> torch.Tensor:
    if concatenated:
        return torch.cat([gate, up], dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def join_weights(template: nn.Module, parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict:
    """The inverse of split_weights: parameter name -> tensor in the experts module's own layout."""
    layout = (lambda w: w.transpose(1, 2)) if template.is_transposed else (lambda w: w)
    out = {"down_proj": layout(parts["down"][0])}
    if template.has_bias:
        out["down_proj_bias"] = parts["down"][1]
    if not template.has_gate:
        out["up_proj"] = layout(parts["up"][0])
        if template.has_bias:
            out["up_proj_bias"] = parts["up"][1]
        return out
    (gate_w, gate_b), (up_w, up_b) = parts["gate"], parts["up"]
    out["gate_up_proj"] = layout(_join_fused(gate_w, up_w, template.is_concatenated, 1))
    if template.has_bias:
        out["gate_up_proj_bias"] = _join_fused(gate_b, up_b, template.is_concatenated, 1)
    return out
