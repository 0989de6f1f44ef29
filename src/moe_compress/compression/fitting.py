"""The fit of one experts module: each projection's weights W [E, out, in] into a projection of its form, in the
calibrated metric when there are statistics, and the error-versus-rank curves the global allocation reads.

Pure functions of weights, statistics and settings: they read no model and write nothing; the engine (engine.py)
hands them a module's weights, wherever they were read from. Shapes: E experts, out x in a projection's matrices,
r rank, G cores.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from moe_compress import fit
from moe_compress.calibration.grams import ExpertGrams
from moe_compress.compression.allocation import Curve, error_curve
from moe_compress.compression.budget import max_rank, rank_limit, stored_bits, stored_params
from moe_compress.compression.config import CORE_CHOICES, CompressionConfig
from moe_compress.compression.grouping import expert_features, kmeans
from moe_compress.compression.report import ProjectionStats
from moe_compress.experts import ModuleSpec, Projection, group_format, make_projection
from moe_compress.quantize import QuantFormat, QuantizedMatrix, gptq, quantize_rtn

Weights = dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]  # projection -> (W [E, out, in], bias [E, out])


def fit_projection(W: torch.Tensor, rank: int, config: CompressionConfig, metric: Optional[torch.Tensor] = None,
                   shared: str = "in") -> dict[str, torch.Tensor]:
    """The fitted factors of one projection, W [E, out, in] in fp32 on the fit device; in the metric M [E, in, in] of
    the experts' routed inputs when given (the Adam polish, which minimises the weight error, is then left out).
    `shared` is the side whose basis the basis form shares."""
    config = config.for_data(metric is not None)
    if config.method == "basis":
        return fit.fit_basis(W, rank, shared, max(1, config.als_iters), metric=metric, tol=config.als_tol)
    if config.method == "delta":
        return fit.fit_delta(W, rank, max(1, config.als_iters), metric=metric, tol=config.als_tol)
    if config.method == "adam":
        if metric is not None:
            raise ValueError("method=adam (the seed recipe) fits the weights only; use method=als or delta with "
                             "calibration data")
        return fit.fit_adam(W, config.adam_steps, config.lr, fit.seed_init(W, rank, config.seed))
    fitted = fit.fit_als(W, rank, config.als_iters, metric=metric, tol=config.als_tol)
    return fitted if metric is not None else fit.fit_adam(W, config.polish_steps, config.lr, fitted)


def expert_groups(W: torch.Tensor, num_cores: int, seed: int, metric: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which core serves each expert: [E] labels, all zero for one core, else k-means on the (whitened) weights."""
    if num_cores == 1:
        return torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    return kmeans(expert_features(W, metric), num_cores, seed=seed).to(W.device)


def fit_grouped(W: torch.Tensor, rank: int, config: CompressionConfig, metric: Optional[torch.Tensor],
                groups: torch.Tensor, shared: str = "in") -> dict[str, torch.Tensor]:
    """One fit per group of experts, each with its own core: cores [G, out, in], factors back in expert order."""
    if not groups.any():  # one group: the fit as it is (a shared basis has no expert index to scatter by)
        return fit_projection(W, rank, config, metric, shared)
    parts = []
    for g in range(int(groups.max()) + 1):
        members = groups == g
        parts.append((members, fit_projection(W[members], rank, config, None if metric is None else metric[members],
                                              shared)))
    factors = {"core": torch.cat([fitted["core"] for _, fitted in parts])}
    for key in parts[0][1].keys() - {"core"}:
        factors[key] = W.new_empty(W.shape[0], *parts[0][1][key].shape[1:])
        for members, fitted in parts:
            factors[key][members] = fitted[key]
    return factors


def fit_into(proj: Projection, W: torch.Tensor, bias: Optional[torch.Tensor], config: CompressionConfig,
             device: torch.device, metric: Optional[torch.Tensor] = None) -> tuple[float, Optional[float]]:
    """Fit W [E, out, in] (on `device`, in fp32) into the projection module `proj`, in place; its relative error, and
    its relative error in the metric M [E, in, in] when given. With method=auto or mixed, the form of `proj`
    decides."""
    if config.method in ("auto", "mixed"):
        config = dataclasses.replace(config, method="als" if proj.form == "wrapped" else proj.form)
    W = W.to(device, torch.float32)
    metric = None if metric is None else metric.to(device)
    if proj.form == "dense":  # nothing to fit: each expert is its own core
        groups, factors = torch.arange(W.shape[0], device=device), {"core": W}
    else:
        groups = expert_groups(W, proj.core.shape[0], config.seed, metric)
        factors = fit_grouped(W, proj.rank, config, metric, groups, getattr(proj, "shared", "in"))
    with torch.no_grad():
        proj.expert_core.copy_(groups)
        for key, value in factors.items():
            getattr(proj, key).copy_(value)
        if bias is not None:
            proj.bias.copy_(bias)
    return errors(proj, W, metric)


def errors(proj: Projection, W: torch.Tensor, metric: Optional[torch.Tensor] = None) -> tuple[float, Optional[float]]:
    """The relative error of a projection's weights as stored (quantized ones dequantized) against W [E, out, in], and
    in the metric M [E, in, in] when given."""
    with torch.no_grad():
        W_hat = proj.dense().float().to(W.device)
    return fit.relative_error(W, W_hat), None if metric is None else fit.relative_error(W, W_hat, metric)


def quantized(X: torch.Tensor, format: QuantFormat, H: Optional[torch.Tensor]) -> QuantizedMatrix:
    """A stack of matrices X [..., rows, cols] in `format` (one group per row where it does not divide cols): GPTQ in
    the Hessians H [..., cols, cols] of their inputs, round to nearest without them (GPTQ's equal with H = I)."""
    format = group_format(format, X.shape[-1])
    return quantize_rtn(X, format) if H is None else gptq(X, H.to(X.dtype), format)


def quantize_into(proj: Projection, W: torch.Tensor, format: QuantFormat, metric: Optional[torch.Tensor] = None,
                  solver_iters: int = 10) -> None:
    """Keep a fitted projection's tensors as integers in `format`, in place, each quantized in what its error costs
    and the float ones refitted to what the quantized ones leave, in the order the error flows:
      the core, by GPTQ in the summed metric of the experts that share it (its inputs are theirs);
      the factors, refitted to the residual of the quantized core (delta's SVD, the basis's closed form);
      the input side (V^T, or the shared U of down's basis), then the other side refitted to it by least squares and
      quantized in its own Hessian (V^T M_e V for U, M_e for V^T).
    W [E, out, in] fp32 and M [E, in, in] (None: data-free, every Hessian the identity) on the fit device."""
    metric = None if metric is None else metric.to(W.device)
    cores = proj.expert_core
    with torch.no_grad():
        G = proj.shape_of("core")[0]
        H = None if metric is None else torch.stack([metric[cores == g].sum(0) for g in range(G)])
        proj.quantize_("core", quantized(proj.matrix("core").float(), format, H))
        if proj.form == "dense":
            return
        R = W - proj.core.float()[cores]  # what the quantized cores leave: [E, out, in]
        factors = fit.factors_for_core(R, proj.form, proj.rank, getattr(proj, "shared", "in"), metric, solver_iters)
        shared_out = getattr(proj, "shared", "in") == "out"
        for name, value in factors.items():
            getattr(proj, name).copy_(value)
        if shared_out:  # down's shared output basis U [1, out, k] first; then each V_e, refitted to it
            V = factors["v"]
            H = None if metric is None else (V.mT @ metric @ V).sum(0, keepdim=True)
            proj.quantize_("u", quantized(proj.matrix("u").float(), format, H))
            proj.v.copy_(fit.solve_v(R, proj.u.float()))
            proj.quantize_("v", quantized(proj.matrix("v").float(), format, metric))
            return
        H = None if metric is None else metric if proj.shape_of("v")[0] > 1 else metric.sum(0, keepdim=True)
        proj.quantize_("v", quantized(proj.matrix("v").float(), format, H))
        V = proj.v.float()  # [E or 1, in, k], as stored
        proj.u.copy_(fit.solve_u(R, V, metric))
        H = None if metric is None else V.mT @ metric @ V  # [E, k, k]
        proj.quantize_("u", quantized(proj.matrix("u").float(), format, H))


@dataclass
class FittedModule:
    """One experts module's fitted projections (on the fit device, in the weights' dtype), their report rows, and
    the calibration tokens routed to each of its experts (None data-free)."""

    name: str
    projections: dict[str, Projection]
    rows: list[ProjectionStats]
    coverage: Optional[list[int]] = None
    inputs: Optional[torch.Tensor] = None  # [N, H] the block's kept calibration inputs, for the reconstruction
    targets: Optional[torch.Tensor] = None  # [N, H] the original block's outputs on them
    layer_outputs: Optional[torch.Tensor] = None  # [N, H] their decoder layer's outputs (objective=normed)


def check_finite(name: str, projection: str, W: torch.Tensor) -> None:
    if not torch.isfinite(W.sum(dtype=torch.float32)):  # one pass, no copy: any NaN or Inf spreads to the sum
        raise ValueError(f"{name} ({projection}) holds NaN or Inf values; fix or re-download the checkpoint before "
                         "compressing")


def fit_module(name: str, weights: Weights, spec: ModuleSpec, config: CompressionConfig, device: torch.device,
               grams: Optional[ExpertGrams] = None) -> FittedModule:
    """Fit the projections in `weights` of the experts module `name` as `spec` shapes them, in the metric of `grams`
    when given."""
    fitted = FittedModule(name, {}, []) if grams is None else FittedModule(
        name, {}, [], grams.tokens.tolist(), grams.block_inputs, grams.block_outputs, grams.layer_outputs)
    for projection, (W, bias) in weights.items():
        check_finite(name, projection, W)
        start = time.perf_counter()
        E, out_f, in_f = W.shape
        rank, cores, form = spec.ranks[projection], spec.num_cores, spec.form_of(projection)
        proj = make_projection(form, projection, E, out_f, in_f, rank, cores, bias is not None, dtype=W.dtype,
                               device=device)
        metric = None if grams is None else grams.metric(projection, config.calibration.regularisation)
        error, output_error = fit_into(proj, W.detach(), bias, config, device, metric)
        if spec.quant and projection in spec.quant:
            W32 = W.detach().to(device, torch.float32)
            quantize_into(proj, W32, spec.quant[projection], metric)
            error, output_error = errors(proj, W32, None if metric is None else metric.to(device))
        fitted.projections[projection] = proj
        fitted.rows.append(ProjectionStats(name, projection, E, (out_f, in_f), rank, error, E * out_f * in_f,
                                           stored_params(E, out_f, in_f, rank, cores, form, projection),
                                           time.perf_counter() - start, output_error, stored_bits(proj)))
    return fitted


def module_curves(weights: Weights, spec: ModuleSpec, config: CompressionConfig, device: torch.device,
                  grams: Optional[ExpertGrams] = None) -> tuple[dict[str, Curve], ModuleSpec]:
    """The error-versus-rank curve of each projection of one experts module (in the metric of `grams` when given),
    and its spec. With num_cores="auto" the spec takes, of CORE_CHOICES, the count of cores whose curves sum lowest at
    the uniform ranks it affords within target_ratio (each core costs out*in), and those ranks."""
    parts = {}
    for projection, (W, _) in weights.items():
        metric = None if grams is None else grams.metric(projection, config.calibration.regularisation).to(device)
        parts[projection] = (W.detach().to(device, torch.float32), metric)
    E = next(iter(parts.values()))[0].shape[0]
    auto = config.num_cores == "auto" and "basis" not in map(config.form_of, parts)
    best = None
    for cores in [k for k in CORE_CHOICES if k <= E] if auto else [spec.num_cores]:
        ranks = {p: max_rank(*W.shape, config.target_ratio * W.numel(), config.form_of(p), p, cores)
                 for p, (W, _) in parts.items()} if auto else spec.ranks
        if min(ranks.values()) < 1:
            continue  # the cores alone take the budget
        curves = {p: error_curve(W, config.form_of(p), p, rank_limit(config, p, *W.shape, cores),
                                 expert_groups(W, cores, config.seed, metric), metric)
                  for p, (W, metric) in parts.items()}
        score = sum(c.errors[min(ranks[p], len(c.errors) - 1)] for p, c in curves.items())
        if best is None or score < best[0]:
            best = (score, curves, dataclasses.replace(spec, num_cores=cores, ranks=dict(ranks)))
    return best[1], best[2]
