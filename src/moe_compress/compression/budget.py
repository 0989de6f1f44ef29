"""The storage budget: what a projection stores in each form at a rank, and the rank a config gives each projection.

Shapes: E experts, out x in a projection's matrices, r rank, G cores.
"""

from __future__ import annotations

import dataclasses

from moe_compress.compression.config import CompressionConfig
from moe_compress.experts import PROJECTION_FORMS, Projection


class RankTooLargeError(ValueError):
    """A rank (or a kept fraction) that no projection of this shape can take."""


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
               num_cores: int | None = None) -> int:
    """The largest rank that stores less than the original (with `num_cores` cores, config.cores when None)."""
    return max_rank(num_experts, out_f, in_f, num_experts * out_f * in_f - 1, config.form_of(projection), projection,
                    num_cores or config.cores)


def choose_rank(config: CompressionConfig, projection: str, num_experts: int, out_f: int, in_f: int) -> int:
    """The rank of one projection: from target_ratio, or the given rank. A rank r means the storage of rank r in every
    form: the basis form gets the width k that stores as much (r and k are both checked against the original)."""
    if config.method == "quantize":
        return 0  # the experts as they are
    original = num_experts * out_f * in_f
    shape = f"E={num_experts}, {out_f}x{in_f}"
    if config.cores > num_experts:
        raise ValueError(f"num_cores={config.num_cores} exceeds the {num_experts} experts of {projection}; use "
                         f"num_cores <= {num_experts}")
    limit = rank_limit(config, projection, num_experts, out_f, in_f)
    rank = (config.ranks or {}).get(projection, config.rank)
    if rank is not None and config.form_of(projection) == "basis":
        wrapped = dataclasses.replace(config, method="als", bits=None)  # what rank r stores in the wrapped form
        wrapped_limit = rank_limit(wrapped, projection, num_experts, out_f, in_f)
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



def stored_bits(proj: Projection) -> int:
    """Bits a projection stores for its experts' weights: every stored tensor, integer codes, scales and zero points
    included (the bias, which the original stores too, aside), as they lie in its state dict and in a saved folder."""
    return sum(8 * t.numel() * t.element_size() for name, t in proj.state_dict().items() if name != "bias")
