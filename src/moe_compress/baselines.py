"""The peer methods we compare against: expert pruning and expert merging.

Both read calibration tokens, act in place, and keep E' = floor(kept_fraction * E) experts' worth of parameters in
every experts module, so that they stand beside compress() at equal kept fraction of expert parameters:

    prune_experts(model, token_ids, 0.5)   REAP (Lasby et al., 2025): drop the least salient experts
    merge_experts(model, token_ids, 0.5)   HC-SMoE (Chen et al., 2024): cluster the experts, average each cluster

Shapes: E experts, E' kept experts or clusters, T tokens, K active experts per token, H hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_compress.calibration.observe import Calibration, RoutingCounts, observe
from moe_compress.discovery import find_experts, split_weights

# Routers whose choice is a function of their per-expert logits W_r x (+ b) alone (softmax then top-k, or top-k then
# softmax): removing rows of W_r removes those experts from the choice and renormalises over the survivors.
PRUNABLE_ROUTERS = {
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "MixtralTopKRouter": "mixtral",
    "OlmoeTopKRouter": "olmoe",
    "GptOssTopKRouter": "gpt_oss",
    "GraniteMoeTopKRouter": "granitemoe",
}
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


class MergedExperts(nn.Module):
    """Experts of which several share one merged expert: `inner` is a transformers experts module holding the E'
    merged experts, `expert_map` [E] sends each original expert to its merged one.

    forward(x, top_k_index, top_k_weights) = inner(x, expert_map[top_k_index], top_k_weights): the router is unchanged,
    and a token that selects two experts of one cluster gets that merged expert once, with their weights added.
    """

    def __init__(self, inner: nn.Module, expert_map: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("expert_map", expert_map)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.inner(hidden_states, self.expert_map[top_k_index], top_k_weights)


def expert_outputs(experts: nn.Module, hidden_states: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """f_{expert[t]}(x_t) for every token, in fp32: [T, H]. The experts module's own forward, routed to one expert per
    token with weight 1, so that its gating, biases and layout are those of the model."""
    weights = hidden_states.new_ones(expert.shape[0], 1)
    return experts.forward(hidden_states, expert.unsqueeze(1), weights).float()


class ReapSaliency(RoutingCounts):
    """REAP's saliency: S_e = (1 / |X_e|) sum_{x in X_e} g_e(x) ||f_e(x)||_2, X_e the tokens routed to expert e,
    g_e(x) the routing weight the experts module receives; S_e = 0 for an expert no token reached."""

    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.weighted_norms = torch.zeros(self.tokens.shape, dtype=torch.float64, device=self.tokens.device)  # [E]

    def __call__(self, experts, hidden_states, top_k_index, top_k_weights) -> None:
        super().__call__(experts, hidden_states, top_k_index, top_k_weights)
        for k in range(top_k_index.shape[1]):
            norms = expert_outputs(experts, hidden_states, top_k_index[:, k]).norm(dim=-1)  # [T]
            self.weighted_norms.index_add_(0, top_k_index[:, k], (top_k_weights[:, k].float() * norms).double())

    @property
    def saliency(self) -> torch.Tensor:
        return self.weighted_norms / self.tokens.clamp(min=1)


class MeanOutputs(RoutingCounts):
    """HC-SMoE's feature of expert e: its output averaged over all calibration tokens, routed to it or not,
    mean_e = (1 / T) sum_x f_e(x); and the routing counts, for the frequency-weighted merge."""

    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        hidden = split_weights(experts)["down"][0].shape[1]
        self.output_sums = torch.zeros(self.tokens.numel(), hidden, dtype=torch.float64, device=self.tokens.device)
        self.seen = 0

    def __call__(self, experts, hidden_states, top_k_index, top_k_weights) -> None:
        super().__call__(experts, hidden_states, top_k_index, top_k_weights)
        for e in range(self.tokens.numel()):
            expert = torch.full_like(top_k_index[:, 0], e)
            self.output_sums[e] += expert_outputs(experts, hidden_states, expert).sum(0).double()
        self.seen += hidden_states.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.output_sums / max(self.seen, 1)


def kept_count(num_experts: int, kept_fraction: float, name: str, at_least: int = 1) -> int:
    """E' = floor(kept_fraction * E): the most experts whose storage stays within the budget, as compress's ranks do;
    refused below `at_least`."""
    kept = math.floor(kept_fraction * num_experts + 1e-9)  # 0.3 * 10 is 2.9999999999999996 in floating point
    if kept < at_least:
        why = "no expert" if at_least == 1 else f"fewer than the {at_least} each token is routed to"
        raise ValueError(
            f"kept_fraction {kept_fraction} keeps {kept} of the {num_experts} experts of {name}, {why}; "
            f"use kept_fraction >= {at_least / num_experts:.4g}"
        )
    return kept


def _check_kept_fraction(kept_fraction: float) -> None:
    if not isinstance(kept_fraction, (int, float)) or not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction={kept_fraction!r} is not a kept fraction of experts; use a value in (0, 1]")


def _experts_to_change(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if any(isinstance(m, MergedExperts) for m in model.modules()):
        raise ValueError("this model's experts are already merged; prune or merge the original model instead")
    found = find_experts(model)
    for name, experts in found:
        for pname, p in experts.named_parameters(recurse=False):
            if p.shape[0] != experts.num_experts:
                raise ValueError(f"{name}.{pname} has shape {tuple(p.shape)}, not one row per expert "
                                 f"(E={experts.num_experts}); this experts layout is not supported")
    return found


def _router(model: nn.Module, name: str, experts: nn.Module) -> nn.Module:
    """The module beside the experts holding a 2-D weight with one row per expert, if its routing is prunable."""
    block = model.get_submodule(name.rpartition(".")[0])
    found = [m for m in block.children() if m is not experts and isinstance(getattr(m, "weight", None), torch.Tensor)
             and m.weight.dim() == 2 and m.weight.shape[0] == experts.num_experts]
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if len(found) != 1 or type(found[0]).__name__ not in PRUNABLE_ROUTERS:
        router = type(found[0]).__name__ if len(found) == 1 else f"{len(found)} router candidates"
        raise ValueError(
            f"prune_experts does not support {model_type} ({router} beside {name}): removing experts needs a router "
            f"that chooses by per-expert logits alone; supported: {', '.join(PRUNABLE_ROUTERS.values())}; "
            "merge_experts works with any architecture"
        )
    return found[0]


def _per_expert_rows(module: nn.Module, num_experts: int, fn) -> None:
    """Replace each parameter and buffer of `module` with one row per expert ([E, ...]) by fn(it) ([E', ...])."""
    with torch.no_grad():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] == num_experts:
                module._parameters[name] = nn.Parameter(fn(p), requires_grad=p.requires_grad)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.dim() > 0 and b.shape[0] == num_experts:
                module._buffers[name] = fn(b)


def _set_expert_count(holders: list, before: int, after: int) -> None:
    for holder in holders:
        for attr in EXPERT_COUNT_ATTRS:
            if getattr(holder, attr, None) == before:
                setattr(holder, attr, after)


def _expert_params(found: list[tuple[str, nn.Module]]) -> int:
    return sum(p.numel() for _, experts in found for p in experts.parameters(recurse=False))


def prune_experts(model: nn.Module, calibration: Calibration, kept_fraction: float, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """REAP expert pruning, in place: in every experts module keep the E' = floor(kept_fraction * E) experts of
    largest saliency

        S_e = mean over calibration tokens x routed to e of g_e(x) ||f_e(x)||_2

    (g_e(x) the routing weight, f_e(x) the expert's output) and remove the others from the experts module and from the
    router, whose softmax and top-k then renormalise over the survivors (E' must be at least the router's top-k).
    model.config's expert count follows, so save_pretrained / from_pretrained round trip.

    `calibration`: token ids [N, L], or an iterable of batches of them. Returns the report: per experts module the
    kept experts (original indices), every expert's saliency and routed-token count.
    """
    _check_kept_fraction(kept_fraction)
    found = _experts_to_change(model)
    routers = {name: _router(model, name, experts) for name, experts in found}
    kept = {name: kept_count(experts.num_experts, kept_fraction, name, at_least=routers[name].top_k)
            for name, experts in found}
    params_before = _expert_params(found)
    stats = observe(model, calibration, ReapSaliency, batch_size, progress)
    layers = {}
    for name, experts in found:
        E, saliency = experts.num_experts, stats[name].saliency
        keep = torch.sort(torch.argsort(saliency, descending=True, stable=True)[: kept[name]]).values
        router = routers[name]
        block = model.get_submodule(name.rpartition(".")[0])
        for module in (experts, router):
            _per_expert_rows(module, E, lambda t: t[keep.to(t.device)])
        _set_expert_count([experts, router, block, model.config, model.config.get_text_config()], E, kept[name])
        layers[name] = {"kept": keep.tolist(), "saliency": saliency.tolist(), "tokens": stats[name].tokens.tolist()}
    return {"method": "reap", "kept_fraction": kept_fraction, "params_before": params_before,
            "params_after": _expert_params(found), "layers": layers}


def average_linkage(features: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Agglomerative clustering of the rows of `features` [E, D] into `num_clusters`: from singletons, repeatedly join
    the two clusters A, B of smallest average linkage

        d(A, B) = (1 / |A| |B|) sum_{a in A, b in B} ||x_a - x_b||_2

    Returns the cluster of each row [E], clusters numbered by their smallest member; ties join the first pair."""
    x = features.double()
    D = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [E, E]
    members = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)  # [C, E]: row c marks cluster c's members
    while members.shape[0] > num_clusters:
        sizes = members.sum(1)
        linkage = (members @ D @ members.T) / torch.outer(sizes, sizes)  # [C, C]
        linkage.fill_diagonal_(float("inf"))
        a, b = divmod(int(torch.argmin(linkage)), members.shape[0])
        a, b = min(a, b), max(a, b)
        # rows stay ordered by their smallest member: b joins a (a < b), row b goes
        members[a] += members[b]
        members = torch.cat([members[:b], members[b + 1:]])
    return members.argmax(0)


def merge_matrix(clusters: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """M [E', E] with W'_c = sum_e M[c, e] W_e: M[c, e] = n_e / sum_{e' in c} n_e' for e in cluster c (n_e the
    routed-token count), the plain mean 1 / |c| for a cluster no token reached."""
    member = F.one_hot(clusters, int(clusters.max()) + 1).T.double()  # [E', E]
    weighted = member * tokens.double()
    mass = weighted.sum(1, keepdim=True)
    return torch.where(mass > 0, weighted / mass.clamp(min=1), member / member.sum(1, keepdim=True))


def merge_experts(model: nn.Module, calibration: Calibration, kept_fraction: float, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """HC-SMoE expert merging, in place: in every experts module cluster the E experts into E' =
    floor(kept_fraction * E) groups by average-linkage hierarchical clustering (euclidean) of their mean outputs over
    all calibration tokens, mean_e = (1 / T) sum_x f_e(x); merge each cluster c into one expert by the routing-frequency
    weighted average

        W'_c = sum_{e in c} n_e W_e / sum_{e in c} n_e     (every weight and bias; the plain mean if no n_e > 0)

    and replace the experts module by MergedExperts, which sends each expert's tokens to its cluster's merged expert.
    The router is unchanged. Saving the merged model as a folder is not supported.

    `calibration`: token ids [N, L], or an iterable of batches of them. Returns the report: per experts module the
    clusters (lists of original experts) and every expert's routed-token count.
    """
    _check_kept_fraction(kept_fraction)
    found = _experts_to_change(model)
    kept = {name: kept_count(experts.num_experts, kept_fraction, name) for name, experts in found}
    params_before = _expert_params(found)
    stats = observe(model, calibration, MeanOutputs, batch_size, progress)
    layers = {}
    for name, experts in found:
        E, tokens = experts.num_experts, stats[name].tokens
        clusters = average_linkage(stats[name].mean, kept[name])
        M = merge_matrix(clusters, tokens)  # [E', E]
        _per_expert_rows(experts, E, lambda t: (M.to(t.device, torch.float32) @ t.flatten(1).float())
                         .to(t.dtype).view(-1, *t.shape[1:]))
        _set_expert_count([experts], E, kept[name])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MergedExperts(experts, clusters.to(experts.down_proj.device)))
        layers[name] = {"clusters": [(clusters == c).nonzero().flatten().tolist() for c in range(kept[name])],
                        "tokens": tokens.tolist()}
    return {"method": "hc-smoe", "kept_fraction": kept_fraction, "params_before": params_before,
            "params_after": _expert_params(found), "layers": layers}
