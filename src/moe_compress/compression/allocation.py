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
from moe_compress.fit import CHUNK_ELEMENTS, cholesky


@dataclass(frozen=True)
class Curve:
    """One unit's relative squared error at ranks 0..len-1, and what it stores at rank 0 and per rank."""

    errors: list[float]
    base: int
    step: int


def _descending_spectrum(R: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Per expert, the eigenvalues of R_e M_e R_e^T (M_e = I when None), largest first: [E, min(out, in)], fp64
    given fp64. Their tail beyond 2r is what the best rank-2r correction of R_e leaves in the metric (whitened SVD)."""
    out_f, in_f = R.shape[-2:]
    if M is None:
        gram = R @ R.mT if out_f <= in_f else R.mT @ R
    elif out_f <= in_f:
        gram = (R @ M) @ R.mT
    else:
        RL = R @ cholesky(M)
        gram = RL.mT @ RL
    return torch.linalg.eigvalsh(gram).clamp_min(0).flip(-1)


def _chunks(W: torch.Tensor, members: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Expert indices (of `members` [E] when given), CHUNK_ELEMENTS of W's elements at a time: the curves are taken
    in fp64 chunk by chunk, never on an fp64 copy of all experts (at Qwen3-30B-A3B's shape an [E, in, in] metric in
    fp64 alone is 4.3 GiB)."""
    index = torch.arange(W.shape[0], device=W.device) if members is None else members.nonzero().flatten()
    return list(index.split(max(1, CHUNK_ELEMENTS // W[0].numel())))


def _first_cores(W: torch.Tensor, groups: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Each group's first core, the mean or (in a metric) the RegMean of its members, (sum_e W_e M_e)(sum_e M_e)^-1,
    summed chunk by chunk in fp64: [G, out, in]."""
    cores = []
    for g in range(int(groups.max()) + 1):
        target, total, count = 0, 0, 0
        for part in _chunks(W, groups == g):
            W_c = W[part].double()
            count += len(part)
            if M is None:
                target = target + W_c.sum(0)
            else:
                M_c = M[part].double()
                target, total = target + torch.einsum("eoi,eij->oj", W_c, M_c), total + M_c.sum(0)
        cores.append(target / count if M is None else torch.cholesky_solve(target.mT, cholesky(total)).mT)
    return torch.stack(cores)


def _mean_metric(W: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The experts' mean metric in fp64, summed chunk by chunk: [in, in]."""
    return sum(M[part].double().sum(0) for part in _chunks(W)) / W.shape[0]


def error_curve(W: torch.Tensor, form: str, projection: str, max_rank: int, groups: torch.Tensor | None = None,
                metric: torch.Tensor | None = None) -> Curve:
    """The error-versus-rank curve of fitting W [E, out, in] in `form` at ranks 0..max_rank: the residual around the
    first cores (mean, or RegMean in a metric, of each group of experts that `groups` [E] labels, one group when None)
    after its best rank-2r per-expert correction (wrapped and delta; for the wrapped form an estimate, since it
    spends its rank on two sides), or after the best shared basis of k columns (basis). The fits then refit the
    cores, so they end a little below the curve. Taken in fp64, a chunk of experts at a time."""
    E, out_f, in_f = W.shape
    groups = torch.zeros(E, dtype=torch.long, device=W.device) if groups is None else groups
    cores = _first_cores(W, groups, metric)
    basis_in = form == "basis" and basis_side(projection) == "in"
    # the shared input basis's curve is measured in the experts' mean metric, its estimate of each one's
    mean = _mean_metric(W, metric) if basis_in and metric is not None else None
    whiten = None if mean is None else cholesky(mean)
    total = residual = gram = 0
    spectra = []
    for part in _chunks(W):
        W_c = W[part].double()
        R = W_c - cores[groups[part]]
        M = None if metric is None else (mean if mean is not None else metric[part].double())
        total = total + (W_c.square().sum() if M is None else ((W_c @ M) * W_c).sum())
        residual = residual + (R.square().sum() if M is None else ((R @ M) * R).sum())
        if form != "basis":
            spectra.append(_descending_spectrum(R, M))
        elif basis_in:  # the summed Gram of the (whitened) deviations on the input side
            R = R if whiten is None else R @ whiten
            gram = gram + torch.einsum("eoi,eoj->ij", R, R)
        else:  # on the output side, exactly in each expert's metric
            gram = gram + torch.einsum("eoi,epi->op", R if M is None else R @ M, R)
    if form == "basis":
        spectrum = torch.linalg.eigvalsh(gram).clamp_min(0).flip(-1)
        captured = torch.cat([torch.zeros(1, dtype=spectrum.dtype, device=spectrum.device), spectrum.cumsum(0)])
        ranks = torch.arange(max_rank + 1).clamp_max(captured.shape[0] - 1)
    else:
        per_column = torch.cat(spectra).sum(0)  # the i-th largest of every expert, summed
        captured = torch.cat([torch.zeros(1, dtype=per_column.dtype, device=per_column.device), per_column.cumsum(0)])
        ranks = (2 * torch.arange(max_rank + 1)).clamp_max(captured.shape[0] - 1)
    errors = ((residual - captured[ranks.to(captured.device)]).clamp_min(0) / total.clamp_min(1e-300)).tolist()
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
