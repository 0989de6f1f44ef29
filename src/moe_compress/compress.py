"""compress(model, config): replace every experts module of a transformers MoE model by SharedCoreExperts, in place.

Data-free, every fit minimises the weight error sum_e ||W_e - What_e||^2. Given calibration token ids, compress runs
them through the model layer by layer (sequential.py), gathers each experts module's routed-input statistics as its
layer is reached (calibration_stats.py), fits in that metric, and passes the compressed layer's outputs on.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_compress import fit
from moe_compress.allocation import Curve, allocate, error_curve
from moe_compress.calibration import Calibration, observing, token_batches
from moe_compress.calibration_stats import ExpertGrams, Regularisation
from moe_compress.discovery import find_experts, projection_names, split_weights
from moe_compress.checkpoint import attach_quantization_config
from moe_compress.experts import PROJECTION_FORMS, SharedCoreExperts, form_of
from moe_compress.grouping import expert_features, kmeans
from moe_compress.sequential import capture

METHODS = ("auto", "als", "adam", "delta", "basis", "mixed")
# method=mixed: the shared input basis for gate and up, which read the residual stream every expert reads, and a
# per-expert delta for down, whose input is each expert's own (BENCHMARKS §9)
MIXED_FORMS = {"gate": "basis", "up": "basis", "down": "delta"}
# method=auto fits the shared basis, with calibration data, from this kept fraction on, and mixed below it
# (BENCHMARKS §1)
BASIS_FROM = 0.4
CORE_CHOICES = (1, 2, 4)  # what num_cores="auto" chooses among, per experts module
ALLOCATIONS = ("global", "uniform")
PROJECTIONS = ("gate", "up", "down")
PROPAGATION = ("compressed", "original")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data for fits in the metric of the experts' routed inputs, and how the statistics are kept.

    `source` names where the token sequences come from, as distillation data does (testbed, a local .txt file or
    folder, a `datasets` id, streamed); None is data-free. The Python API may pass token ids to compress() instead.
    """

    source: Optional[str] = None
    subset: Optional[str] = None  # datasets config name
    split: str = "train"
    text_column: str = "text"
    num_sequences: int = 256
    seq_len: int = 2048
    batch_size: int = 8  # sequences per forward
    shrink: float = 1.0  # pseudo-tokens of the layer-wide Gram per input dimension, added to every expert's
    damp: float = 1.0  # times the mean diagonal, added to it (measured best on both testbeds; 0.01 overfits)
    propagate: str = "original"  # what each layer passes on: the original layer's outputs, or the compressed one's

    def __post_init__(self):
        if min(self.num_sequences, self.seq_len, self.batch_size) < 1:
            raise ValueError("calibration num_sequences, seq_len and batch_size must be >= 1")
        if self.propagate not in PROPAGATION:
            raise ValueError(f"calibration propagate={self.propagate!r} is unknown; use one of {list(PROPAGATION)}")
        Regularisation(self.shrink, self.damp)  # checks them

    @property
    def regularisation(self) -> Regularisation:
        return Regularisation(self.shrink, self.damp)


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress. Give `rank` (per projection overrides in `ranks`) or `target_ratio`, the kept fraction of
    expert parameters. With target_ratio, rank_allocation="global" (its default) spends that budget over the whole
    model where it lowers the error most (allocation.py); "uniform" takes the largest rank that fits in every
    projection alike. `method="basis"` fits the shared-basis form (rank r: the width k that stores as much);
    "mixed" the shared input basis for gate and up and delta for down; "auto" (the default) is basis with calibration
    data and target_ratio >= 0.4, mixed with calibration data below, else delta: the best measured (BENCHMARKS §1)."""

    rank: Optional[int] = None
    target_ratio: Optional[float] = None
    ranks: Optional[dict[str, int]] = None
    method: str = "auto"
    als_iters: int = 3
    als_tol: float = 0.0  # stop ALS early when a round improves the objective by less than this, relatively
    polish_steps: int = 0  # Adam steps after als, data-free: at Qwen3-30B-A3B's shape 100 cost 4x the fit for 0.3%
    adam_steps: int = 1000
    lr: float = 1e-3
    seed: int = 0
    device: Optional[str] = None
    rank_allocation: Optional[str] = None  # "global" (default with target_ratio) or "uniform"
    num_cores: Any = 1  # cores per projection, each shared by a k-means group of experts; or "auto" (1, 2 or 4)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if isinstance(self.calibration, dict):  # from Hydra or JSON
            object.__setattr__(self, "calibration", CalibrationConfig(**self.calibration))
        ranks = dict(self.ranks or {})
        if self.rank is None and self.target_ratio is None and set(ranks) != set(PROJECTIONS):
            raise ValueError("CompressionConfig needs a size: set rank=<int> or target_ratio=<kept fraction in (0, 1)>")
        if self.rank is not None and self.target_ratio is not None:
            raise ValueError("CompressionConfig got both rank and target_ratio; set only one of them")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio={self.target_ratio} is not a kept fraction; use a value in (0, 1)")
        unknown = set(ranks) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"ranks has unknown projections {sorted(unknown)}; use keys among {list(PROJECTIONS)}")
        for name, r in [("rank", self.rank), *ranks.items()]:
            if r is not None and (not isinstance(r, int) or r < 1):
                raise ValueError(f"{name}={r} is not a positive integer rank; use rank >= 1")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; use one of {list(METHODS)}")
        if min(self.als_iters, self.polish_steps, self.adam_steps, self.als_tol) < 0 or self.lr <= 0:
            raise ValueError("als_iters, als_tol, polish_steps and adam_steps must be >= 0 and lr > 0")
        object.__setattr__(self, "ranks", ranks or None)
        allocation = self.rank_allocation or ("global" if self.target_ratio is not None else "uniform")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"rank_allocation={allocation!r} is unknown; use one of {list(ALLOCATIONS)}")
        if allocation == "global" and self.target_ratio is None:
            raise ValueError("rank_allocation=global spends a budget: give target_ratio=<kept fraction> instead of "
                             "rank, or set rank_allocation=uniform")
        object.__setattr__(self, "rank_allocation", allocation)
        if self.num_cores == "auto":
            if self.target_ratio is None:
                raise ValueError("num_cores=auto chooses within a budget: give target_ratio=<kept fraction>")
        elif not isinstance(self.num_cores, int) or self.num_cores < 1:
            raise ValueError(f"num_cores={self.num_cores} is not a positive integer or auto; use num_cores >= 1")
        elif self.num_cores > 1 and self.method in ("basis", "mixed"):
            raise ValueError(f"method={self.method} shares one basis and one core per projection; use num_cores=1 "
                             "with it")

    @property
    def cores(self) -> int:
        """Cores per projection before num_cores=auto has chosen (it starts from one)."""
        return 1 if self.num_cores == "auto" else self.num_cores

    @property
    def form(self) -> str | dict[str, str]:
        """The form of every projection, or {projection: form} for method=mixed: a spec's "form"."""
        if self.method == "auto":
            raise ValueError("method=auto has no form until it knows whether there is calibration data; "
                             "use config.for_data(calibrated)")
        if self.method == "mixed":
            return dict(MIXED_FORMS)
        return self.method if self.method in ("delta", "basis") else "wrapped"

    def form_of(self, projection: str) -> str:
        return form_of(self.form, projection)

    def for_data(self, calibrated: bool) -> CompressionConfig:
        """This config with method=auto made concrete. With calibration statistics: basis when the fits keep at least
        BASIS_FROM of the expert parameters, mixed below; delta without them, or with several cores (a basis has one
        core)."""
        if self.method != "auto":
            return self
        if not calibrated or self.num_cores not in (1, "auto"):
            return dataclasses.replace(self, method="delta")
        large = self.target_ratio is not None and self.target_ratio >= BASIS_FROM
        return dataclasses.replace(self, method="basis" if large else "mixed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RankTooLargeError(ValueError):
    pass


def stored_params(num_experts: int, out_f: int, in_f: int, rank: int, num_cores: int = 1, form: str = "wrapped",
                  projection: str = "up") -> int:
    """Parameters stored for one projection: G*out*in cores + E*2r*(out+in) factors (wrapped, delta) or
    k*(shared side + E*other side) (basis)."""
    return PROJECTION_FORMS[form].stored_params(num_experts, out_f, in_f, rank, num_cores, projection)


def max_rank(num_experts: int, out_f: int, in_f: int, budget: float, form: str = "wrapped",
             projection: str = "up", num_cores: int = 1) -> int:
    """The largest rank whose storage stays under `budget` parameters (0 if none does)."""
    base = stored_params(num_experts, out_f, in_f, 0, num_cores, form, projection)
    step = stored_params(num_experts, out_f, in_f, 1, num_cores, form, projection) - base
    return max(0, int((budget - base) // step))


def rank_limit(config: CompressionConfig, projection: str, num_experts: int, out_f: int, in_f: int,
               num_cores: Optional[int] = None) -> int:
    """The largest rank that stores less than the original (with `num_cores` cores, config.cores when None)."""
    return max_rank(num_experts, out_f, in_f, num_experts * out_f * in_f - 1, config.form_of(projection), projection,
                    num_cores or config.cores)


def choose_rank(config: CompressionConfig, projection: str, num_experts: int, out_f: int, in_f: int) -> int:
    """The rank of one projection: from target_ratio, or the given rank. A rank r means the storage of rank r in every
    form: the basis form gets the width k that stores as much (r and k are both checked against the original)."""
    original = num_experts * out_f * in_f
    shape = f"E={num_experts}, {out_f}x{in_f}"
    if config.cores > num_experts:
        raise ValueError(f"num_cores={config.num_cores} exceeds the {num_experts} experts of {projection}; use "
                         f"num_cores <= {num_experts}")
    limit = rank_limit(config, projection, num_experts, out_f, in_f)
    rank = (config.ranks or {}).get(projection, config.rank)
    if rank is not None and config.form_of(projection) == "basis":
        wrapped_limit = rank_limit(dataclasses.replace(config, method="als"), projection, num_experts, out_f, in_f)
        if rank > wrapped_limit:
            limit = wrapped_limit
        else:
            stored = stored_params(num_experts, out_f, in_f, rank, config.cores)
            rank = max_rank(num_experts, out_f, in_f, stored, "basis", projection, config.cores)
    if rank is None:
        rank = max_rank(num_experts, out_f, in_f, config.target_ratio * original, config.form_of(projection),
                        projection, config.cores)
        if rank < 1:
            smallest = stored_params(num_experts, out_f, in_f, 1, config.cores, config.form_of(projection),
                                     projection) / original
            raise RankTooLargeError(
                f"target_ratio {config.target_ratio} is below what rank 1 stores for {projection} ({shape}); "
                f"use target_ratio >= {smallest:.4f}"
            )
    if rank > limit:
        raise RankTooLargeError(
            f"rank {rank} stores more than the original for {projection} ({shape}); "
            f"use rank <= {limit} or target_ratio"
        )
    return rank


@dataclass
class ProjectionStats:
    module: str
    projection: str
    experts: int
    shape: tuple[int, int]
    rank: int
    rel_error: float
    params_before: int
    params_after: int
    seconds: float
    output_error: Optional[float] = None  # relative error in the calibrated metric: on the routed inputs


@dataclass
class CompressionReport:
    """What compress did, per (layer, projection): relative error, parameters before and after, fit time; with
    calibration data, also the error on the routed inputs, and the tokens routed to each expert (`coverage`)."""

    config: CompressionConfig
    rows: list[ProjectionStats] = field(default_factory=list)
    coverage: dict[str, list[int]] = field(default_factory=dict)  # experts module -> calibration tokens per expert

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before

    @property
    def rel_error(self) -> float:
        """Relative error over all compressed weights, each projection weighted by its size."""
        num = sum(r.rel_error**2 * r.params_before for r in self.rows)
        return (num / self.params_before) ** 0.5

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kept_fraction": self.kept_fraction,
            "rel_error": self.rel_error,
            "seconds": self.seconds,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "coverage": self.coverage,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        header = f"{'module':<40} {'proj':<5} {'E':>4} {'shape':>11} {'rank':>5} {'rel err':>8} {'params':>23} {'s':>6}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            params = f"{r.params_before:,} -> {r.params_after:,}"
            lines.append(
                f"{r.module[-40:]:<40} {r.projection:<5} {r.experts:>4} {shape:>11} {r.rank:>5} {r.rel_error:>8.4f} "
                f"{params:>23} {r.seconds:>6.2f}"
            )
        lines.append(
            f"total: {self.params_before:,} -> {self.params_after:,} expert parameters "
            f"(kept {self.kept_fraction:.3f}), relative error {self.rel_error:.4f}, fit {self.seconds:.1f} s "
            f"[{self.config.method}]"
        )
        return "\n".join(lines)


def fit_projection(W: torch.Tensor, rank: int, config: CompressionConfig, metric: Optional[torch.Tensor] = None,
                   shared: str = "in") -> dict[str, torch.Tensor]:
    """The fitted factors of one projection, W [E, out, in] in fp32 on the fit device; in the metric M [E, in, in] of
    the experts' routed inputs when given (the Adam polish, which minimises the weight error, is then left out).
    `shared` is the side whose basis the basis form shares."""
    config = config.for_data(metric is not None)
    if config.method == "basis":
        return fit.fit_basis(W, rank, shared, max(1, config.als_iters), metric=metric)
    if config.method == "delta":
        return fit.fit_delta(W, rank, max(1, config.als_iters), metric=metric)
    if config.method == "adam":
        if metric is not None:
            raise ValueError("method=adam (the seed recipe) fits the weights only; use method=als or delta with "
                             "calibration data")
        return fit.fit_adam(W, config.adam_steps, config.lr, fit.seed_init(W, rank, config.seed))
    fitted = fit.fit_als(W, rank, config.als_iters, metric=metric, tol=config.als_tol)
    return fitted if metric is not None else fit.fit_adam(W, config.polish_steps, config.lr, fitted)


def _check_finite(found: list[tuple[str, nn.Module]]) -> None:
    for name, experts in found:
        for pname, p in experts.named_parameters(recurse=False):
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"{name}.{pname} holds NaN or Inf values; fix or re-download the checkpoint before compressing"
                )


def plan(model: nn.Module, config: CompressionConfig) -> dict[str, dict]:
    """{experts module name: spec} for the whole model, checked before any fit starts."""
    if any(isinstance(m, SharedCoreExperts) for m in model.modules()):
        raise ValueError("this model is already compressed; compress the original model instead")
    found = find_experts(model)
    _check_finite(found)
    specs = {}
    for name, experts in found:
        parts = split_weights(experts)
        ranks = {p: choose_rank(config, p, *parts[p][0].shape) for p in projection_names(experts)}
        specs[name] = {"form": config.form, "num_cores": config.cores, "ranks": ranks}
    return specs


def _fit_device(config: CompressionConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


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


def fit_into(proj: nn.Module, W: torch.Tensor, bias: Optional[torch.Tensor], config: CompressionConfig,
             device: torch.device, metric: Optional[torch.Tensor] = None) -> tuple[float, Optional[float]]:
    """Fit W [E, out, in] (on `device`, in fp32) into the projection module `proj`, in place; its relative error, and
    its relative error in the metric M [E, in, in] when given. With method=auto, the form of `proj` decides."""
    if config.method in ("auto", "mixed"):
        config = dataclasses.replace(config, method="als" if proj.form == "wrapped" else proj.form)
    W = W.to(device, torch.float32)
    metric = None if metric is None else metric.to(device)
    groups = expert_groups(W, proj.core.shape[0], config.seed, metric)
    factors = fit_grouped(W, proj.rank, config, metric, groups, getattr(proj, "shared", "in"))
    with torch.no_grad():
        proj.expert_core.copy_(groups)
        for key, value in factors.items():
            getattr(proj, key).copy_(value)
        if bias is not None:
            proj.bias.copy_(bias)
        W_hat = proj.dense().float().to(device)
        return fit.relative_error(W, W_hat), None if metric is None else fit.relative_error(W, W_hat, metric)


def compress_module(model: nn.Module, name: str, spec: dict, config: CompressionConfig, report: CompressionReport,
                    grams: Optional[ExpertGrams] = None, bar: Optional[tqdm] = None) -> None:
    """Fit the experts module `name` (in the metric of `grams` when given) and swap in its SharedCoreExperts."""
    experts = model.get_submodule(name)
    shared = SharedCoreExperts.empty(experts, spec)
    device = _fit_device(config)
    for proj_name, (W, bias) in split_weights(experts).items():
        proj = shared.projections[proj_name]
        start = time.perf_counter()
        metric = None if grams is None else grams.metric(proj_name, config.calibration.regularisation)
        error, output_error = fit_into(proj, W.detach(), bias, config, device, metric)
        E, out_f, in_f = W.shape
        report.rows.append(ProjectionStats(
            name, proj_name, E, (out_f, in_f), proj.rank, error, E * out_f * in_f,
            stored_params(E, out_f, in_f, proj.rank, proj.core.shape[0], proj.form, proj_name),
            time.perf_counter() - start,
            output_error,
        ))
        if bar is not None:
            bar.set_postfix_str(f"{name.split('.experts')[0][-20:]} {proj_name} err={error:.3f}")
            bar.update()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, shared)


def warn_starved(coverage: dict[str, list[int]], input_size: dict[str, int]) -> None:
    """One warning naming the experts whose calibration tokens are fewer than their input size."""
    starved = {name: [e for e, n in enumerate(tokens) if n < input_size[name]] for name, tokens in coverage.items()}
    starved = {name: experts for name, experts in starved.items() if experts}
    if starved:
        total = sum(len(e) for e in starved.values())
        listed = "; ".join(f"{name}: {', '.join(map(str, e))}" for name, e in list(starved.items())[:4])
        warnings.warn(f"{total} experts received fewer calibration tokens than their input size ({listed}"
                      f"{'; ...' if len(starved) > 4 else ''}): their fits lean on the layer-wide statistics; add "
                      "calibration data (more or longer sequences) for them", UserWarning, stacklevel=3)


def observed_layers(model: nn.Module, specs: dict[str, dict], calibration: Calibration, batch_size: int,
                    recompute: bool) -> Iterator[tuple[list[str], dict[str, ExpertGrams]]]:
    """Layer by layer, the names of each decoder layer's experts modules in `specs` and their statistics on the
    inputs that reach it. Before the next layer, the caller may replace them; with `recompute` the layer's outputs
    passed on are then computed again, as it now is, otherwise they are the ones observed."""
    was_training = model.training
    model.eval()
    try:
        inputs = capture(model, list(token_batches(calibration, batch_size)))
        for index in range(len(inputs.layers)):
            names = [name for name in inputs.experts_of(index, model) if name in specs]
            grams = {name: ExpertGrams(model.get_submodule(name)) for name in names}
            with observing(model, grams):
                outputs = inputs.run(index)
            yield names, grams
            inputs.advance(index, None if recompute and names else outputs)
    finally:
        model.train(was_training)


def _compress_calibrated(model: nn.Module, specs: dict[str, dict], config: CompressionConfig,
                         calibration: Calibration, report: CompressionReport, bar: tqdm) -> None:
    """Layer by layer: statistics of each layer's experts on the inputs that reach it, fits, outputs passed on."""
    recompute = config.calibration.propagate == "compressed"
    for names, grams in observed_layers(model, specs, calibration, config.calibration.batch_size, recompute):
        for name in names:
            compress_module(model, name, specs[name], config, report, grams[name], bar)
            report.coverage[name] = grams[name].tokens.tolist()
    warn_starved(report.coverage, {name: model.get_submodule(name).projections["up"].shape[1] for name in specs})


def module_curves(experts: nn.Module, name: str, spec: dict, config: CompressionConfig, device: torch.device,
                  grams: Optional[ExpertGrams] = None) -> tuple[dict[tuple[str, str], Curve], dict]:
    """The error-versus-rank curve of each projection of one experts module (in the metric of `grams` when given),
    and its spec. With num_cores="auto" the spec takes, of CORE_CHOICES, the count of cores whose curves sum lowest at
    the uniform ranks it affords within target_ratio (each core costs out*in), and those ranks."""
    parts = {}
    for projection, (W, _) in split_weights(experts).items():
        metric = None if grams is None else grams.metric(projection, config.calibration.regularisation).to(device)
        parts[projection] = (W.detach().to(device, torch.float32), metric)
    E = next(iter(parts.values()))[0].shape[0]
    auto = config.num_cores == "auto" and "basis" not in map(config.form_of, parts)
    best = None
    for cores in [k for k in CORE_CHOICES if k <= E] if auto else [spec["num_cores"]]:
        ranks = {p: max_rank(*W.shape, config.target_ratio * W.numel(), config.form_of(p), p, cores)
                 for p, (W, _) in parts.items()} if auto else spec["ranks"]
        if min(ranks.values()) < 1:
            continue  # the cores alone take the budget
        curves = {(name, p): error_curve(W, config.form_of(p), p, rank_limit(config, p, *W.shape, cores),
                                         expert_groups(W, cores, config.seed, metric), metric)
                  for p, (W, metric) in parts.items()}
        score = sum(c.errors[min(ranks[p], len(c.errors) - 1)] for (_, p), c in curves.items())
        if best is None or score < best[0]:
            best = (score, curves, {**spec, "num_cores": cores, "ranks": ranks})
    return best[1], best[2]


def allocate_ranks(specs: dict[str, dict], curves: dict[tuple[str, str], Curve],
                   config: CompressionConfig, params_before: int) -> dict[str, dict]:
    """`specs` (uniform ranks) with the budget they leave, target_ratio * params_before less what they store, spent
    where the curves say it lowers the error most."""
    uniform = {(name, p): r for name, spec in specs.items() for p, r in spec["ranks"].items()}
    ranks = allocate(curves, config.target_ratio * params_before, start=uniform)
    return {name: {**spec, "ranks": {p: ranks[name, p] for p in spec["ranks"]}} for name, spec in specs.items()}


def curves_decide(config: CompressionConfig) -> bool:
    """Whether the specs wait for the error curves: global ranks, or cores chosen per module."""
    return config.rank_allocation == "global" or config.num_cores == "auto"


def _allocated(model: nn.Module, specs: dict[str, dict], config: CompressionConfig,
               calibration: Optional[Calibration], progress: bool) -> dict[str, dict]:
    """The specs as the curves decide them (cores with num_cores=auto, then global ranks): every unit's curve, in the
    calibrated metric when there is data (one statistics pass over the original layers, dropped as it goes; the fits
    then gather their own)."""
    device = _fit_device(config)
    curves, specs = {}, dict(specs)

    def take(name: str, grams: Optional[ExpertGrams] = None) -> None:
        found, specs[name] = module_curves(model.get_submodule(name), name, specs[name], config, device, grams)
        curves.update(found)
        bar.update()
    with tqdm(total=len(specs), desc="rank curves", disable=not progress) as bar:
        if calibration is None:
            for name in list(specs):
                take(name)
        else:
            for names, grams in observed_layers(model, specs, calibration, config.calibration.batch_size, False):
                for name in names:
                    take(name, grams[name])
    if config.rank_allocation != "global":
        return specs
    params_before = sum(W.numel() for name in specs for W, _ in split_weights(model.get_submodule(name)).values())
    return allocate_ranks(specs, curves, config, params_before)


def compress(model: nn.Module, config: CompressionConfig, calibration: Optional[Calibration] = None,
             progress: bool = True) -> CompressionReport:
    """Replace every experts module of `model` by a fitted SharedCoreExperts, in place; return the report.

    `calibration`, token ids [N, L] (or an iterable of such batches), makes every fit minimise the error on the
    inputs each expert is routed in them (config.calibration says how the statistics are regularised)."""
    config = config.for_data(calibration is not None)
    specs = plan(model, config)
    if curves_decide(config):
        if calibration is not None and not isinstance(calibration, torch.Tensor):
            calibration = list(calibration)  # read twice: for the curves, then for the fits
        specs = _allocated(model, specs, config, calibration, progress)
    report = CompressionReport(config)
    bar = tqdm(total=sum(len(s["ranks"]) for s in specs.values()), desc="compress", disable=not progress)
    if calibration is None:
        for name, spec in specs.items():
            compress_module(model, name, spec, config, report, bar=bar)
    else:
        _compress_calibrated(model, specs, config, calibration, report, bar)
    bar.close()
    attach_quantization_config(model, specs, config, report)
    return report
