"""What a compression did, and how it is written: per (layer, projection) rows, the totals, calibration coverage;
compression_report.json, a heat map of error by layer and projection, and the coverage plot. Both drivers write the
same files (CompressionReport.save).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from moe_compress.compression.config import CompressionConfig

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
    stored_bits: Optional[int] = None  # bits the projection stores for its experts, scales and codes included


@dataclass
class BlockError:
    """An MoE block's relative output error, ||y_hat - y|| / ||y|| (each token's squares weighted as the
    reconstruction weighs them: reconstruction.weighting), after the closed-form fit and after the layer-wise
    reconstruction (compression/reconstruction.py), on the calibration tokens that judge it, and the
    reconstruction's time."""

    module: str  # the experts module
    before: float
    after: float
    steps: int
    seconds: float


@dataclass
class CompressionReport:
    """What compress did, per (layer, projection): relative error, parameters before and after, fit time; with
    calibration data, also the error on the routed inputs, and the tokens routed to each expert (`coverage`)."""

    config: CompressionConfig
    rows: list[ProjectionStats] = field(default_factory=list)
    coverage: dict[str, list[int]] = field(default_factory=dict)  # experts module -> calibration tokens per expert
    choice: Optional[dict] = None  # with target_bits: the candidates measured and the one chosen (compression/bits.py)
    blocks: list[BlockError] = field(default_factory=list)  # with reconstruction: each block's output error

    @property
    def block_error(self) -> Optional[tuple[float, float]]:
        """The blocks' relative output error, root mean square over blocks, before and after reconstruction."""
        if not self.blocks:
            return None
        return tuple((sum(getattr(b, when) ** 2 for b in self.blocks) / len(self.blocks)) ** 0.5
                     for when in ("before", "after"))

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

    @property
    def bits_per_weight(self) -> Optional[float]:
        """Bits stored per original expert weight, every stored tensor and scale counted (bf16 experts: 16)."""
        if any(r.stored_bits is None for r in self.rows):
            return None
        return sum(r.stored_bits for r in self.rows) / self.params_before

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kept_fraction": self.kept_fraction,
            "bits_per_weight": self.bits_per_weight,
            "rel_error": self.rel_error,
            "seconds": self.seconds,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "coverage": self.coverage,
            **({"target_bits": self.choice} if self.choice is not None else {}),
            **({"reconstruction": {"block_error": dict(zip(("before", "after"), self.block_error)),
                                   "blocks": [dataclasses.asdict(b) for b in self.blocks]}} if self.blocks else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, folder: str | Path) -> None:
        """compression_report.json (totals, per (layer, projection) rows, per-layer table, calibration coverage),
        compression_error.png and, with calibration data, calibration_coverage.png, in `folder`."""
        folder = Path(folder)
        table = {**self.to_dict(), "layers": layer_table(self)}
        (folder / "compression_report.json").write_text(json.dumps(table, indent=2) + "\n")
        plot_errors(self, folder / "compression_error.png")
        if self.coverage:
            plot_coverage(self.coverage, folder / "calibration_coverage.png")

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
            f"(kept {self.kept_fraction:.3f}"
            + (f", {self.bits_per_weight:.2f} bits per weight" if self.bits_per_weight is not None else "")
            + f"), relative error {self.rel_error:.4f}, fit {self.seconds:.1f} s "
            f"[{self.config.method}]"
        )
        if self.blocks:
            before, after = self.block_error
            lines.append(f"reconstruction: block output error {before:.4f} -> {after:.4f} "
                         f"({self.blocks[0].steps} steps a block, {sum(b.seconds for b in self.blocks):.1f} s)")
        return "\n".join(lines)


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


def layer_table(report: CompressionReport) -> list[dict]:
    """Per experts module: the relative error and rank of each projection and the parameters before and after."""
    layers: dict[str, dict] = {}
    for row in report.rows:
        layer = layers.setdefault(row.module, {"module": row.module, "rel_error": {}, "rank": {}, "params_before": 0,
                                               "params_after": 0})
        layer["rel_error"][row.projection] = row.rel_error
        layer["rank"][row.projection] = row.rank
        layer["params_before"] += row.params_before
        layer["params_after"] += row.params_after
    for block in report.blocks:
        layers[block.module]["block_error"] = {"before": block.before, "after": block.after}
    return list(layers.values())


def plot_errors(report: CompressionReport, path: Path) -> None:
    """A heat map of relative error by projection (rows) and layer (columns), with the blocks' output error after
    the fit and after reconstruction as two more rows where there was one; values and ranks written in the cells of
    models shallow enough to read them. The figure's size is capped: a 160-layer model's map stays small in memory
    too."""
    from matplotlib.figure import Figure  # matplotlib is imported where a plot is drawn: compress() needs none

    layers = layer_table(report)
    projections = [p for p in ("gate", "up", "down") if any(p in layer["rel_error"] for layer in layers)]
    errors = [[layer["rel_error"].get(p, float("nan")) for layer in layers] for p in projections]
    ranks = [[layer["rank"].get(p) for layer in layers] for p in projections]
    if report.blocks:
        for when, label in (("before", "block, fit"), ("after", "block, reconstructed")):
            errors.append([layer.get("block_error", {}).get(when, float("nan")) for layer in layers])
            ranks.append([None] * len(layers))
            projections.append(label)
    labels = [layer["module"].removesuffix(".mlp.experts").removesuffix(".experts").removeprefix("model.")
              for layer in layers]
    fig = Figure(figsize=(min(16.0, 2.5 + 0.55 * len(layers)), 1.6 + 0.45 * len(projections)))  # no pyplot state
    ax = fig.subplots()
    image = ax.imshow(errors, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(projections)), projections)
    ticks = range(0, len(layers), max(1, len(layers) // 24))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    if len(layers) <= 24:
        for i, row in enumerate(errors):
            for j, value in enumerate(row):
                dark = image.norm(value) < 0.6  # viridis runs from dark blue to bright yellow
                rank = "" if ranks[i][j] is None else f"\nr={ranks[i][j]}"
                ax.text(j, i, f"{value:.3f}{rank}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="relative error")
    ax.set_title(f"{report.config.method}, {report.config.rank_allocation} ranks: error by layer and projection",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_coverage(coverage: dict[str, list[int]], path: Path) -> None:
    """Calibration tokens routed to each expert (columns) of each layer (rows), on a log colour scale, the starved
    ones (fewer than one token) in the colour map's 'under' colour."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    names = list(coverage)
    tokens = [[max(n, 0.5) for n in coverage[name]] for name in names]
    fig = Figure(figsize=(min(16.0, 3 + 0.12 * len(tokens[0])), min(12.0, 1.5 + 0.3 * len(names))))
    ax = fig.subplots()
    image = ax.imshow(tokens, cmap="viridis", aspect="auto", interpolation="nearest", norm=LogNorm(vmin=1))
    ax.set_yticks(range(len(names)), [n.removesuffix(".mlp.experts").removeprefix("model.") for n in names],
                  fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="calibration tokens routed to it")
    ax.set_title("calibration coverage: tokens per expert and layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
