"""Global rank allocation: the parameter budget spent over the whole model where it lowers the error most.

Each (layer, projection) unit gets an error-versus-rank curve from one decomposition of its weights (in the calibrated
metric when there is one), never a fit per rank. compress starts every unit at the uniform rank (the largest that fits
its own share of the budget) and hands out what integer ranks leave of the budget greedily, one step of one unit at a
time, by error reduction per stored parameter, until the next step would exceed it. The curves are convex (tails of
sorted eigenvalues), so the greedy choice is the exact optimum of their sum whenever steps cost the same (tested
against brute force).

Why from the uniform ranks and not from rank 1: the summed curves are a poor model of the loss when errors are large.
On the fine-grained testbed (delta, calibrated, at the storage of uniform kept 0.3), allocating the whole budget from
rank 1 raised the held-out loss increase from +0.401 to +0.438, and to +0.487 with each layer's curve weighted by its
measured loss sensitivity; spending only the remainder lowers it (benchmarks/budget.py, BENCHMARKS §9).

Errors are relative to each unit's own (squared, summed over its experts, in its metric), so that units whose
outputs differ in scale count alike. Shapes: E experts, out x in a projection's matrices, r rank.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from moe_compress.experts import PROJECTION_FORMS, basis_side
from moe_compress.fit import Metric, cholesky


@dataclass(frozen=True)
class Curve:
    """One unit's relative squared error at ranks 0..len-1, and what it stores at rank 0 and per rank."""

    errors: list[float]
    base: int
    step: int


def _descending_spectrum(R: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Per expert, the eigenvalues of R_e M_e R_e^T (M_e = I when None), largest first, in fp64: [E, min(out, in)].
    Their tail beyond 2r is what the best rank-2r correction of R_e leaves in the metric (whitened SVD)."""
    R = R.double()
    out_f, in_f = R.shape[-2:]
    if M is None:
        gram = R @ R.mT if out_f <= in_f else R.mT @ R
    elif out_f <= in_f:
        gram = (R @ M.double()) @ R.mT
    else:
        L = cholesky(M)
        RL = R @ L
        gram = RL.mT @ RL
    return torch.linalg.eigvalsh(gram).clamp_min(0).flip(-1)


def _basis_spectrum(R: torch.Tensor, M: torch.Tensor | None, projection: str) -> torch.Tensor:
    """Eigenvalues, largest first, of the summed deviations' Gram on the shared side: the error a shared basis of k
    columns removes is the sum of the first k (exactly on the output side; on the input side in a metric, with the
    experts' mean metric standing in for each one's)."""
    R = R.double()
    if basis_side(projection) == "out":
        gram = torch.einsum("eoi,epi->op", R if M is None else R @ M.double(), R)
    else:
        if M is not None:
            R = R @ cholesky(M.mean(0))
        gram = torch.einsum("eoi,eoj->ij", R, R)
    return torch.linalg.eigvalsh(gram).clamp_min(0).flip(-1)


def _first_cores(W: torch.Tensor, groups: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Each expert's group's first core, the mean or (in a metric) the RegMean of its members: [E, out, in]."""
    cores = torch.empty_like(W)
    for g in groups.unique():
        members = groups == g
        W_g = W[members]
        cores[members] = W_g.mean(0) if M is None else Metric.of(W_g, M[members]).regmean()[0]
    return cores


def error_curve(W: torch.Tensor, form: str, projection: str, max_rank: int, groups: torch.Tensor | None = None,
                metric: torch.Tensor | None = None) -> Curve:
    """The error-versus-rank curve of fitting W [E, out, in] in `form` at ranks 0..max_rank: the residual around the
    first cores (mean, or RegMean in a metric, of each group of experts that `groups` [E] labels, one group when None)
    after its best rank-2r per-expert correction (wrapped and delta; for the wrapped form an estimate, since it
    spends its rank on two sides), or after the best shared basis of k columns (basis). The fits then refit the
    cores, so they end a little below the curve."""
    E, out_f, in_f = W.shape
    W = W.double()
    M = None if metric is None else metric.double()
    groups = torch.zeros(E, dtype=torch.long, device=W.device) if groups is None else groups
    R = W - _first_cores(W, groups, M)
    if M is None:
        total, residual = W.square().sum(), R.square().sum()
    else:
        # the shared input basis's curve is measured in the experts' mean metric, its estimate of each one's
        metric_of = M.mean(0, keepdim=True).expand_as(M) if form == "basis" and basis_side(projection) == "in" else M
        total = ((W @ metric_of) * W).sum()
        residual = ((R @ metric_of) * R).sum()
    if form == "basis":
        captured = torch.cat([torch.zeros(1, dtype=W.dtype), _basis_spectrum(R, M, projection).cumsum(0)])
        ranks = torch.arange(max_rank + 1).clamp_max(captured.shape[0] - 1)
    else:
        per_column = _descending_spectrum(R, M).sum(0)  # the i-th largest of every expert, summed
        captured = torch.cat([torch.zeros(1, dtype=W.dtype), per_column.cumsum(0)])
        ranks = (2 * torch.arange(max_rank + 1)).clamp_max(captured.shape[0] - 1)
    errors = ((residual - captured[ranks]).clamp_min(0) / total.clamp_min(1e-300)).tolist()
    stored = PROJECTION_FORMS[form].stored_params
    num_cores = int(groups.max()) + 1
    base = stored(E, out_f, in_f, 0, num_cores, projection)
    return Curve(errors, base, stored(E, out_f, in_f, 1, num_cores, projection) - base)


def allocate(curves: dict[str, Curve], budget: float, start: int | dict[str, int] = 1) -> dict[str, int]:
    """Ranks {unit: r} minimising the summed errors with sum of stored parameters <= budget: every unit starts at
    `start` (one rank for all, or one per unit), then the step with the largest error reduction per parameter is
    taken while one fits. A step that lowers nothing is never taken."""
    ranks = {unit: start if isinstance(start, int) else start[unit] for unit in curves}
    spent = sum(c.base + ranks[unit] * c.step for unit, c in curves.items())
    if spent > budget:
        raise ValueError(f"the budget of {int(budget):,} parameters is below what the starting ranks store "
                         f"({spent:,}); use a larger target_ratio")

    def candidate(unit: str) -> tuple[float, str] | None:
        curve, r = curves[unit], ranks[unit]
        if r + 1 >= len(curve.errors):
            return None
        gain = curve.errors[r] - curve.errors[r + 1]
        return (-gain / curve.step, unit) if gain > 0 else None

    heap = [c for c in map(candidate, curves) if c is not None]
    heapq.heapify(heap)
    while heap:
        _, unit = heapq.heappop(heap)
        if spent + curves[unit].step > budget:
            continue  # this unit's steps no longer fit; a cheaper unit's may
        ranks[unit] += 1
        spent += curves[unit].step
        following = candidate(unit)
        if following is not None:
            heapq.heappush(heap, following)
    return ranks
