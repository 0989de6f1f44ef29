"""One path from experts modules to compressed ones, whatever holds them: plan, statistics, allocation, fit, report.

    source = ...                                        # an ExpertsSource: a loaded model, or a checkpoint folder
    specs = plan(source, config)                        # every rank checked before any work
    found = dict(curves(source, specs, names, ...))     # cores and global ranks decided by error curves,
    specs = allocated_specs(config, found, ...)         #   when the config asks for them
    for fitted in fitted_modules(source, specs, ...):   # statistics and fits, one layer's modules at a time
        ...                                             # the driver keeps each: swaps it in, or records it
    report = report_of(config, rows, coverage, source)

The two drivers keep only what differs: compress() (in_memory.py) swaps each fitted module into the model;
compress_checkpoint() (from_folder.py) splits the work over torchrun's processes, records each unit in a manifest
for resuming, and assembles the folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.compression.allocation import Curve, allocate
from moe_compress.compression.budget import choose_rank
from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.fitting import FittedModule, Weights, fit_module, module_curves
from moe_compress.compression.report import CompressionReport, ProjectionStats, warn_starved
from moe_compress.data import calibration_sequences
from moe_compress.discovery import projection_names, split_weights
from moe_compress.experts import ModuleSpec
from moe_compress.folder.load import load_tokenizer


class ExpertsSource(Protocol):
    """Where a compression reads experts modules and their calibration statistics."""

    calibrated: bool  # whether statistics() has calibration data to gather or read

    def experts(self) -> list[tuple[str, nn.Module]]:
        """Every experts module by name, in model order: a module with the experts' flags and shapes (its weights
        may be on the meta device)."""

    def read(self, name: str, projections: Sequence[str]) -> Weights:
        """The weights of `projections` of the experts module `name`."""

    def statistics(self, names: Collection[str], recompute: bool) -> Iterator[dict[str, ExpertGrams]]:
        """The calibration statistics of the experts modules `names`, in groups (a decoder layer's modules, or one
        module), in model order. With `recompute`, the pass goes on after a group from that group's layers as the
        caller left them (compressed)."""


def plan(source: ExpertsSource, config: CompressionConfig) -> dict[str, ModuleSpec]:
    """{experts module name: spec} for the whole model, every rank checked before any fit starts."""
    specs = {}
    for name, experts in source.experts():
        parts = split_weights(experts)
        ranks = {p: choose_rank(config, p, *parts[p][0].shape) for p in projection_names(experts)}
        quant = None if config.quant_format is None else dict.fromkeys(ranks, config.quant_format)
        specs[name] = ModuleSpec(config.form, ranks, config.cores, quant)
    return specs


def curves_decide(config: CompressionConfig) -> bool:
    """Whether the specs wait for the error curves: global ranks, or cores chosen per module."""
    return config.rank_allocation == "global" or config.num_cores == "auto"


def statistics_groups(source: ExpertsSource, names: Collection[str],
                      recompute: bool) -> Iterator[dict[str, Optional[ExpertGrams]]]:
    """The modules `names` in groups with their statistics: the source's, or each module alone without any."""
    if source.calibrated:
        yield from source.statistics(names, recompute)
    else:
        for name in names:
            yield {name: None}


def curves(source: ExpertsSource, specs: dict[str, ModuleSpec], names: Collection[str], config: CompressionConfig,
           device: torch.device, bar: tqdm) -> Iterator[tuple[str, dict[str, Curve], ModuleSpec]]:
    """(name, its projections' error curves, its spec with cores chosen) of the experts modules `names`, in the
    calibrated metric when there is data (a statistics pass over the original layers)."""
    for group in statistics_groups(source, names, recompute=False):
        for name, grams in group.items():
            found, spec = module_curves(source.read(name, list(specs[name].ranks)), specs[name], config, device, grams)
            yield name, found, spec
            bar.update()
        del group  # before the next group's statistics are read


def params_before(source: ExpertsSource) -> int:
    return sum(W.numel() for _, experts in source.experts() for W, _ in split_weights(experts).values())


def allocated_specs(config: CompressionConfig, found: dict[str, tuple[dict[str, Curve], ModuleSpec]],
                    params: int) -> dict[str, ModuleSpec]:
    """The specs the curves chose (cores with num_cores=auto), with global ranks: the budget the uniform ranks leave,
    target_ratio * params less what they store, spent where the curves say it lowers the error most."""
    specs = {name: spec for name, (_, spec) in found.items()}
    if config.rank_allocation != "global":
        return specs
    by_unit = {(name, p): curve for name, (module, _) in found.items() for p, curve in module.items()}
    uniform = {(name, p): r for name, spec in specs.items() for p, r in spec.ranks.items()}
    ranks = allocate(by_unit, config.target_ratio * params, start=uniform)
    return {name: dataclasses.replace(spec, ranks={p: ranks[name, p] for p in spec.ranks})
            for name, spec in specs.items()}


def fitted_modules(source: ExpertsSource, specs: dict[str, ModuleSpec], units: dict[str, list[str]],
                   config: CompressionConfig, device: torch.device, bar: tqdm) -> Iterator[FittedModule]:
    """Each experts module of `units` ({name: projections to fit}) fitted, in model order, in the calibrated metric
    when there is data. The caller keeps each before the next is fitted: with propagate=compressed, the statistics
    pass goes on from the layers as the caller left them."""
    recompute = config.calibration.propagate == "compressed"
    for group in statistics_groups(source, units, recompute):
        for name, grams in group.items():
            fitted = fit_module(name, source.read(name, units[name]), specs[name], config, device, grams)
            for row in fitted.rows:
                bar.set_postfix_str(f"{name.removesuffix('.experts')[-24:]} {row.projection} "
                                    f"err={row.rel_error:.3f} {row.seconds:.1f}s")
                bar.update()
            yield fitted
        del group  # one module's (or layer's) statistics in memory at a time


def kept_inputs(config: CompressionConfig) -> int:
    """How many calibration tokens' inputs each experts module's statistics keep: the reconstruction's, or none."""
    return config.reconstruction.max_tokens if config.reconstruction.on else 0


def weighs(config: CompressionConfig) -> bool:
    """Whether the kept tokens get weights from the loss's gradient (calibration/sensitivity.py)."""
    return config.reconstruction.on and config.reconstruction.weighting == "loss"


def report_of(config: CompressionConfig, rows: list[ProjectionStats], coverage: dict[str, list[int]],
              source: ExpertsSource) -> CompressionReport:
    """The report of a compression, with one warning naming the experts that received too few calibration tokens."""
    report = CompressionReport(config, rows, coverage)
    if coverage:
        warn_starved(coverage, {name: split_weights(experts)["up"][0].shape[-1] for name, experts in source.experts()})
    return report


def calibration_text(config: CompressionConfig, tokenizer_from: str | Path) -> Optional[torch.Tensor]:
    """The calibration token ids [N, L] that config.calibration.data names, read with the tokenizer of the model at
    `tokenizer_from`; None when the config is data-free."""
    settings = config.calibration
    if not settings.calibrated:
        return None
    tokenizer = load_tokenizer(tokenizer_from, "calibration text needs the model's tokenizer: add its files to the "
                                               "folder, or pass calibration token ids")
    return calibration_sequences(settings.data, tokenizer, settings.num_sequences)
