"""The budget in bits: CompressionConfig(target_bits=B) picks the kept fraction, the form and the bit width whose
stored bits per original expert weight (every code, scale and zero point counted, as the folder stores them) stay
within B and whose error, measured on a sample of the model's own experts modules, is lowest.

The candidates: the experts as they are, quantized (method=quantize, kept 1) at each bit width, and the default form
(method=auto: with calibration data the shared input basis and delta below kept 0.4, the shared basis from 0.4, each
reconstructed) at the largest kept fraction within budget (to KEPT_STEP) at each bit
width, with uniform ranks. The forms are tried symmetric and asymmetric (zero points cost a little storage and can fit
skewed groups better: measured on the fine testbed at 4 bits, GPTQ 3-bit asymmetric was chosen over symmetric and lost
0.63x as much); pure quantization symmetric alone. Its asymmetric kind has the lower error on the sample, in the metric
and at the block's output alike, yet on the fine testbed it lost 2.5-6x the held-out loss of the symmetric kind at 4
bits (RTN and GPTQ in BENCHMARKS §11; ours with and without the reconstruction alike), so the error cannot choose;
symmetric is also the kind a user's GPTQ int4 is and vLLM serves fastest. Their bits are exact, from the shapes each
would store. At each bit width only the largest kept fraction within budget is measured, since keeping more at the same
width cannot cost accuracy (on a grid of kept fractions alone, target_bits=2.5 on the fine testbed stored 2.15 bits and
left the rest of its budget unspent). Their error is each sample module fitted and quantized as the compression would,
summed as the report sums it, in the calibrated metric when there is data: the error on the inputs the experts are
routed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
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
KEPT = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)  # scanned for the bracket of the largest within budget
KEPT_STEP = 0.005  # how close the largest kept fraction within budget is found, by bisection inside that bracket
SAMPLE = 3  # experts modules whose error ranks the candidates: the first, a middle one, the last


def candidates(source: engine.ExpertsSource, config: CompressionConfig) -> tuple[list[tuple[CompressionConfig, float]],
                                                                              Optional[float]]:
    """Every setting target_bits chooses among within config.target_bits, with its planned bits, and the least bits
    any setting stores (None if none fits this model): at each bit width, symmetric and asymmetric, the experts
    quantized as they are (symmetric) and the default form at the largest kept fraction within budget, with config's
    other settings (group size, calibration). Uniform ranks: the global allocation spends a budget of parameters, which
    would not bound the bits."""
    found, fewest = [], []
    for symmetric in (True, False):
        for b in BIT_WIDTHS:
            common = {"target_bits": None, "symmetric": symmetric, "bits": b}
            quantized = functools.partial(setting, config, source.calibrated, **common, method="quantize",
                                          rank_allocation=None)
            form = functools.partial(setting, config, source.calibrated, **common, rank_allocation="uniform")
            kinds = ([(quantized, [None])] if symmetric else []) + [(form, KEPT)]
            for make, kept in kinds:
                candidate, bits, least = within(source, make, kept, config.target_bits)
                fewest += [] if least is None else [least]
                found += [] if candidate is None else [(candidate, bits)]
    return found, min(fewest, default=None)


def setting(config: CompressionConfig, calibrated: bool, kept: Optional[float], **changes) -> CompressionConfig:
    """`config` with `changes` at the kept fraction `kept` (None: the experts as they are), as it runs with or without
    calibration data."""
    size = {} if kept is None else {"target_ratio": kept}
    return dataclasses.replace(config, **changes, **size).for_data(calibrated)


def within(source: engine.ExpertsSource, make: Callable[[Optional[float]], CompressionConfig],
           kept: Sequence[Optional[float]], budget: float
           ) -> tuple[Optional[CompressionConfig], Optional[float], Optional[float]]:
    """The setting make(k) at the largest kept fraction k within `budget` bits (kept [None]: the experts as they are),
    its planned bits (both None if no fraction is within), and the fewest bits of the fractions scanned. The grid
    `kept` brackets it, bisection finds it to KEPT_STEP: at one width, bits grow with the kept fraction."""
    planned = [(k, planned_bits(source, make(k))) for k in kept]
    fitting = [bits for _, bits in planned if bits is not None]
    inside = [i for i, (_, bits) in enumerate(planned) if bits is not None and bits <= budget]
    if not inside:
        return None, None, min(fitting, default=None)
    low, bits = planned[inside[-1]]
    if inside[-1] + 1 < len(kept):  # between the largest within and the next, which stores too much or cannot fit
        high = kept[inside[-1] + 1]
        while high - low > KEPT_STEP:
            middle = round((low + high) / 2, 4)
            middle_bits = planned_bits(source, make(middle))
            if middle_bits is not None and middle_bits <= budget:
                low, bits = middle, middle_bits
            else:
                high = middle
    return make(low), bits, min(fitting)


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
    feasible, least = candidates(source, config)
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
