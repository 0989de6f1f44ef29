"""The budget in bits: CompressionConfig(target_bits=B) picks the kept fraction, the form and the bit width whose
stored bits per original expert weight (every code, scale and zero point counted, as the folder stores them) stay
within B and whose error, measured on a sample of the model's own experts modules, is lowest.

The candidates: the experts as they are, quantized (method=quantize, kept 1) at each bit width, and the default form
(method=auto: with calibration data the shared input basis and delta below kept 0.4, the shared basis from 0.4) at
each kept fraction of KEPT and each bit width, with uniform ranks; each symmetric and asymmetric (zero points cost a
little storage and can fit skewed groups better: measured on the fine testbed at 4 bits, GPTQ 3-bit asymmetric was
chosen over symmetric and lost 0.63x as much). Their bits are exact, from the shapes each would
store; at each bit width only the largest kept fraction within budget is measured (keeping more at the same width
cannot cost accuracy). Their error is each sample module fitted and quantized as the compression would, summed as the
report sums it, in the calibrated metric when there is data: the error on the inputs the experts are routed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from tqdm.auto import tqdm

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.compression import engine
from moe_compress.compression.budget import RankTooLargeError, stored_bits
from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.fitting import fit_module
from moe_compress.compression.report import CompressionReport
from moe_compress.discovery import split_weights
from moe_compress.experts import make_projection

BIT_WIDTHS = (2, 3, 4, 8)
KEPT = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)
SAMPLE = 3  # experts modules whose error ranks the candidates: the first, a middle one, the last


def candidates(config: CompressionConfig) -> list[CompressionConfig]:
    """Every setting target_bits chooses among, symmetric and asymmetric, with config's other settings (group size,
    calibration). Uniform ranks: the global allocation spends a budget of parameters, which would not bound the bits."""
    found = []
    for symmetric in (True, False):
        common = {"target_bits": None, "symmetric": symmetric}
        found += [dataclasses.replace(config, **common, method="quantize", bits=b, rank_allocation=None)
                  for b in BIT_WIDTHS]
        found += [dataclasses.replace(config, **common, target_ratio=k, bits=b, rank_allocation="uniform")
                  for k in KEPT for b in BIT_WIDTHS]
    return found


def planned_bits(source: engine.ExpertsSource, config: CompressionConfig) -> Optional[float]:
    """Bits per original expert weight that `config` would store (its uniform ranks; the global allocation spends the
    same budget), counted from the shapes alone; None where its ranks do not fit."""
    try:
        specs = engine.plan(source, config)
    except RankTooLargeError:
        return None
    total = weights = 0
    for name, experts in source.experts():
        spec = specs[name]
        for projection, (W, bias) in split_weights(experts).items():
            proj = make_projection(spec.form_of(projection), projection, *W.shape, spec.ranks[projection],
                                   spec.num_cores, bias is not None, spec.quant_of(projection), dtype=W.dtype,
                                   device="meta")
            total += stored_bits(proj)
            weights += W.numel()
    return total / weights


def sample_names(source: engine.ExpertsSource) -> list[str]:
    names = [name for name, _ in source.experts()]
    return list(dict.fromkeys(names[i * (len(names) - 1) // max(1, SAMPLE - 1)] for i in range(SAMPLE)))


def sample_error(source: engine.ExpertsSource, config: CompressionConfig, grams: dict[str, Optional[ExpertGrams]],
                 device: torch.device) -> float:
    """The error of `config` on the sample modules: each fitted and quantized, the rows summed as the report does
    (in the calibrated metric where there are statistics)."""
    specs = engine.plan(source, config)
    report = CompressionReport(config)
    for name, module_grams in grams.items():
        report.rows += fit_module(name, source.read(name, list(specs[name].ranks)), specs[name], config, device,
                                  module_grams).rows
    if all(row.output_error is not None for row in report.rows):
        report.rows = [dataclasses.replace(row, rel_error=row.output_error) for row in report.rows]
    return report.rel_error


def choose(source: engine.ExpertsSource, config: CompressionConfig, device: torch.device,
           progress: bool = True) -> tuple[CompressionConfig, dict]:
    """The candidate of lowest sample error among those within config.target_bits, and a record of the choice (every
    feasible candidate's bits and error)."""
    budget = config.target_bits
    widest: dict[tuple[str, int, bool], tuple[float, CompressionConfig, float]] = {}  # per form, width, symmetry
    least = None
    for candidate in candidates(config):
        candidate = candidate.for_data(source.calibrated)
        bits = planned_bits(source, candidate)
        if bits is None:
            continue
        least = bits if least is None else min(least, bits)
        kept, key = candidate.target_ratio or 1.0, (candidate.method, candidate.bits, candidate.symmetric)
        if bits <= budget and kept > widest.get(key, (0.0,))[0]:
            widest[key] = (kept, candidate, bits)  # at one width, keeping more can only lower the error
    feasible = [(candidate, bits) for _, candidate, bits in widest.values()]
    if not feasible:
        raise ValueError(f"target_bits={budget} is below what any choice stores (the least: {least:.3f} bits per "
                         f"weight); use target_bits >= {least:.3f}")
    names = sample_names(source)
    grams = dict.fromkeys(names)
    for group in engine.statistics_groups(source, names, recompute=False):
        grams.update(group)
    record = {"target_bits": budget, "sample": names, "candidates": []}
    best = None
    for candidate, bits in tqdm(feasible, desc=f"target_bits={budget}", unit="choice", disable=not progress):
        error = sample_error(source, candidate, grams, device)
        record["candidates"].append({"method": candidate.method, "kept": candidate.target_ratio or 1.0,
                                     "bits": candidate.bits, "symmetric": candidate.symmetric,
                                     "bits_per_weight": bits, "error": error})
        if best is None or error < best[1]:
            best = (candidate, error)
    record["chosen"] = next(c for c in record["candidates"] if c["error"] == best[1])
    return best[0], record
